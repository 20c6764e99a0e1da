"""The one attention function: every implementation that runs on CPU (ours, JAX's
`dot_product_attention` as the cuDNN path calls it, Pallas splash in interpret mode) equals
a plain NumPy reference for padding, packing, causal and windowed masks, gradients too."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
# mode is the slow part of this file).
SKIP = ("splash", "padding")
PAIRS = [(i, c) for i in ("xla", "cudnn", "splash") for c in CASES if (i, c) != SKIP]


@pytest.mark.parametrize(("impl", "case"), PAIRS)
def test_implementations_equal_the_reference(impl, case, monkeypatch):
    monkeypatch.setattr(attn, "CUDNN_IMPLEMENTATION", "xla")  # JAX's own path on CPU
    c = CASES[case]
    q, k, v, mask, segments = inputs(c["packed"])
    f = attention_fn(impl, mask, segments, c["causal"], c["window"])
    real = real_queries(mask, segments)
    want = reference(q, k, v, mask, segments, c["causal"], c["window"], D**-0.5)
    got = np.asarray(jax.jit(f)(q, k, v))
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)
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
            np.testing.assert_allclose(g, r, atol=1e-5, err_msg=name)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_auto_picks_per_platform_and_says_what_it_leaves_out():
    assert attn.resolve("auto", 512, "bfloat16", "cpu") == "xla"
    assert attn.resolve("auto", 512, "bfloat16", "gpu") == "cudnn"
    assert attn.resolve("auto", 512, "float32", "gpu") == "xla"  # cuDNN: half precision only
    assert attn.resolve("auto", 512, "float32", "tpu") == "splash"
    assert attn.resolve("auto", 500, "float32", "tpu") == "xla"  # splash: multiples of 128
    assert attn.resolve("xla", 512, "bfloat16", "gpu") == "xla"
    assert attn.resolve("auto", 512, "bfloat16", "gpu", softcap=30.0) == "xla"  # needs scores
    with pytest.raises(ValueError, match=r"model.attention='flash' is not allowed"):
        attn.resolve("flash", 512)
    line = attn.describe("auto", 512, dropout_rate=0.1, dtype="bfloat16", platform="gpu")
    assert line == (
        "attention: cudnn (auto on gpu); the fused kernel applies no attention dropout "
        "(the model's 0.1)"
    )
    assert attn.describe("auto", 512, 0.1, "bfloat16", "cpu") == "attention: xla (auto on cpu)"


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
BACKBONE_CASES = {
    "bert": ("cudnn", "splash"),
    "qwen3 (causal)": ("cudnn",),
    "modernbert (window)": ("splash",),
    "gemma3 (causal window, softcap)": ("splash",),  # cuDNN takes no soft-cap
    "embeddinggemma (window)": ("cudnn",),
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
        m.attention = impl
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
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want), strict=True
        ):
            where = f"{impl} {jax.tree_util.keystr(path)} (scale {scale:.3g})"
            np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0, err_msg=where)


def test_cudnn_refuses_a_soft_cap():
    q = jnp.zeros((1, 128, 2, 8))
    mask = attn.Mask.of(jnp.ones((1, 128)), impl="cudnn")
    with pytest.raises(ValueError, match="cuDNN attention takes no logit soft-cap"):
        attn.attention(q, q, q, mask, scale=1.0, softcap=30.0)
