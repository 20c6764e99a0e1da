"""Model FLOP utilisation of an XLM-R-base-shaped encoder: train step and encoding.

    .venv/bin/python bench/mfu.py [--dtype bfloat16] [--length 512] [--batch 32]
        [--steps 10] [--remat] [--peak-tflops 989]    # on a GPU / TPU host
    .venv/bin/python bench/mfu.py --small             # a CPU-sized smoke run

A randomly initialised XLM-RoBERTa-base shape (12 layers, hidden 768, 12 heads, FFN 3072,
250,002-token vocabulary: ~278M parameters), every row a full ``--length`` tokens, so
real and computed tokens are the same. Two measurements on all local devices (data
parallel):

- the train step (`jaxembed.train.TrainStep`: queries and passages of ``--length`` tokens,
  in-batch InfoNCE, AdamW, dropout on), FLOPs = 3x forward;
- encoding (the jitted forward + mean pooling of `jaxembed.Encoder`), FLOPs = forward.

Forward FLOPs count 2 per weight per token in the layers plus attention's 4·L·d per token
per layer (embeddings, pooling, loss and optimizer are left out, as MFU conventions do).
MFU is against the matmul peak measured here in the same dtype (a large square matmul,
best of 10) and, with ``--peak-tflops``, against the vendor's dense peak per device
(H100 SXM bf16: 989).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from train_throughput import matmul_peak, row_flops  # this folder's shared FLOP helpers

XLMR_BASE = dict(
    model_type="xlm-roberta",
    vocab_size=250_002,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    pad_token_id=1,
    add_pooling_layer=False,
)
SMALL = dict(
    XLMR_BASE,
    vocab_size=8_000,
    num_hidden_layers=2,
    hidden_size=256,
    num_attention_heads=4,
    intermediate_size=1024,
)


def timed(fn, steps: int) -> float:
    """Seconds per call, best of ``steps`` calls after one warm-up (compilation) call."""
    fn()
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="global batch (pairs per step)")
    p.add_argument("--encode-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", action="store_true", help="recompute layers in the backward")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="vendor peak per device")
    p.add_argument("--small", action="store_true", help="a 2-layer model, length 64 (CPU)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxembed import config as config_lib
    from jaxembed import sharding, train, train_state
    from jaxembed.data import pipeline
    from jaxembed.models.bert import BertConfig, BertModel
    from jaxembed.models.pooling import pool

    if args.small:
        args.length, args.batch, args.encode_batch = 64, 8, 16
    cfg = BertConfig(**(SMALL if args.small else XLMR_BASE))
    dtype = jnp.dtype(args.dtype)
    n_dev = jax.device_count()
    print(f"{n_dev} x {jax.devices()[0].device_kind}, {args.dtype}, length {args.length}")
    peak = matmul_peak(2048 if args.small else 8192, dtype=args.dtype)

    c = config_lib.default_config()
    c.model.dtype, c.model.remat = args.dtype, args.remat
    c.train.global_batch, c.train.steps, c.train.dropout = args.batch, 1000, True
    c.data.num_negatives.retrieval = 0
    c.optim.warmup_steps = 0
    c = config_lib.validate(c)
    mesh = sharding.make_mesh()
    model = BertModel(cfg, dtype=dtype, remat=args.remat, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tx, schedule = train_state.make_optimizer(c.optim, c.train.steps)
    graphdef, state, sh = train_state.create_state(model, c, mesh, tx)
    step = train.TrainStep(graphdef, c, mesh, tx, schedule, sh, "mean")

    rng = np.random.default_rng(0)
    b, length = args.batch, args.length

    def texts(rows):
        return rng.integers(5, cfg.vocab_size, (rows, length)).tolist()

    host = {
        "query": texts(b),
        "pos": texts(b),
        "neg": [],
        "neg_valid": np.zeros((b, 0), bool),
        "pos_hash": np.arange(b, dtype=np.int32),
        "neg_hash": np.zeros((b, 0), np.int32),
        "pad_id": 0,
    }
    packing = pipeline.Packing((length,), (length,), granule=1, num_segments=1)
    batch = sharding.shard_batch(packing.pack_local(host), mesh)
    holder = {"state": state}

    def train_step():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    t_train = timed(train_step, args.steps)
    train_flops = 3 * 2 * row_flops(cfg, b, length)  # queries and passages

    eb = args.encode_batch
    enc_ids = sharding.shard_batch(
        {"i": np.asarray(texts(eb), np.int32), "m": np.ones((eb, length), np.int32)}, mesh
    )
    model_params = holder["state"].params["model"]

    @jax.jit
    def encode(p, i, m):
        h = nnx.merge(graphdef, p)(i, m)
        return pool(h, m, "mean", attention_mask=m)

    t_enc = timed(
        lambda: encode(model_params, enc_ids["i"], enc_ids["m"]).block_until_ready(), args.steps
    )
    enc_flops = row_flops(cfg, eb, length)

    print(
        f"{params / 1e6:.0f}M parameters; measured {args.dtype} matmul peak "
        f"{peak / 1e12:.1f} TFLOP/s per device"
    )
    head = "| what | tokens/s | TFLOP/s (all devices) | MFU (measured peak) |"
    if args.peak_tflops:
        head += " MFU (vendor peak) |"
    print()
    print(head)
    print("|---|---:|---:|---:|" + ("---:|" if args.peak_tflops else ""))
    for what, seconds, flops, tokens in (
        (f"train step, batch {b} pairs", t_train, train_flops, 2 * b * length),
        (f"encode, batch {eb}", t_enc, enc_flops, eb * length),
    ):
        rate = flops / seconds
        row = (
            f"| {what} | {tokens / seconds:,.0f} | {rate / 1e12:.2f} | "
            f"{rate / (peak * n_dev):.1%} |"
        )
        if args.peak_tflops:
            row += f" {rate / (args.peak_tflops * 1e12 * n_dev):.1%} |"
        print(row)


if __name__ == "__main__":
    main()
