"""The retrofitting paper's ablations, reproduced with jaxembed on Debian data at equal steps.

    .venv/bin/python -m examples.debian_retrofit.ablations --study negatives [--steps 100]
        [--batch 64] [--seeds 0,1] [--cells 0,1,random] [--out runs/ablations]

Every cell trains all-MiniLM-L6-v2 with ``config.py`` here (its learning rate, loss and
packing; batches drawn uniformly, ``data.group_size=0``, and queries left in their own
script, no query transform, except in the ``cyrillic`` and ``recipe`` studies) for the
same number of steps of the same global batch, changing one thing, and is scored like the
bench: mean nDCG@10 over the dev zero-shot languages
(``dev/xling-{cs,ja,ko,pl,ru,uk,zh_CN}``) and the trained ones. Studies:

- ``scale``: the pool of cross-lingual pairs the steps draw from (2.5k .. 40k rows; a
  small pool is repeated, a large one seen in part), no hard negatives.
- ``negatives``: 0, 1, 3 or 7 hard negatives per row, mined with the base model
  (retrofit.sh's rule), vs ``random``: one negative drawn uniformly from
  other rows' positives (``data.negatives="random"``, the control).
- ``diversity``: at equal examples, one trained language (German) vs all six, and
  cross-lingual retrieval alone vs + monolingual retrieval + Section classification +
  clustering (F2LLM's per-task losses, one dataset per batch).
- ``cyrillic``: the fraction of training queries rewritten in Cyrillic letters
  (``data.query_transform_rate`` of ``script:cyrillic``; cross-lingual pairs, no hard
  negatives): does reading borrowed
  words in Cyrillic carry over to Russian and Ukrainian, which are never trained on?
- ``format``: the positives of the same cross-lingual draws: the English synopsis + body
  (``full``: the synopsis translates the query), the body alone (``body``), or a coin per
  row (``mix``); no hard negatives.
- ``quantization``: the recipe (its ``recipe`` cell's run) and the recipe trained for a
  binary index (``loss.quantization="binary"``, its loss weighted 1, 2 or 4:
  ``binary``, ``binary-w2``, ``binary-w4``), each scored in float and as a binary index,
  alone and rescored: how much of post-hoc binarisation's loss the training wins back.
- ``sparse``: the recipe (its ``recipe`` cell's run, dense) against the recipe with a CSR
  autoencoder appended (``model.sparse="csr"``: 1,536 latents, 96 kept, dot product), at
  sentence-transformers' scale (``csr``: temperature 1) and at the recipe's (``csr-t0.05``).
- ``multi_vector``: the recipe (its ``recipe`` cell's run, dense) against the recipe as a
  multi-vector model (``configs/multi_vector.py``: 128 dimensions a token, 32-token queries
  expanded with [MASK] that nothing attends to, MaxSim, temperature 1; ``colbert``; and
  ``colbert-attended``, the encoder attending to the expansion too), at ``--steps`` of its
  own (equal wall time: the steps the dense run's time buys); zero-shot languages only for
  the ColBERT cells (exact MaxSim search is slow on 2 cores).
- ``recipe``: the whole recipe (``config.py``: mined-linked groups, symmetric loss with
  false-negative masking, lr 1e-4, dropout off, the Cyrillic rewrite) on mixed positives,
  on synopsis + body positives, and with each choice undone in turn: which of them the
  retrieval proxy pays for.

Every cell is scored on both proxies (`bench.evaluate`): ``dev/xling-*`` (the
translation proxy) and ``dev/xling-body-*`` (documents without the synopsis: retrieval).

Results accumulate in OUT/results.json (cell and seed); the table gives the mean over seeds
and, with two or more, the spread (max - min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from math import nan
from pathlib import Path

from examples.debian_retrofit.bench import evaluate, last_metrics, run_logged, take_rows
from examples.debian_retrofit.config import PAIR_FILES

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

from jaxembed.files import atomic_write_text  # noqa: E402

# The recipe (config.py) on mixed positives, and with each of its choices undone in turn.
RECIPE_CELLS = {
    "recipe": [],
    "full-positives": [],  # the recipe on synopsis + body positives (its data until now)
    "no-groups": ["--config.data.group_size=0"],
    "no-symmetric": ["--config.loss.symmetric=false", "--config.loss.false_negative_masking=false"],
    "lr-5e-5": ["--config.optim.lr=5e-5"],
    "dropout": ["--config.train.dropout=true"],
    "no-cyrillic": ["--config.data.query_transform_rate=0"],
}
STUDIES = {
    "scale": ("2500", "5000", "10000", "20000", "40000"),
    "negatives": ("0", "1", "3", "7", "random"),
    "diversity": ("xling-de", "xling-all", "tasks-de", "tasks-all"),
    "cyrillic": ("0", "0.25", "0.5", "0.75", "1"),
    "format": ("full", "body", "mix"),
    "recipe": tuple(RECIPE_CELLS),
    "quantization": ("float", "binary", "binary-w2", "binary-w4"),
    "sparse": ("dense", "csr", "csr-t0.05"),
    "multi_vector": ("dense", "colbert", "colbert-attended"),
}
# Recipe-based studies: the recipe's batches and query rewrite, its run as the dense cell.
RECIPE_STUDIES = ("recipe", "quantization", "sparse", "multi_vector")
DENSE_CELLS = (("quantization", "float"), ("sparse", "dense"), ("multi_vector", "dense"))
DEBIAN = ROOT / "data" / "debian"
GERMAN = ROOT / "data" / "debian-de"  # the same builder, German as the only trained language


def mined_pairs(out: Path, rows: int, positives: str = "full") -> Path:
    """``rows`` cross-lingual pairs with up to 10 mined negatives each (mined once, reused);
    ``positives``: retrofit.sh's POSITIVES."""
    name = f"mined-{rows}" if positives == "full" else f"mined-{positives}-{rows}"
    mined = out / name / "mined.jsonl"
    if not mined.exists():
        env = {**os.environ, "PY": sys.executable, "ROWS": str(rows), "STAGES": "pairs mine"}
        env["POSITIVES"] = positives
        mined.parent.mkdir(parents=True, exist_ok=True)
        run_logged(["bash", str(HERE / "retrofit.sh"), str(mined.parent)], out / "mine.log", env)
    return mined


