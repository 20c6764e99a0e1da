"""What exact MaxSim search costs: every document at the corpus's widest against blocks of
one width, each document cut to its real tokens (`jaxembed.search.top_k`).

    .venv/bin/python bench/maxsim_search.py --model RUN_OR_FOLDER \
        [--data data/debian/dev/xling-ru] [--rounds 2] [--k 10]

A multi-vector model (e.g. configs/multi_vector.py's run) encodes one BEIR set's queries
and corpus as evaluation does (`retrieval.encoder_fns`, documents at 256 tokens at most);
the search then runs both ways on the same arrays, alternating, ``--rounds`` times after a
warm-up round (compiles); the best round of each is reported, with the ratio, and the two
top-k lists are compared (the share of slots holding the same document, and the largest
score difference). The full-width scan is `top_k` with `search.TOKEN_WIDTH` set to the
corpus's width: one width for every document, in the same blocks of `search.TOKEN_BLOCK`
documents, so the ratio is the width's alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import jaxembed
from jaxembed import search
from jaxembed.retrieval import encoder_fns


def timed(queries, docs, k: int, width: int) -> tuple[float, tuple]:
    search.TOKEN_WIDTH = width
    t0 = time.perf_counter()
    out = search.top_k(queries, docs, k)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/debian/dev/xling-ru")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    data = Path(args.data)
    enc = jaxembed.load(args.model, max_length=256)
    encode_q, encode_d, _ = encoder_fns(enc, batch_size=64)
    queries = [json.loads(x)["text"] for x in (data / "queries.jsonl").open()]
    corpus = [json.loads(x)["text"] for x in (data / "corpus.jsonl").open()]
    t0 = time.perf_counter()
    q, d = encode_q(queries), encode_d(corpus)
    encode_s = time.perf_counter() - t0
    lengths = search.token_lengths(d)
    bucketed = search.TOKEN_WIDTH
    widths = {"full": d.shape[1], "bucketed": bucketed}
    best, results = {}, {}
    for width in widths.values():  # a warm-up round: every shape compiled
        timed(q, d, args.k, width)
    for _ in range(args.rounds):
        for name, width in widths.items():
            seconds, results[name] = timed(q, d, args.k, width)
            best[name] = min(best.get(name, np.inf), seconds)
    (s_full, i_full), (s_cut, i_cut) = results["full"], results["bucketed"]
    same = np.mean(i_full == i_cut)
    scale = np.abs(s_full).max()
    print(f"{data.name}: {len(q)} queries x {q.shape[1]} tokens, {len(d)} documents of "
          f"{lengths.mean():.1f} tokens on average (at most {d.shape[1]}); encoding "
          f"{encode_s:.1f} s")  # fmt: skip
    print("| scan | seconds (best of rounds) | ratio |\n|---|---:|---:|")
    print(f"| every document at {d.shape[1]} tokens | {best['full']:.2f} | 1.00 |")
    print(f"| blocks of one width ({bucketed}-token steps) | {best['bucketed']:.2f} | "
          f"{best['full'] / best['bucketed']:.2f}x faster |")  # fmt: skip
    print(f"same top-{args.k} documents: {same:.4f} of slots; scores differ by at most "
          f"{np.abs(s_full - s_cut).max() / scale:.1e} of their scale")  # fmt: skip


if __name__ == "__main__":
    main()
