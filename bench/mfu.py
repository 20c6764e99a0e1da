"""The one-command device check: model FLOP utilisation, fused vs XLA attention, memory.

    .venv/bin/python bench/mfu.py                      # on a GPU / TPU host, < 5 minutes
    .venv/bin/python bench/mfu.py --small              # a CPU-sized smoke run (this machine)

On a device image without grain / ml_collections, carry their wheels (README,
"Running on GPUs and TPUs"). Randomly initialised models of real shapes, bf16 compute with fp32
master weights (and fp32 softmax, logits and loss), on all local devices, data parallel:

- XLM-R-base (278M) train step at ``--length`` 512: full-length rows, and packed rows
  (texts of 32..length tokens, several per row, attention within each text);
- Qwen3-0.6B train step at ``--long-length`` 1024 with remat (causal, grouped-query heads);
- XLM-R-base encoding (forward + mean pooling) at ``--length``.

Each case runs with the platform's fused attention asked for by name (``cudnn`` on GPU,
``splash`` on TPU; CPU has none) and with ``xla``, side by side. Printed per case: seconds
per step, tokens/s, model TFLOP/s (real: each text's own tokens and attention; for full
rows real = computed), MFU against the matmul peak measured here in bf16 and against the
vendor's dense bf16 peak (the device kind's data sheet, named in the first line, or
``--peak-tflops``), and the step's temporary memory from XLA's compiled-memory analysis.
Forward FLOPs: 2 per layer weight per token, plus attention's 4·n·heads·head_dim per token
per layer for a text of n tokens (half when causal); training = 3x forward.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from train_throughput import matmul_peak  # this folder's shared matmul-peak helper

XLMR_BASE = dict(
    model_type="xlm-roberta", vocab_size=250_002, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
    pad_token_id=1, add_pooling_layer=False,
)  # fmt: skip
QWEN3_06B = dict(
    vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
)  # fmt: skip
SMALL = {  # --small: the same code paths at CPU sizes
    "bert": dict(XLMR_BASE, vocab_size=8000, num_hidden_layers=2, hidden_size=256,
                 num_attention_heads=4, intermediate_size=1024),
    "qwen3": dict(QWEN3_06B, vocab_size=8000, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}  # fmt: skip
# Dense bf16 peak per device, TFLOP/s (vendor data sheets: NVIDIA's figures with sparsity
# halved; Google Cloud's TPU pages), by jax's device_kind exactly: an H100 PCIe (756) or
# NVL (835) is not an SXM (989), and a v5p reports "TPU v5" (older JAX "TPU v5p").
VENDOR_PEAK = {
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L4": 121.0, "NVIDIA L40S": 362.0, "NVIDIA B200": 2250.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0,
    "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}  # fmt: skip
FUSED = {"gpu": "cudnn", "tpu": "splash"}  # each platform's fused attention, by name


def vendor_peak(kind: str, given: float = 0.0) -> tuple[float, str]:
    """(dense bf16 TFLOP/s per device, where the figure comes from) for a device_kind."""
    if given:
        return given, "--peak-tflops"
    if kind in VENDOR_PEAK:
        return VENDOR_PEAK[kind], f"data sheet of {kind!r}"
    return 0.0, f"unknown device kind {kind!r}: pass --peak-tflops"


def timed(fn, steps: int) -> float:
    """Seconds per call, best of ``steps`` calls after one warm-up (compilation) call."""
    fn()
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def forward_flops(model, lengths, causal: bool) -> float:
    """Forward FLOPs of ``model``'s layers on texts of ``lengths`` tokens, each text
    attending to itself only (2 per layer weight per token + attention)."""
    import jax
    from flax import nnx

    cfg = model.config
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    embeds = sum(x.size for p, x in leaves if "embed" in jax.tree_util.keystr(p))
    layer_weights = sum(x.size for _, x in leaves) - embeds
    heads, head_dim = cfg.num_attention_heads, getattr(cfg, "head_dim", None)
    width = heads * (head_dim or cfg.hidden_size // heads)
    n = np.asarray(lengths, np.float64)
    attn = 4 * n * n * width * cfg.num_hidden_layers * (0.5 if causal else 1.0)
    return float(np.sum(2 * layer_weights * n + attn))


def text_lengths(rng, count: int, length: int, packed: bool) -> list[int]:
    return list(rng.integers(32, length + 1, count)) if packed else [length] * count


def train_case(make, family: str, args, length: int, batch: int, packed: bool, impl: str):
    """(seconds per step, real FLOPs, computed FLOPs, tokens, temporary bytes) of one step
    of a fresh ``make()`` model (the step donates, so each case builds its own)."""
    import jax

    from jaxembed import config as config_lib
    from jaxembed import sharding
    from jaxembed import step as step_lib

    c = config_lib.default_config()
    c.model.dtype, c.model.remat, c.model.attention = args.dtype, family == "qwen3", impl
    c.train.global_batch, c.train.steps, c.train.dropout = batch, 1000, True
    c.train.packing = packed
    c.data.max_query_length = c.data.max_passage_length = length
    c.data.query_buckets = c.data.passage_buckets = (length,)
    c.data.num_negatives.retrieval = 0
    c.optim.warmup_steps = 0
    c = config_lib.validate(c)
    mesh = sharding.make_mesh()
    model = make()
    model.attention = impl
    pooling = "lasttoken" if family == "qwen3" else "mean"
    step = step_lib.make_step(c, mesh, model, pooling=pooling)
    state = step.init(model)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    lengths = {t: text_lengths(rng, batch, length, packed) for t in ("query", "pos")}
    host = {t: [list(rng.integers(5, vocab, n)) for n in lengths[t]] for t in lengths}
    no_negatives = np.zeros((batch, 0), np.int32)
    host.update(neg=[], neg_valid=no_negatives.astype(bool), neg_hash=no_negatives, pad_id=0)
    host["pos_hash"] = np.arange(batch, dtype=np.int32)
    rows = step_lib.row_packing(c, mesh).pack_local(host)
    batch_arrays = sharding.shard_batch(rows, mesh)
    memory = step.jitted("retrieval").lower(state, batch_arrays, None).compile().memory_analysis()
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch_arrays)
        jax.block_until_ready(metrics["loss"])

    seconds = timed(run, args.steps)
    causal = family == "qwen3"
    texts = lengths["query"] + lengths["pos"]
    real = 3 * forward_flops(model, texts, causal)
    row_count = rows["query_ids"].shape[0] + rows["pos_ids"].shape[0]
    computed = 3 * forward_flops(model, [length] * row_count, causal)
    return seconds, real, computed, sum(texts), memory.temp_size_in_bytes


def encode_case(make, args, length: int, batch: int, impl: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxembed import sharding
    from jaxembed.models.pooling import pool

    model = make()
    model.attention = impl
    graphdef, params = nnx.split(model)
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(1)
    ids = rng.integers(5, model.config.vocab_size, (batch, length)).astype(np.int32)
    arrays = sharding.shard_batch({"i": ids, "m": np.ones_like(ids)}, mesh)

    @jax.jit
    def encode(p, i, m):
        return pool(nnx.merge(graphdef, p)(i, m), m, "mean", attention_mask=m)

    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(args.dtype)), params)
    memory = encode.lower(params, arrays["i"], arrays["m"]).compile().memory_analysis()
    seconds = timed(
        lambda: encode(params, arrays["i"], arrays["m"]).block_until_ready(), args.steps
    )
    flops = forward_flops(model, [length] * batch, causal=False)
    return seconds, flops, flops, batch * length, memory.temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--long-length", type=int, default=1024, help="the Qwen3 case's length")
    p.add_argument("--batch", type=int, default=32, help="XLM-R pairs per device")
    p.add_argument("--long-batch", type=int, default=8, help="Qwen3 pairs per device")
    p.add_argument("--encode-batch", type=int, default=256, help="texts per device")
    p.add_argument("--steps", type=int, default=5, help="timed calls per case (best kept)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="vendor peak per device")
    p.add_argument("--small", action="store_true", help="2-layer models, short rows (CPU)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxembed.models.bert import BertConfig, BertModel
    from jaxembed.models.qwen3 import Qwen3Config, Qwen3Model

    if args.small:
        args.length, args.long_length, args.batch, args.long_batch = 128, 128, 4, 2
        args.encode_batch, args.steps = 8, 2
    n_dev = jax.device_count()
    kind = jax.devices()[0].device_kind
    vendor, source = vendor_peak(kind, args.peak_tflops)
    peak = matmul_peak(2048 if args.small else 8192, dtype=args.dtype)
    print(f"{n_dev} x {kind}, {args.dtype}; measured matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"per device; vendor peak {vendor or '?'} TFLOP/s ({source})")  # fmt: skip
    dtype = jnp.dtype(args.dtype)
    bert_cfg = BertConfig(**(SMALL["bert"] if args.small else XLMR_BASE))
    qwen_cfg = Qwen3Config(**(SMALL["qwen3"] if args.small else QWEN3_06B))

    def xlmr():
        return BertModel(bert_cfg, dtype=dtype, rngs=nnx.Rngs(0))

    def qwen():
        return Qwen3Model(qwen_cfg, dtype=dtype, remat=True, rngs=nnx.Rngs(0))

    L, LL = args.length, args.long_length
    cases = [
        (f"XLM-R-base train, {L} full rows", lambda i: train_case(
            xlmr, "bert", args, L, args.batch * n_dev, False, i)),
        (f"XLM-R-base train, {L} packed", lambda i: train_case(
            xlmr, "bert", args, L, args.batch * n_dev, True, i)),
        (f"Qwen3-0.6B train, {LL} full rows, remat", lambda i: train_case(
            qwen, "qwen3", args, LL, args.long_batch * n_dev, False, i)),
        (f"XLM-R-base encode, {L}", lambda i: encode_case(
            xlmr, args, L, args.encode_batch * n_dev, i)),
    ]  # fmt: skip
    fused = FUSED.get(jax.default_backend(), "xla")
    head = ("| case | attention | s/step | tokens/s | TFLOP/s real (computed) | "
            "MFU measured peak | MFU vendor peak | temp memory |")  # fmt: skip
    print(f"\n{head}\n|---|---|---:|---:|---:|---:|---:|---:|")
    for name, run in cases:
        results = {}
        for impl in dict.fromkeys((fused, "xla")):
            seconds, real, computed, tokens, temp = run(impl)
            results[impl] = seconds, temp
            rate = real / seconds
            mfu_vendor = f"{rate / (vendor * 1e12 * n_dev):.1%}" if vendor else "-"
            print(f"| {name} | {impl} | {seconds:.3f} | {tokens / seconds:,.0f} | "
                  f"{rate / 1e12:.1f} ({computed / seconds / 1e12:.1f}) | "
                  f"{rate / (peak * n_dev):.1%} | {mfu_vendor} | {temp / 2**30:.2f} GiB |",
                  flush=True)  # fmt: skip
        if len(results) == 2:
            (s_f, m_f), (s_x, m_x) = results[fused], results["xla"]
            print(f"| {name}: {fused} vs xla | | {s_x / s_f:.2f}x faster | | | | | "
                  f"{m_f / max(m_x, 1):.2f}x the memory |")  # fmt: skip


if __name__ == "__main__":
    main()
