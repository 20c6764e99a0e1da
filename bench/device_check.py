"""The first minutes on a lent GPU or TPU: does every attention path compile, run the
fused kernel, and agree with XLA? Then `bench/mfu.py`.

    python3 bench/device_check.py              # one table, then mfu.py's (~6 minutes, H200)
    python3 bench/device_check.py --no-mfu     # the table only (~2 minutes; CPU: a smoke run)

On a device image without grain / ml_collections, carry their wheels (README, "Running on
GPUs and TPUs"). For each backbone's masks (BERT padded and packed; ModernBERT's two-sided
windows; Qwen3 causal with grouped-query heads; Gemma3's causal window), dropout on, and
each attention setting (``xla``; the platform's fused kernel by name: ``cudnn`` /
``splash``; ``auto``, compiled only where the kernel refused by name, since elsewhere it is
the same program), on all local devices (data parallel), bf16 compute. On the first H200
each compile took 8-18 s (XLA's GEMM autotuning), so the 30 cases of dropout off and on
and every setting compiled took 6 minutes alone: 11 are kept.

- compile the real loss-and-gradients of the train step and look for the fused kernel in
  the compiled program (``__cudnn$fmha`` / ``tpu_custom_call``), and what `auto` chose;
- run it once and compare the loss and the gradients with ``xla``'s (relative to the
  gradient norm; bf16, so a few 1e-2 is agreement: 1.8-3.1e-2 on the first H200);
- a kernel that refuses a case (cuDNN and two-sided windows) is reported as refused, which
  is the expected answer, not a failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KERNEL = {"gpu": "__cudnn$fmha", "tpu": "tpu_custom_call"}
FUSED = {"gpu": "cudnn", "tpu": "splash"}
LENGTH, ROWS = 256, 16  # tokens per row, pairs per device
# Dropout on, as training runs. No model here has attention-probability dropout, so the
# kernel's choice does not depend on it (XLA would drop probabilities, the kernels cannot).
DROPOUT = True


def backbones(dtype):
    """name -> (model builder, pooling, packed): small models with real head sizes (64)."""
    from flax import nnx

    from jaxembed.models import bert, gemma3, modernbert, qwen3

    small = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, intermediate_size=512)
    gqa = dict(small, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    two = ("sliding_attention", "full_attention")
    plain = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    return {
        "bert, padded": (lambda: bert.BertModel(
            bert.BertConfig(**small, **plain, num_attention_heads=4, max_position_embeddings=512),
            dtype=dtype, rngs=nnx.Rngs(0)), "mean", False),
        "bert, packed": (lambda: bert.BertModel(
            bert.BertConfig(**small, **plain, num_attention_heads=4, max_position_embeddings=512),
            dtype=dtype, rngs=nnx.Rngs(0)), "mean", True),
        "modernbert, two-sided window": (lambda: modernbert.ModernBertModel(
            modernbert.ModernBertConfig(**small, num_attention_heads=4, layer_types=two,
                                        local_attention=64, mlp_dropout=0.1),
            dtype=dtype, rngs=nnx.Rngs(0)), "mean", True),
        "qwen3, causal, GQA": (lambda: qwen3.Qwen3Model(
            qwen3.Qwen3Config(**gqa), dtype=dtype, rngs=nnx.Rngs(0)), "lasttoken", True),
        "gemma3, causal window": (lambda: gemma3.Gemma3Model(
            gemma3.Gemma3Config(**gqa, layer_types=two, sliding_window=64,
                                query_pre_attn_scalar=64),
            dtype=dtype, rngs=nnx.Rngs(0)), "lasttoken", False),
    }  # fmt: skip


def one_case(make, pooling, packed, impl, dropout, mesh, platform):
    """(what auto chose, kernel calls in the compiled program, compile s, run s, loss,
    flat gradients) of the loss-and-gradients, or the refusal's message."""
    import jax

    from jaxembed import config as config_lib
    from jaxembed import sharding
    from jaxembed import step as step_lib
    from jaxembed.models import attention as attention_lib

    c = config_lib.default_config()
    c.model.dtype, c.model.attention = "bfloat16", impl
    c.train.global_batch = ROWS * sharding.data_parallel_size(mesh)
    c.train.packing, c.train.dropout = packed, dropout
    c.data.max_query_length = c.data.max_passage_length = LENGTH
    c.data.query_buckets = c.data.passage_buckets = (LENGTH,)
    c.data.num_negatives.retrieval = 1
    c = config_lib.validate(c)
    model = make()
    model.attention = impl
    step = step_lib.make_step(c, mesh, model, pooling=pooling)
    state = step.init(model)
    fn = step.jitted("retrieval", update=False)
    rng = np.random.default_rng(0)
    b = c.train.global_batch
    lengths = rng.integers(LENGTH // 4, LENGTH + 1, 3 * b) if packed else [LENGTH] * 3 * b
    texts = [rng.integers(5, 1000, n).tolist() for n in lengths]
    host = dict(query=texts[:b], pos=texts[b : 2 * b], neg=texts[2 * b :],
                neg_valid=np.ones((b, 1), bool), pos_hash=np.arange(b, dtype=np.int32),
                neg_hash=np.arange(b, dtype=np.int32)[:, None] + b, pad_id=np.int32(0))  # fmt: skip
    batch = sharding.shard_batch(step_lib.row_packing(c, mesh).pack_local(host), mesh)
    t0 = time.perf_counter()
    try:
        with attention_lib.recording() as calls:
            compiled = fn.lower(state, batch, None).compile()
    except ValueError as e:  # a kernel asked for by name that cannot take the case
        return str(e).split(" (")[1].split(")")[0] if "(" in str(e) else str(e)
    compile_s = time.perf_counter() - t0
    kernel = compiled.as_text().count(KERNEL.get(platform, "\0"))
    t0 = time.perf_counter()
    loss, grads, _ = compiled(state, batch, None)
    loss = float(loss)
    run_s = time.perf_counter() - t0
    flat = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(grads)])
    chosen = attention_lib.describe(impl, calls).removeprefix("attention: ")
    return chosen, kernel, compile_s, run_s, loss, flat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-mfu", action="store_true", help="skip bench/mfu.py after the table")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxembed import sharding

    platform = jax.default_backend()
    mesh = sharding.make_mesh()
    kind = jax.devices()[0].device_kind
    print(f"{jax.device_count()} x {kind} ({platform}), jax {jax.__version__}; rows of "
          f"{LENGTH} tokens, {ROWS} pairs + 1 hard negative per device, bf16")  # fmt: skip
    impls = ["auto", *([FUSED[platform]] if platform in FUSED else []), "xla"]
    fused = FUSED.get(platform)
    head = ("| masks | attention | ran as | kernel calls | compile s | step s | "
            "loss vs xla | grads vs xla |")  # fmt: skip
    print(f"\n{head}\n|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    failures = 0
    for name, (make, pooling, packed) in backbones(jnp.bfloat16).items():
        results = {}
        for impl in reversed(impls):  # xla first: the reference; then the kernel, then auto
            if impl == "auto" and not isinstance(results.get(fused), (str, type(None))):
                # auto asks for the kernel by name wherever it takes the call: one program
                results[impl] = (f"{fused} (as by name)", *results[fused][1:])
                continue
            try:
                results[impl] = one_case(make, pooling, packed, impl, DROPOUT, mesh, platform)
            except Exception as e:  # a crash is the finding: report it, go on
                failures += 1
                results[impl] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        ref = results["xla"]
        for impl in impls:
            r = results[impl]
            if isinstance(r, str):
                print(f"| {name} | {impl} | {r} | | | | | |", flush=True)
                continue
            chosen, kernel, compile_s, run_s, loss, flat = r
            dloss = dgrad = "-"
            if impl != "xla" and not isinstance(ref, str):
                dloss = f"{abs(loss - ref[4]) / max(abs(ref[4]), 1e-6):.1e}"
                dgrad = f"{np.linalg.norm(flat - ref[5]) / np.linalg.norm(ref[5]):.1e}"
            print(f"| {name} | {impl} | {chosen} | {kernel} | {compile_s:.1f} | "
                  f"{run_s:.3f} | {dloss} | {dgrad} |", flush=True)  # fmt: skip
    if not args.no_mfu:
        print(flush=True)
        mfu = subprocess.run([sys.executable, str(Path(__file__).with_name("mfu.py"))])
        failures += mfu.returncode != 0
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
