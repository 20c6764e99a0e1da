"""The one attention function: every implementation that runs on CPU (ours, JAX's
`dot_product_attention` as the cuDNN path calls it, Pallas splash in interpret mode) equals
a plain NumPy reference for padding, packing, causal and windowed masks, gradients too."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from jaxembed.models import attention as attn

B, L, NQ, NKV, D = 2, 128, 4, 2, 16
LENGTHS = (100, 37)  # real tokens per unpacked row
SEGMENTS = np.zeros((B, L), np.int32)  # packed rows: texts 1, 2, 3 then padding
SEGMENTS[0, :50], SEGMENTS[0, 50:90], SEGMENTS[0, 90:120] = 1, 2, 3
SEGMENTS[1, :64], SEGMENTS[1, 64:127] = 1, 2

CASES = {
    "padding": dict(packed=False, causal=False, window=None),
    "packing": dict(packed=True, causal=False, window=None),
    "causal": dict(packed=False, causal=True, window=None),
    "packed causal window": dict(packed=True, causal=True, window=(7, 0)),
    "packed window": dict(packed=True, causal=False, window=(5, 5)),
}


def inputs(packed: bool):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, L, n, D)).astype(np.float32) for n in (NQ, NKV, NKV))
    if packed:
        return q, k, v, np.ones((B, L)), SEGMENTS
    mask = (np.arange(L)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    return q, k, v, mask, None


def reference(q, k, v, mask, segments, causal, window, scale):
    """float64 softmax attention over the allowed keys, written out in NumPy."""
    if segments is not None:  # packed: a query sees its own text
        ok = segments[:, :, None] == segments[:, None, :]
    else:  # padded: every query sees the real tokens
        ok = np.broadcast_to(mask[:, None, :] > 0, (B, L, L))
    i = np.arange(L)
    d = i[:, None] - i[None, :]
    if causal:
        ok = ok & (d >= 0)
    if window is not None:
        ok = ok & (d <= window[0]) & (-d <= window[1])
    kk = np.repeat(k, NQ // NKV, axis=2).astype(np.float64)
    vv = np.repeat(v, NQ // NKV, axis=2).astype(np.float64)
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kk) * scale
    s = np.where(ok[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, vv).reshape(B, L, NQ * D)


def real_queries(mask, segments):
    """Queries whose output is read: real tokens (padding outputs are never pooled)."""
    return (segments > 0) if segments is not None else (mask > 0)


def attention_fn(impl, mask, segments, causal, window):
    """``(q, k, v) -> attention`` through ``impl`` with the mask of these inputs."""

    def f(q, k, v):
        m = attn.Mask.of(jnp.asarray(mask), segments, causal=causal, impl=impl)
        m = m.local(window) if window is not None else m
        return attn.attention(q, k, v, m, scale=D**-0.5)

    return f


# Splash sees padding as segment ids, as "packing" does with the same full mask (interpret
# mode is the slow part of this file). cuDNN has no two-sided window: it refuses it
# (`test_auto_picks_per_target_and_says_why`).
SKIP = (("splash", "padding"), ("cudnn", "packed window"))
PAIRS = [(i, c) for i in ("xla", "cudnn", "splash") for c in CASES if (i, c) not in SKIP]


@pytest.mark.parametrize(("impl", "case"), PAIRS)
def test_implementations_equal_the_reference(impl, case, monkeypatch):
    monkeypatch.setattr(attn, "CUDNN_IMPLEMENTATION", "xla")  # JAX's own path on CPU
    c = CASES[case]
    q, k, v, mask, segments = inputs(c["packed"])
    f = attention_fn(impl, mask, segments, c["causal"], c["window"])
    real = real_queries(mask, segments)
    want = reference(q, k, v, mask, segments, c["causal"], c["window"], D**-0.5)
    got = np.asarray(jax.jit(f)(q, k, v))
    assert_close(got[real], want[real])
    assert np.isfinite(got).all()  # padding queries too: they must not poison gradients

    # Gradients of a weighted sum over the real queries, against the xla path's.
    w = np.random.default_rng(1).normal(size=got.shape).astype(np.float32) * real[..., None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    grads = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    if impl != "xla":
        ref_f = attention_fn("xla", mask, segments, c["causal"], c["window"])
        ref = jax.jit(jax.grad(loss(ref_f), argnums=(0, 1, 2)))(q, k, v)
        for name, g, r in zip("qkv", grads, ref, strict=True):
            assert_close(g, r, what=name)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_auto_picks_per_target_and_says_why():
    """`auto` asks for the platform's fused kernel by name where it takes the call, else XLA
    with the reason; a kernel asked for by name that cannot take the call is an error."""
    padded = attn.Mask.of(jnp.ones((1, 512)))
    two_sided = padded.local((64, 64))
    causal_window = attn.Mask.of(jnp.ones((1, 512)), causal=True).local((63, 63))
    with attn.lowering_for("cpu"):
        assert attn.resolve("auto", padded, 64, 512, "bfloat16") == ("xla", "")
    with attn.lowering_for("gpu"):  # an H100's limits (head sizes up to 256)
        assert attn.resolve("auto", padded, 64, 512, "bfloat16") == ("cudnn", "")
        assert attn.resolve("auto", padded, 256, 512, "bfloat16") == ("cudnn", "")
        assert attn.resolve("auto", causal_window, 64, 512, "bfloat16") == ("cudnn", "")
        refused = [  # (mask, head size, length, dtype, soft-cap): why
            ((padded, 64, 512, "float32", None), "it computes in bf16 / fp16 only, not float32"),
            ((padded, 64, 512, "bfloat16", 30.0), "it takes no logit soft-cap"),
            (
                (padded, 12, 512, "bfloat16", None),
                "head size 12: it takes multiples of 8 up to 256",
            ),
            ((padded, 64, 511, "bfloat16", None), "odd length 511: its backward pass takes even"),
            (
                (two_sided, 64, 512, "bfloat16", None),
                "two-sided window (64, 64): it has left windows",
            ),
        ]
        for args, why in refused:
            chosen, reason = attn.resolve("auto", *args)
            assert chosen == "xla" and reason.startswith(f"cuDNN: {why}"), reason
            with pytest.raises(ValueError, match=re.escape(f"cannot take this attention ({why}")):
                attn.resolve("cudnn", *args)
        assert attn.resolve("xla", padded, 64, 512, "bfloat16") == ("xla", "")
    with attn.lowering_for("gpu", (8, 0)):  # an A100: head sizes up to 128
        assert attn.resolve("auto", padded, 256, 512, "bfloat16")[0] == "xla"
    with attn.lowering_for("tpu"):
        assert attn.resolve("auto", padded, 64, 512, "float32") == ("splash", "")
        assert attn.resolve("auto", padded, 64, 500, "float32") == (
            "xla",
            "splash: length 500 is not a multiple of 128",
        )
        assert attn.resolve("splash", padded, 64, 500, "float32") == ("splash", "")  # padded
    with pytest.raises(ValueError, match=r"model.attention='flash' is not allowed"):
        attn.resolve("flash", padded, 64, 512, "float32")
    with attn.lowering_for("gpu"):
        calls = [("cudnn", "")] * 4 + [
            ("xla", "cuDNN: two-sided window (64, 64): it has left windows only")
        ] * 8
        assert attn.describe("auto", calls, dropout_rate=0.1) == (
            "attention: cudnn in 4 of 12 calls; xla (cuDNN: two-sided window (64, 64): it has "
            "left windows only) in 8 of 12 calls (auto on gpu); the fused kernel applies no "
            "attention dropout (the model's 0.1)"
        )  # fmt: skip
    with attn.lowering_for("cpu"):
        assert attn.describe("auto", [("xla", "")] * 3, 0.1) == "attention: xla (auto on cpu)"


def test_splash_pads_rows_shorter_than_its_blocks():
    """Asked for by name, splash takes rows of 64 tokens (padded to 128, cut after)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(2, 64, n, D)).astype(np.float32) for n in (NQ, NKV, NKV))
    seg = np.zeros((2, 64), np.int32)
    seg[0, :30], seg[0, 30:60], seg[1, :64] = 1, 2, 1
    want = attention_fn("xla", np.ones((2, 64)), seg, False, None)(q, k, v)
    got = attention_fn("splash", np.ones((2, 64)), seg, False, None)(q, k, v)
    assert_close(np.asarray(got)[seg > 0], np.asarray(want)[seg > 0])


