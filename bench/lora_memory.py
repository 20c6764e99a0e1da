"""What LoRA saves: trainable parameters, optimizer state, checkpoint size and step time.

    .venv/bin/python bench/lora_memory.py [--steps 6]

Rows: full fine-tuning vs LoRA (rank 8 / 16, alpha 2*rank) on the attention projections
and on every linear layer.
- all-MiniLM-L6-v2 (real weights): a step-1 checkpoint is written and measured, and the
  mean time of a train step (batch 32, queries 32 tokens, positives 128, one CPU device)
  after the first.
- Qwen3-0.6B's shape (built abstractly, nothing allocated): parameter, optimizer-state
  and per-step-checkpoint bytes, what decides whether it fits a small GPU.
Optimizer state is AdamW's two moments per trainable parameter (fp32); the frozen base
weights are read by the step as an argument of their own and never enter it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from jaxembed import checkpoint, hf, sharding, train_state
from jaxembed import config as config_lib
from jaxembed import step as step_lib
from jaxembed.data import pipeline
from jaxembed.models.lora import LoRASpec
from jaxembed.models.qwen3 import Qwen3Config, Qwen3Model
from jaxembed.trained_model import with_adapters

BERT_ATTN, BERT_ALL = (
    ("query", "key", "value", "attention.output.dense"),
    ("dense", "query", "key", "value"),
)
QWEN_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
QWEN_ALL = (*QWEN_ATTN, "gate_proj", "up_proj", "down_proj")


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def variants(attn, every):
    yield "full fine-tuning", None
    for rank in (8, 16):
        yield f"LoRA r={rank} attention", LoRASpec(rank, 2.0 * rank, targets=attn)
        yield f"LoRA r={rank} all linear", LoRASpec(rank, 2.0 * rank, targets=every)


def config(steps: int):
    c = config_lib.default_config()
    c.train.global_batch, c.train.steps, c.train.dropout = 32, steps, False
    c.optim.warmup_steps = 0
    return config_lib.validate(c)


def host_batch(vocab: int, b: int = 32, lq: int = 32, lp: int = 128) -> dict:
    rng = np.random.default_rng(0)
    return dict(
        query=rng.integers(1000, vocab, (b, lq)).tolist(),
        pos=rng.integers(1000, vocab, (b, lp)).tolist(),
        neg=[],
        neg_valid=np.ones((b, 0), bool),
        pos_hash=np.arange(b, dtype=np.int32),
        neg_hash=np.zeros((b, 0), np.int32),
        pad_id=np.int32(0),
    )


def minilm_row(name, spec, steps: int) -> dict:
    from helpers import minilm_path

    c = config(steps)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = with_adapters(hf.load_model(minilm_path()), spec)
    step = step_lib.make_step(c, mesh, model)
    state, frozen = step.init(model), step.frozen(model)
    batch = pipeline.Packing((32,), (128,), 1, 1).pack_local(host_batch(30522))
    batch = sharding.shard_batch(batch, mesh)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, "retrieval", frozen)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        mngr = checkpoint.manager(Path(d), async_save=False)
        checkpoint.save(mngr, 1, state, {"next_batch": 1}, {"config": "{}"})
        mngr.close()
        ckpt = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    return dict(
        name=name,
        trainable=nbytes(state.params),
        optimizer=nbytes(state.opt_state),
        frozen=nbytes(frozen) if frozen is not None else 0,
        checkpoint=ckpt,
        step_s=float(np.mean(times[1:])),
    )


def qwen_row(name, spec) -> dict:
    cfg = Qwen3Config(
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
    )
    c = config(10)
    tx, _ = train_state.make_optimizer(c.optim, c.train.steps)
    model = nnx.eval_shape(lambda: with_adapters(Qwen3Model(cfg, rngs=nnx.Rngs(0)), spec))
    _, _, params = train_state.init_params(model, c)
    opt = jax.eval_shape(tx.init, params)
    return dict(
        name=name,
        trainable=nbytes(params),
        optimizer=nbytes(opt),
        frozen=nbytes(nnx.state(model)) - nbytes(params) if spec else 0,
        checkpoint=nbytes(params) + nbytes(opt),
        step_s=float("nan"),
    )


def table(title: str, rows: list[dict]) -> None:
    mb = 1e6
    print(f"\n{title}")
    print("| variant | trainable MB | optimizer state MB | frozen MB | checkpoint MB | step s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['trainable'] / mb:.2f} | {r['optimizer'] / mb:.2f} | "
            f"{r['frozen'] / mb:.1f} | {r['checkpoint'] / mb:.2f} | {r['step_s']:.3f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    rows = [minilm_row(n, s, args.steps) for n, s in variants(BERT_ATTN, BERT_ALL)]
    table("all-MiniLM-L6-v2 (22.7M parameters; checkpoint written by Orbax)", rows)
    rows = [qwen_row(n, s) for n, s in variants(QWEN_ATTN, QWEN_ALL)]
    table("Qwen3-0.6B shape (abstract; checkpoint = trainable + optimizer state)", rows)


if __name__ == "__main__":
    main()