def ensure_german() -> None:
    if not (GERMAN / "stats.json").exists():
        cmd = [sys.executable, "-m", "examples.debian_retrofit.debian", "--out", str(GERMAN)]
        cmd += ["--lists", str(DEBIAN / "lists"), "--langs", "de", "--max-per-task", "40000"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def cell_data(study: str, cell: str, out: Path, examples: int) -> tuple[list[Path], list[str]]:
    """The training files of a cell and its config overrides."""
    data = out / "data"
    if study == "scale":
        src = DEBIAN / "train" / "debian-xling.jsonl"
        return [take_rows(src, int(cell), data / f"xling-{cell}.jsonl")], [
            "--config.data.num_negatives.retrieval=0"
        ]
    if study == "cyrillic":
        src = DEBIAN / "train" / "debian-xling.jsonl"
        return [take_rows(src, examples, data / f"xling-{examples}.jsonl")], [
            "--config.data.num_negatives.retrieval=0",
            f"--config.data.query_transform_rate={cell}",
        ]
    if study == "format":  # the positives: synopsis + body, the body alone, or a coin per row
        src = DEBIAN / "train" / f"{PAIR_FILES[cell]}.jsonl"
        return [take_rows(src, examples, data / f"{PAIR_FILES[cell]}-{examples}.jsonl")], [
            "--config.data.num_negatives.retrieval=0"
        ]
    if study == "recipe":
        mined = mined_pairs(out, examples, "full" if cell == "full-positives" else "mix")
        return [mined], RECIPE_CELLS[cell]
    if study == "quantization":
        overrides = []
        if cell.startswith("binary"):  # binary-wN: the quantized loss weighted N (default 1)
            weight = cell.split("-w")[1] if "-w" in cell else "1.0"
            overrides = ["--config.loss.quantization=binary",
                         f"--config.loss.quantization_weight={weight}"]  # fmt: skip
        return [mined_pairs(out, examples, "mix")], overrides
    if study == "multi_vector":  # colbert-attended: the encoder attends to the expansion
        attend = ["--config.model.query_expansion_attend=True"]
        return [mined_pairs(out, examples, "mix")], attend if cell == "colbert-attended" else []
    if study == "sparse":
        overrides = []
        if cell != "dense":
            t = cell.split("-t")[1] if "-t" in cell else "1.0"
            overrides = ["--config.model.sparse=csr", f"--config.loss.temperature={t}"]
        return [mined_pairs(out, examples, "mix")], overrides
    if study == "negatives":
        mined = mined_pairs(out, examples)
        if cell == "random":
            return [mined], [
                "--config.data.negatives=random",
                "--config.data.num_negatives.retrieval=1",
            ]
        return [mined], [f"--config.data.num_negatives.retrieval={cell}"]
    # diversity: the same number of rows in every cell, split evenly over its tasks
    kind, langs = cell.split("-")
    root = DEBIAN
    if langs == "de":
        ensure_german()
        root = GERMAN
    names = ["debian-xling"] + (
        ["debian-mono", "debian-section", "debian-cluster"] if kind == "tasks" else []
    )
    per = examples // len(names)
    files = [
        take_rows(root / "train" / f"{n}.jsonl", per, data / cell / f"{n}.jsonl") for n in names
    ]
    return files, [
        "--config.data.num_negatives.retrieval=0",
        "--config.data.num_negatives.clustering=1",
        "--config.data.num_negatives.classification=1",
    ]


def run_cell(study, cell, seed, args) -> dict:
    examples = args.steps * args.batch
    files, overrides = cell_data(study, cell, args.out, examples)
    if study not in RECIPE_STUDIES:
        # Rows shuffled uniformly: the recipe's mined-linked batch groups would put hard
        # negatives into every cell, the "0 negatives" one included.
        overrides = ["--config.data.group_size=0", *overrides]
    # The recipe's Cyrillic-rewritten queries only where they are the thing measured.
    if study not in ("cyrillic", *RECIPE_STUDIES):
        overrides.append("--config.data.query_transform_rate=0")
    # The shape in the name: a cell run at another steps x batch must not resume this one.
    workdir = args.out / study / f"{cell}-seed{seed}-{args.steps}x{args.batch}"
    if (study, cell) in DENSE_CELLS:  # the recipe's run
        workdir = args.out / "recipe" / f"recipe-seed{seed}-{args.steps}x{args.batch}"
    config = HERE / "config.py"
    if cell.startswith("colbert"):  # the recipe, a vector per token
        config = ROOT / "configs" / "multi_vector.py"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "jaxembed.train",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.data.train=(" + "".join(f"'{f}'," for f in files) + ")",
        f"--config.train.steps={args.steps}",
        f"--config.train.global_batch={args.batch}",
        f"--config.train.seed={seed}",
        f"--config.optim.warmup_steps={max(1, args.steps // 10)}",
        *overrides,
    ]
    t0 = time.perf_counter()
    run_logged(cmd, workdir.parent / f"{workdir.name}.log")  # cell names hold dots
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "steps": int(last_metrics(workdir)["step"]),
        "eval": evaluate(
            str(workdir),
            DEBIAN,
            "binary" if study == "quantization" else "none",
            zero_shot_only=cell.startswith("colbert"),
        ),
    }