def test_splash_runs_per_device_on_a_mesh_like_one_device():
    """Inputs sharded over a (data 2, fsdp 2, tensor 2) mesh: splash runs under shard_map
    (rows over data x fsdp, key/value heads over tensor) and equals the unsharded call,
    values and gradients; 3 rows are padded to the data-parallel size 4."""
    from jaxembed import sharding

    mesh = sharding.make_mesh(2, 2, 2)
    q, k, v, _, _ = inputs(True)
    segments = np.concatenate([SEGMENTS, SEGMENTS])
    q, k, v = (np.concatenate([x, x]) for x in (q, k, v))
    for rows in (4, 3):
        f = attention_fn("splash", np.ones((rows, L)), segments[:rows], False, None)
        real = jnp.asarray(segments[:rows] > 0)[..., None]
        grad = jax.jit(
            jax.value_and_grad(
                lambda q, k, v, f=f, real=real: jnp.sum(f(q, k, v) * real), (0, 1, 2)
            )
        )
        want = grad(q[:rows], k[:rows], v[:rows])
        spec = jax.sharding.PartitionSpec(("data", "fsdp") if rows == 4 else None, None, "tensor")
        shard = jax.sharding.NamedSharding(mesh, spec)
        got = grad(*(jax.device_put(x[:rows], shard) for x in (q, k, v)))
        assert_close(got, want)


