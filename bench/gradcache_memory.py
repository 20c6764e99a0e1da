"""Step time and peak memory of the train step, with and without GradCache, by global batch.

    .venv/bin/python bench/gradcache_memory.py [--batches 64,1024] [--chunk 32]

Each configuration runs in its own process (peak RSS is per process). Columns: XLA's
temporary buffer size for the compiled step (the activation memory GradCache bounds),
the process's peak resident memory, and the mean time of the steps after the first.
The model is a tiny random BERT (2 layers, hidden 128), queries of 16 tokens, positives
and one hard negative of 64 tokens, dropout on, one CPU device.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(batch: int, gradcache: bool, chunk: int, steps: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxembed import config as config_lib
    from jaxembed import sharding
    from jaxembed import step as step_lib
    from jaxembed.data import pipeline
    from jaxembed.models.bert import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=8192,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
        add_pooling_layer=False,
    )
    c = config_lib.default_config()
    c.train.global_batch, c.train.gradcache, c.train.gradcache_chunk = batch, gradcache, chunk
    c.train.steps = steps
    config_lib.validate(c)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = BertModel(cfg, rngs=nnx.Rngs(0))
    step = step_lib.make_step(c, mesh, model)
    state = step.init(model)
    rng = np.random.default_rng(0)
    lq, lp, k = 16, 64, 1

    def texts(n, length):
        return rng.integers(1, cfg.vocab_size, (n, length)).tolist()

    host = dict(
        query=texts(batch, lq),
        pos=texts(batch, lp),
        neg=texts(batch * k, lp),
        neg_valid=np.ones((batch, k), bool),
        pos_hash=np.arange(batch, dtype=np.int32),
        neg_hash=np.arange(batch, 2 * batch, dtype=np.int32).reshape(batch, k),
        pad_id=0,
    )
    packing = pipeline.Packing((lq,), (lp,), granule=1, num_segments=1)  # one text per row
    data = sharding.shard_batch(packing.pack_local(host), mesh)
    compiled = step.jitted("retrieval").lower(state, data).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    return {
        "batch": batch,
        "gradcache": gradcache,
        "xla_temp_mib": temp_bytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": sum(times[1:]) / max(len(times) - 1, 1),
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,1024", help="comma-separated global batches")
    parser.add_argument("--chunk", type=int, default=32, help="GradCache chunk (rows)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, gc = args.child.split(",")
        print(json.dumps(run_one(int(batch), gc == "1", args.chunk, args.steps)))
        return
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for gc in (False, True):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--child={batch},{int(gc)}",
                    f"--chunk={args.chunk}",
                    f"--steps={args.steps}",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"batch {batch} gradcache={gc} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"  done: batch {batch} gradcache={gc}: {r['step_s']:.2f} s/step", file=sys.stderr
            )
    print("\n| global batch | GradCache | XLA temp (MiB) | peak RSS (MiB) | step (s) |")
    print("|---:|:---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {'on' if r['gradcache'] else 'off'} | {r['xla_temp_mib']:.0f} "
            f"| {r['peak_rss_mib']:.0f} | {r['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