def table(results: dict, study: str, shape: str) -> str:
    lines = [
        f"| {study} | seeds | zero-shot nDCG@10 | spread | trained nDCG@10 | zero-shot body "
        "| trained body | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in STUDIES[study]:
        runs = [
            r
            for key, r in results.items()
            if key.startswith(f"{study}/{cell}/") and key.endswith(f"/{shape}")
        ]
        if not runs:
            continue
        z = [r["eval"]["zero_shot"] for r in runs]
        t = [r["eval"].get("trained", float("nan")) for r in runs]  # nan: not evaluated
        spread = f"{max(z) - min(z):.4f}" if len(z) > 1 else "-"
        body = [(r["eval"].get("zero_shot_body"), r["eval"].get("trained_body")) for r in runs]
        zb, tb = (
            (f"{sum(b[i] for b in body) / len(body):.4f}" if all(b[i] is not None for b in body)
             else "-") for i in (0, 1)
        )  # fmt: skip
        lines.append(
            f"| {cell} | {len(runs)} | {sum(z) / len(z):.4f} | {spread} | {sum(t) / len(t):.4f} "
            f"| {zb} | {tb} | {sum(r['seconds'] for r in runs) / len(runs) / 60:.1f} min |"
        )
    return "\n".join(lines)


def quantization_table(results: dict, shape: str) -> str:
    """Float, binary index and binary rescored nDCG@10 per group, and the share of post-hoc
    binarisation's loss (float cell: float - binary) that training for it wins back."""
    groups = ("zero_shot", "zero_shot_body", "trained", "trained_body")
    hows = ("", "/index", "/rescored")
    runs = {c: results.get(f"quantization/{c}/0/{shape}") for c in STUDIES["quantization"]}
    lines = [
        "| cell | " + " | ".join(f"{g}: float / index / rescored" for g in groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    for cell, r in runs.items():
        if r is not None:
            e = r["eval"]
            vals = [" / ".join(f"{e[g + how]:.4f}" for how in hows) for g in groups]
            lines.append(f"| {cell} | " + " | ".join(vals) + " |")
    if runs["float"] is None:
        return "\n".join(lines)
    f = runs["float"]["eval"]
    for cell, r in runs.items():
        if r is None or cell == "float":
            continue
        for how in ("index", "rescored"):
            b = r["eval"]
            won = [(b[f"{g}/{how}"] - f[f"{g}/{how}"]) / (f[g] - f[f"{g}/{how}"]) for g in groups]
            lines.append(
                f"\n{cell} {how}: share of the post-hoc loss won back: "
                + ", ".join(f"{g} {w:+.0%}" for g, w in zip(groups, won, strict=True))
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, choices=sorted(STUDIES))
    p.add_argument("--cells", help="comma-separated subset of the study's cells")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations")
    args = p.parse_args()
    cells = args.cells.split(",") if args.cells else list(STUDIES[args.study])
    if bad := sorted(set(cells) - set(STUDIES[args.study])):
        raise SystemExit(f"--cells: unknown {bad}; {args.study} has {STUDIES[args.study]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for cell in cells:
            key = f"{args.study}/{cell}/{seed}/{args.steps}x{args.batch}"
            if key in results:
                continue
            print(f"{key}: running", flush=True)
            results[key] = run_cell(args.study, cell, seed, args)
            # Merged into what is on disk now: two studies may run side by side.
            on_disk = json.loads(results_file.read_text()) if results_file.exists() else {}
            results = {**on_disk, **results}
            atomic_write_text(results_file, json.dumps(results, indent=1) + "\n")
            e = results[key]["eval"]
            print(
                f"{key}: zero-shot {e['zero_shot']:.4f} trained {e.get('trained', nan):.4f} "
                f"body: zero-shot {e['zero_shot_body']:.4f} "
                f"trained {e.get('trained_body', nan):.4f}",
                flush=True,
            )
    shape = f"{args.steps}x{args.batch}"
    print(table(results, args.study, shape))
    if args.study == "quantization":
        print("\n" + quantization_table(results, shape))


if __name__ == "__main__":
    main()
