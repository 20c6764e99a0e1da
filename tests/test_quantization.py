"""`jaxembed.quantization`: deployed codes equal sentence-transformers', search against a
float64 reference, straight-through codes and gradients, the quantized loss against the
float64 loss reference, and its place in a run's loss (`losses.make_loss`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from test_losses import make_batch, reference

from jaxembed import config as config_lib
from jaxembed import losses, quantization


def test_deployed_codes_are_sentence_transformers():
    from sentence_transformers.util.quantization import quantize_embeddings

    x = np.random.default_rng(0).normal(size=(50, 24)).astype(np.float32)
    np.testing.assert_array_equal(
        quantization.quantize(x, "binary"), quantize_embeddings(x, precision="ubinary")
    )
    ranges = quantization.int8_ranges(x[:30])  # values outside the ranges: clipped
    np.testing.assert_array_equal(
        quantization.quantize(x, "int8", ranges),
        quantize_embeddings(x, precision="uint8", ranges=ranges),
    )
    with pytest.raises(ValueError, match="int8 quantization needs ranges"):
        quantization.quantize(x, "int8")
    with pytest.raises(ValueError, match=r"calibration set; got \(1, 24\)"):
        quantization.int8_ranges(x[:1])


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties: lower index first."""
    idx = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((idx, -scores), axis=-1)[:, :k]


@pytest.mark.parametrize("mode", ["binary", "int8"])
def test_search_is_the_index_ranking_then_float_rescoring(mode):
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(300, 16))  # D=16: the binary index has many ties
    queries = rng.normal(size=(9, 16))
    # float32 unit vectors, as encoders give them; codes are taken in float32 as deployed.
    docs = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    if mode == "binary":
        stored = np.where(docs > 0, 1.0, -1.0)
        index = np.where(queries > 0, 1.0, -1.0) @ stored.T
    else:
        ranges = quantization.int8_ranges(docs)
        step = (ranges[1] - ranges[0]) / np.float32(255)
        codes = lambda x: np.clip(np.floor((x - ranges[0]) / step), 0, 255)  # noqa: E731
        stored = ranges[0].astype(np.float64) + step * codes(docs)
        index = codes(queries).astype(np.float64) @ codes(docs).T  # integers: exact
    k = 10
    _, got = quantization.search(queries, docs, k, mode, rescore_multiplier=0)
    np.testing.assert_array_equal(got, _ranked(index, k))
    cand = _ranked(index, 4 * k)
    rescored = np.einsum("qd,qkd->qk", queries.astype(np.float64), stored[cand])
    best = np.argsort(-rescored, axis=1, kind="stable")[:, :k]
    scores, got = quantization.search(queries, docs, k, mode)
    np.testing.assert_array_equal(got, np.take_along_axis(cand, best, 1))
    assert_close(scores, np.take_along_axis(rescored, best, 1))


def test_straight_through_codes_forward_identity_backward():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 16)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(6, 16)), jnp.float32)
    b = quantization.straight_through(x, "binary")
    np.testing.assert_array_equal(b, np.where(x > 0, 1.0, -1.0))

    def unit_rms(x):
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))

    got = jax.grad(lambda x: jnp.sum(w * quantization.straight_through(x, "binary")))(x)
    assert_close(got, jax.grad(lambda x: jnp.sum(w * unit_rms(x)))(x))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(200, 16)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(5).normal(size=(200, 16)), jnp.float32)
    ranges = jnp.asarray(quantization.int8_ranges(np.asarray(x)))
    c = quantization.straight_through(x, "int8", ranges)
    step = (ranges[1] - ranges[0]) / 255
    np.testing.assert_array_equal(c, jnp.clip(jnp.floor((x - ranges[0]) / step), 0, 255))
    # The deployed codes (NumPy) may round a value on a bucket's edge the other way (XLA's
    # division differs in the last bit): the maxima, (max - min) / step = 255, often do.
    deployed = quantization.int8_codes(np.asarray(x), np.asarray(ranges))
    assert np.abs(np.asarray(c) - deployed).max() <= 1 and (c == deployed).mean() > 0.95
    got = jax.grad(lambda x: jnp.sum(w * quantization.straight_through(x, "int8", ranges)))(x)
    assert_close(got, w * 255 / (ranges[1] - ranges[0]))


@pytest.mark.parametrize("mode", ["binary", "int8"])
def test_quantized_loss_is_the_float_loss_plus_the_loss_of_the_codes(mode):
    """Against the float64 reference of `test_losses`, with padded negatives (left out of
    the int8 ranges) and false-negative masking."""
    bt = make_batch(seed=5)
    q, p, n, mask = bt["q"], bt["p"], bt["n"], bt["neg_mask"]
    n = np.where(mask[..., None], n, 0.0)  # padded negatives are zeros
    kw = dict(neg_mask=mask, pos_hash=bt["pos_hash"], neg_hash=bt["neg_hash"])
    fn = quantization.with_quantization(losses.retrieval_loss, mode, 0.5)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, p, n)]
    got = fn(*f32, temperature=0.05, **{k: jnp.asarray(v) for k, v in kw.items()})
    if mode == "binary":
        coded = [np.where(x > 0, 1.0, -1.0) for x in (q, p, n)]
    else:
        real = n[mask]
        lo = np.min([q.min(0), p.min(0), real.min(0)], axis=0)
        hi = np.max([q.max(0), p.max(0), real.max(0)], axis=0)
        ranges = quantization.batch_ranges(*f32, jnp.asarray(mask))
        assert_close(ranges, np.stack([lo, hi]))
        # The codes themselves: test_straight_through_codes_forward_identity_backward.
        st = quantization.straight_through
        coded = [np.asarray(st(x, "int8", ranges), np.float64) for x in f32]
    want = reference("retrieval", q, p, n, 0.05, **kw).mean()
    want += 0.5 * reference("retrieval", *coded, 0.05, **kw).mean()
    assert_close(got, want)
    grads = jax.grad(lambda *e: fn(*e, temperature=0.05, **kw), argnums=(0, 1, 2))(*f32)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_a_runs_loss_quantizes_each_matryoshka_prefix():
    c = config_lib.default_config()
    c.loss.quantization, c.loss.quantization_weight = "binary", 2.0
    c.loss.matryoshka_dims = (16, 8)
    bt = make_batch(seed=6, d=16)
    q, p, n, mask = (jnp.asarray(bt[k]) for k in ("q", "p", "n", "neg_mask"))
    got = losses.make_loss(c.loss, "retrieval")(
        q, p, n, temperature=0.05, neg_mask=mask, pos_hash=jnp.asarray(bt["pos_hash"]),
        neg_hash=jnp.asarray(bt["neg_hash"]), teacher=None,
    )  # fmt: skip
    kw = dict(neg_mask=bt["neg_mask"], pos_hash=bt["pos_hash"], neg_hash=bt["neg_hash"])
    want = 0.0
    for d in (16, 8):
        cut = [np.asarray(bt[k])[..., :d] for k in ("q", "p", "n")]
        want += reference("retrieval", *cut, 0.05, **kw).mean()
        signs = [np.where(x > 0, 1.0, -1.0) for x in cut]
        want += 2.0 * reference("retrieval", *signs, 0.05, **kw).mean()
    assert_close(got, want)
    c.loss.quantization = "ternary"
    with pytest.raises(ValueError, match=r"quantization='ternary' is not allowed"):
        config_lib.validate(c)