# --- every backbone, through its own masks ------------------------------------------------


def tiny_model(name: str):
    from jaxembed.models import bert, gemma3, modernbert, qwen3

    small = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, intermediate_size=37)
    gqa = dict(small, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    two = ("sliding_attention", "full_attention")
    gemma = dict(gqa, layer_types=two, sliding_window=12, query_pre_attn_scalar=8)
    make = {
        "bert": lambda: bert.BertModel(bert.BertConfig(**small, num_attention_heads=4)),
        "qwen3 (causal)": lambda: qwen3.Qwen3Model(qwen3.Qwen3Config(**gqa)),
        "modernbert (window)": lambda: modernbert.ModernBertModel(
            modernbert.ModernBertConfig(
                **small, num_attention_heads=4, layer_types=two, local_attention=16
            )
        ),
        "gemma3 (causal window, softcap)": lambda: gemma3.Gemma3Model(
            gemma3.Gemma3Config(**gemma, attn_logit_softcapping=20.0)
        ),
        "embeddinggemma (window)": lambda: gemma3.Gemma3Model(
            gemma3.Gemma3Config(**gemma, use_bidirectional_attention=True)
        ),
    }
    return make[name]()


# Which fused paths each backbone is checked with: between them every mask (padding,
# causal, windows both ways), GQA and the soft-cap meet both kernels' code paths once.
# "auto on gpu": cuDNN where it takes a layer, XLA for the two-sided windows it has not.
BACKBONE_CASES = {
    "bert": ("cudnn", "splash"),
    "qwen3 (causal)": ("cudnn",),
    "modernbert (window)": ("splash", "auto on gpu"),
    "gemma3 (causal window, softcap)": ("splash",),  # cuDNN takes no soft-cap
    "embeddinggemma (window)": ("auto on gpu",),
}


@pytest.mark.parametrize("name", list(BACKBONE_CASES))
def test_every_backbone_runs_the_fused_paths_like_xla(name, monkeypatch):
    """Packed rows of 128 tokens (three texts and padding): hidden states of the real tokens
    and the parameter gradients equal the xla path's."""
    from flax import nnx

    monkeypatch.setattr(attn, "CUDNN_IMPLEMENTATION", "xla")
    ids = np.random.default_rng(2).integers(3, 99, (B, L)).astype(np.int32)
    real = SEGMENTS > 0
    weights = np.random.default_rng(3).normal(size=(B, L, 1)).astype(np.float32) * real[..., None]
    model = tiny_model(name)
    graphdef, params = nnx.graphdef(model), nnx.state(model)

    def hidden(params, impl):
        m = nnx.merge(graphdef, params)
        m.attention, _, platform = impl.partition(" on ")
        with attn.lowering_for(platform or "cpu"):
            return m(jnp.asarray(ids), jnp.asarray(real), segment_ids=jnp.asarray(SEGMENTS))

    @functools.partial(jax.jit, static_argnums=1)
    def hidden_and_grads(params, impl):  # one compile per implementation
        def loss(params):
            h = hidden(params, impl)
            return jnp.sum(h * weights), h

        return jax.grad(loss, has_aux=True)(params)[::-1]

    want, g_want = hidden_and_grads(params, "xla")
    # The loss sums 8,000 terms: gradients agree to 1e-5 of the largest one (a tensor whose
    # gradient nearly cancels out, like the token-type embedding's, keeps only the summation
    # order's noise at that scale).
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_want))
    for impl in BACKBONE_CASES[name]:
        got, g_got = hidden_and_grads(params, impl)
        assert_close(np.asarray(got)[real], np.asarray(want)[real])
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want), strict=True
        ):
            where = f"{impl} {jax.tree_util.keystr(path)} (scale {scale:.3g})"
            np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0, err_msg=where)
