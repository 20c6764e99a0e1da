"""Tests for jaxembed.losses against an independent NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed import losses, search

B, K, D = 8, 3, 16
LOSSES = {
    "retrieval": losses.retrieval_loss,
    "f2llm": losses.f2llm_retrieval_loss,
    "hard": losses.hard_negative_loss,
}
VARIANTS = [(name, sym) for name in LOSSES for sym in (False, True)]
# Gradients of the symmetric variants run every code path of the forward-only ones;
# hard_negative_loss ignores `symmetric`. Fewer variants keep the gradient compile small.
GRAD_VARIANTS = [("retrieval", True), ("f2llm", True), ("hard", False)]


# ---------------------------------------------------------------------------------------
# Reference: per query, build the candidate list by *dropping* padded and false negatives
# (the library masks logits instead), then -log softmax in float64.
# ---------------------------------------------------------------------------------------


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _nll(target_logit, candidate_logits):
    m = candidate_logits.max()
    return m + np.log(np.exp(candidate_logits - m).sum()) - target_logit


def _ref_in_batch(qn, pn, nn, t, neg_mask, pos_hash, neg_hash, with_negatives):
    """Forward (query -> passages) per-example losses."""
    out = []
    for i in range(len(qn)):
        keep_p = (np.arange(len(pn)) == i) | (pos_hash != pos_hash[i])
        cands = [pn[keep_p]]
        if with_negatives:
            cands.append(nn[neg_mask & (neg_hash != pos_hash[i])])
        logits = np.concatenate(cands) @ qn[i] / t
        out.append(_nll(qn[i] @ pn[i] / t, logits))
    return np.array(out)


def _ref_backward(qn, pn, t, pos_hash):
    """Passage -> queries per-example losses."""
    out = []
    for i in range(len(pn)):
        keep_q = (np.arange(len(qn)) == i) | (pos_hash != pos_hash[i])
        out.append(_nll(pn[i] @ qn[i] / t, qn[keep_q] @ pn[i] / t))
    return np.array(out)


def _ref_hard(qn, pn, nn, t, neg_mask, pos_hash, neg_hash):
    out = []
    for i in range(len(qn)):
        negs = nn[i][neg_mask[i] & (neg_hash[i] != pos_hash[i])]
        logits = np.concatenate([[qn[i] @ pn[i]], negs @ qn[i]]) / t
        out.append(_nll(qn[i] @ pn[i] / t, logits))
    return np.array(out)


def reference(name, q, p, n, t, neg_mask=None, pos_hash=None, neg_hash=None, symmetric=False):
    """Per-example losses [B] in float64; None masks/hashes mean 'all valid / all distinct'."""
    b, k = n.shape[:2]
    neg_mask = np.ones((b, k), bool) if neg_mask is None else neg_mask
    if pos_hash is None or neg_hash is None:
        # Distinct hashes, disjoint from each other, so nothing is masked by hash.
        pos_hash = np.arange(b) if pos_hash is None else pos_hash
        neg_hash = -1 - np.arange(b * k).reshape(b, k)
    qn, pn, nn = _unit(q), _unit(p), _unit(n)
    if name == "hard":
        return _ref_hard(qn, pn, nn, t, neg_mask, pos_hash, neg_hash)
    fwd = _ref_in_batch(qn, pn, nn, t, neg_mask, pos_hash, neg_hash, name == "retrieval")
    in_batch = (fwd + _ref_backward(qn, pn, t, pos_hash)) / 2 if symmetric else fwd
    if name == "retrieval":
        return in_batch
    return in_batch + _ref_hard(qn, pn, nn, t, neg_mask, pos_hash, neg_hash)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def make_batch(seed=0, b=B, k=K, d=D):
    """Random embeddings with padded negatives and planted text-hash collisions."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, d))
    p = 0.5 * q + rng.normal(size=(b, d))
    n = rng.normal(size=(b, k, d))
    neg_mask = rng.random((b, k)) > 0.3
    neg_mask[6] = False  # a row whose negatives are all padding
    neg_mask[[0, 2, 3, 4], [2, 1, 0, 0]] = [False, True, True, True]
    pos_hash = 100 + np.arange(b, dtype=np.int32)
    pos_hash[5] = pos_hash[1]  # duplicate positive text in the batch
    neg_hash = 1000 + np.arange(b * k, dtype=np.int32).reshape(b, k)
    neg_hash[2, 1] = pos_hash[0]  # another row's negative is query 0's positive
    neg_hash[4, 0] = pos_hash[4]  # a row's own negative is its positive
    neg_hash[3, 0] = pos_hash[1]  # hits queries 1 and 5 at once
    neg_hash[0, 2] = pos_hash[3]  # padded and colliding: must stay out either way
    return dict(q=q, p=p, n=n, neg_mask=neg_mask, pos_hash=pos_hash, neg_hash=neg_hash)


def _masks(batch, masking):
    if not masking:
        return {}
    return {k: batch[k] for k in ("neg_mask", "pos_hash", "neg_hash")}


# ---------------------------------------------------------------------------------------
# Shared jitted evaluators. XLA compiles on this CPU take about a second each, so every
# test reuses these few functions (the jit cache keys on shapes, dtypes, x64 and which
# masks are given) instead of compiling per case or running op by op.
# ---------------------------------------------------------------------------------------


@jax.jit
def all_losses(q, p, n, t, masks):
    """Per-example losses of every (loss, symmetric) variant.

    reduce=True (the mean) is checked through all_grads, whose value and gradients are
    compared to the reference mean.
    """
    return {
        f"{name}-{sym}": LOSSES[name](q, p, n, temperature=t, symmetric=sym, reduce=False, **masks)
        for name, sym in VARIANTS
    }


@jax.jit
def all_grads(q, p, n, t, masks):
    """Gradients of every variant's mean loss w.r.t. q, p, n and the temperature."""
    out = {}
    for name, sym in GRAD_VARIANTS:

        def loss(q, p, n, t, name=name, sym=sym):
            return LOSSES[name](q, p, n, temperature=t, symmetric=sym, **masks)

        out[f"{name}-{sym}"] = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, p, n, t)
    return out


@jax.jit
def _retrieval_step(q, p, n, t, masks):
    """Value and gradients of the symmetric joint loss: the training-step shape."""

    def loss(q, p, n, t):
        return losses.retrieval_loss(q, p, n, temperature=t, symmetric=True, **masks)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, p, n, t)


# ---------------------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------------------


# The comparison runs with x64 enabled on float64 inputs (the library computes in
# promote(input, float32), so float64 stays float64). In float32 the logits reach 1/0.05 =
# 20 and logsumexp over them carries up to ~1e-6 absolute rounding error on losses of 2-5
# (measured: 6e-7 worst over a few hundred random batches), which would make a 1e-6
# comparison flaky; in float64 only differences in the math remain, so 1e-6 absolute is a
# strict bound here, not a tolerance for noise.
@pytest.mark.parametrize("masking", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 0.1])
def test_matches_reference(temperature, masking):
    batch = make_batch()
    masks = _masks(batch, masking)
    with jax.enable_x64(True):
        got = all_losses(batch["q"], batch["p"], batch["n"], temperature, masks)
        got = jax.tree.map(np.asarray, got)
    for name, sym in VARIANTS:
        per_example = got[f"{name}-{sym}"]
        assert per_example.dtype == np.float64 and per_example.shape == (B,)
        expected = reference(
            name, batch["q"], batch["p"], batch["n"], temperature, symmetric=sym, **masks
        )
        msg = f"{name} symmetric={sym}"
        np.testing.assert_allclose(per_example, expected, rtol=0, atol=1e-6, err_msg=msg)
        if masking:
            # The planted padding and collisions must change every variant's answer, or
            # this test would not be exercising the masks.
            plain = reference(name, batch["q"], batch["p"], batch["n"], temperature, symmetric=sym)
            assert np.abs(plain - expected).max() > 1e-3, msg


def _grad_case(name, sym):
    """all_grads' float64 value and gradients on a masked batch with all-zero padding.

    Zero vectors are the worst case for normalisation, and what collators pad with.
    """
    batch = make_batch(seed=1)
    batch["n"] = np.where(batch["neg_mask"][..., None], batch["n"], 0.0)
    masks = _masks(batch, True)
    with jax.enable_x64(True):
        value, grads = all_grads(batch["q"], batch["p"], batch["n"], np.float64(0.07), masks)[
            f"{name}-{sym}"
        ]
    return batch, masks, float(value), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("name,sym", GRAD_VARIANTS)
def test_gradients_match_finite_differences(name, sym):
    # Directional central differences of the float64 reference along random directions,
    # a few per input: a wrong gradient entry shows up in a random direction with
    # probability 1, at a fraction of the cost of perturbing all 641 inputs one by one
    # (per-row structure is checked exactly in the next test).
    batch, masks, value, grads = _grad_case(name, sym)
    args = {"q": batch["q"], "p": batch["p"], "n": batch["n"], "t": 0.07}

    def ref(**override):
        a = {**args, **override}
        return reference(name, a["q"], a["p"], a["n"], a["t"], symmetric=sym, **masks).mean()

    # reduce=True is the mean over B.
    np.testing.assert_allclose(value, ref(), rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for (key, x), g in zip(args.items(), grads, strict=True):
        for _ in range(4 if np.ndim(x) else 1):
            v = rng.normal(size=np.shape(x)) if np.ndim(x) else 1.0
            fd = (ref(**{key: x + eps * v}) - ref(**{key: x - eps * v})) / (2 * eps)
            # Central differences with eps=1e-6 in float64 are good to ~1e-8 here.
            np.testing.assert_allclose(np.sum(g * v), fd, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name,sym", GRAD_VARIANTS)
def test_gradients_reach_every_live_row_and_skip_masked(name, sym):
    batch, _, _, (gq, gp, gn, gt) = _grad_case(name, sym)
    for g in (gq, gp, gn, gt):
        assert np.isfinite(g).all()
    assert gt != 0.0
    live = batch["neg_mask"].copy()
    rows = np.ones(B, bool)
    if name != "retrieval":
        # A hard negative is seen by its own query only, so an own-row hash collision
        # takes it out of every softmax; in retrieval_loss other queries still use it.
        live &= batch["neg_hash"] != batch["pos_hash"][:, None]
        assert not live[4, 0] and batch["neg_mask"][4, 0]
    if name == "hard":
        # No live negative left (row 6, and row 4 after its collision) means a 1-way
        # softmax: constant loss, zero gradient.
        rows = live.any(axis=1)
        assert not rows.all()
    np.testing.assert_array_equal(np.abs(gq).sum(-1) > 0, rows)
    np.testing.assert_array_equal(np.abs(gp).sum(-1) > 0, rows)
    row_norm = np.abs(gn).sum(-1)
    assert (row_norm[live] > 0).all()
    assert (row_norm[~live] == 0).all()  # exactly zero, not just small


def test_bf16_inputs_and_empty_rows_stay_finite():
    # bf16 embeddings, all-zero padded negatives, and half the rows with no real negative.
    batch = make_batch(seed=2)
    masks = _masks(batch, True)
    masks["neg_mask"][:4] = False
    n = np.where(masks["neg_mask"][..., None], batch["n"], 0.0)
    # Casts happen in NumPy (ml_dtypes): a jnp cast would be one more XLA compile.
    args = [x.astype(jnp.bfloat16) for x in (batch["q"], batch["p"], n)]
    value, grads = _retrieval_step(*args, np.float32(0.05), masks)
    assert value.dtype == jnp.float32  # similarities are computed in float32
    assert np.isfinite(float(value)) and float(value) > 0
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all()
    assert (np.asarray(grads[2], np.float32)[~masks["neg_mask"]] == 0).all()


def test_no_hard_negatives():
    batch = make_batch(seed=6)
    q, p, n = batch["q"], batch["p"], np.zeros((B, 0, D))
    masks = dict(
        neg_mask=np.zeros((B, 0), bool),
        pos_hash=batch["pos_hash"],
        neg_hash=np.zeros((B, 0), np.int32),
    )
    with jax.enable_x64(True):  # x64 for the same reason as in test_matches_reference
        got = jax.tree.map(np.asarray, all_losses(q, p, n, 0.05, masks))
    for name, sym in VARIANTS:
        expected = reference(name, q, p, n, 0.05, symmetric=sym, **masks)
        np.testing.assert_allclose(got[f"{name}-{sym}"], expected, rtol=0, atol=1e-6)
        # F2LLM without negatives is its in-batch term alone, i.e. the joint loss.
        np.testing.assert_allclose(got[f"f2llm-{sym}"], got[f"retrieval-{sym}"], rtol=0, atol=1e-12)
        # Classification without negatives is a 1-way softmax.
        assert (got[f"hard-{sym}"] == 0).all()


# ---------------------------------------------------------------------------------------
# False-negative masking, semantically
# ---------------------------------------------------------------------------------------


def test_duplicate_positive_is_same_as_removing_it():
    """p_3 has p_1's text: query 1's loss equals its loss with p_3 gone from the batch."""
    rng = np.random.default_rng(3)
    q, p, n = rng.normal(size=(B, D)), rng.normal(size=(B, D)), rng.normal(size=(B, K, D))
    pos_hash = np.arange(B, dtype=np.int32)
    pos_hash[3] = pos_hash[1]
    neg_hash = 100 + np.arange(B * K, dtype=np.int32).reshape(B, K)
    masks = dict(neg_mask=np.ones((B, K), bool), pos_hash=pos_hash, neg_hash=neg_hash)

    # Drop row 3 but keep its hard negatives in the global pool by parking them in padded
    # slots of row 0 (retrieval_loss sees the pool, not which row holds a negative).
    rows = [r for r in range(B) if r != 3]
    n2 = np.zeros((B - 1, 2 * K, D))
    n2[:, :K] = n[rows]
    n2[0, K:] = n[3]
    mask2 = np.zeros((B - 1, 2 * K), bool)
    mask2[:, :K] = True
    mask2[0, K:] = True
    hash2 = np.full((B - 1, 2 * K), -1, np.int32)
    hash2[:, :K] = neg_hash[rows]
    hash2[0, K:] = neg_hash[3]
    masks2 = dict(neg_mask=mask2, pos_hash=pos_hash[rows], neg_hash=hash2)

    with jax.enable_x64(True):
        full, removed, unmasked = (
            jax.tree.map(np.asarray, all_losses(*args, 0.05, m))
            for args, m in [((q, p, n), masks), ((q[rows], p[rows], n2), masks2), ((q, p, n), {})]
        )
    for name, sym in VARIANTS:
        key = f"{name}-{sym}"
        # Row 1 is row 1 in both batches (only row 3 moved).
        np.testing.assert_allclose(full[key][1], removed[key][1], rtol=0, atol=1e-12)
        if name != "hard":  # hard_negative_loss never sees other rows' positives
            assert abs(float(unmasked[key][1]) - float(full[key][1])) > 1e-6, key


# ---------------------------------------------------------------------------------------
# Matryoshka
# ---------------------------------------------------------------------------------------


@jax.jit
def _matryoshka_and_manual(q, p, n, masks):
    # matryoshka() only slices and sums, so one base loss (the joint retrieval loss, which
    # touches q, p and n) is enough.
    fn, dims, weights = losses.retrieval_loss, (4, 8, 16), (1.0, 0.5, 0.25)
    kwargs = dict(temperature=0.05, symmetric=True, reduce=False, **masks)
    got = losses.matryoshka(fn, dims, weights)(q, p, n, **kwargs)
    manual = sum(
        w * fn(q[:, :d], p[:, :d], n[:, :, :d], **kwargs)
        for d, w in zip(dims, weights, strict=True)
    )
    ones = losses.matryoshka(fn, (4, 16))(q, p, n, **kwargs)
    manual_ones = fn(q[:, :4], p[:, :4], n[..., :4], **kwargs) + fn(q, p, n, **kwargs)
    return got, manual, ones, manual_ones


def test_matryoshka_is_weighted_sum_of_truncations():
    batch = make_batch(seed=4)
    q, p, n = (batch[k].astype(np.float32) for k in "qpn")
    got, manual, ones, manual_ones = _matryoshka_and_manual(q, p, n, _masks(batch, True))
    assert got.shape == (B,)
    np.testing.assert_allclose(np.asarray(got), np.asarray(manual), rtol=1e-6)
    # Default weights are all 1.
    np.testing.assert_allclose(np.asarray(ones), np.asarray(manual_ones), rtol=1e-6)


def test_matryoshka_validates_dims_and_weights():
    q, p, n = np.ones((2, 16)), np.ones((2, 16)), np.ones((2, 1, 16))
    with pytest.raises(ValueError, match=r"dim 32 exceeds the embedding size D=16"):
        losses.matryoshka(losses.retrieval_loss, (8, 32))(q, p, n, temperature=0.05)
    with pytest.raises(ValueError, match=r"positive int; got 0"):
        losses.matryoshka(losses.retrieval_loss, (0, 8))
    with pytest.raises(ValueError, match=r"2 weights for 3 dims"):
        losses.matryoshka(losses.retrieval_loss, (4, 8, 16), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"must not be empty"):
        losses.matryoshka(losses.retrieval_loss, ())


# ---------------------------------------------------------------------------------------
# Sharded global batches, API checks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_batch_matches_single_device(axis_type):
    # Embeddings and masks sharded over 8 devices along the batch. The losses are written
    # on global arrays, so the compiler gathers across devices; the numbers must not
    # depend on it. Explicit is jax.make_mesh's default, Auto is classic GSPMD.
    batch = make_batch(seed=7, b=16)
    masks = _masks(batch, True)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    host = [batch[k].astype(np.float32) for k in "qpn"]
    v1, g1 = _retrieval_step(*host, np.float32(0.05), masks)
    shard = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, shard) for x in host]
    sharded_masks = {k: jax.device_put(v, shard) for k, v in masks.items()}
    assert len(sharded[0].sharding.device_set) == 8
    v8, g8 = _retrieval_step(*sharded, np.float32(0.05), sharded_masks)
    # Same float32 math; only the reduction order may differ after the gathers.
    np.testing.assert_allclose(float(v8), float(v1), rtol=1e-6)
    for a, b in zip(g8, g1, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert g8[0].sharding.spec[0] == "data"  # gradients come back batch-sharded


def test_shape_errors_are_clear():
    q = np.ones((4, 8))
    with pytest.raises(ValueError, match=r"n must be \[B=4, K, D=8\]"):
        losses.retrieval_loss(q, q, np.ones((4, 8)), temperature=0.05)
    with pytest.raises(ValueError, match=r"neg_mask must be \[B=4, K=2\]"):
        losses.hard_negative_loss(
            q, q, np.ones((4, 2, 8)), temperature=0.05, neg_mask=np.ones((4, 3), bool)
        )


def test_task_loss_dispatch():
    assert losses.task_loss("retrieval") is losses.retrieval_loss
    assert losses.task_loss("retrieval", "f2llm") is losses.f2llm_retrieval_loss
    for task in ("classification", "clustering"):
        for style in ("joint", "f2llm"):
            assert losses.task_loss(task, style) is losses.hard_negative_loss
    with pytest.raises(ValueError, match=r"unknown task 'rerank'.*retrieval, classification"):
        losses.task_loss("rerank")
    with pytest.raises(ValueError, match=r"unknown loss style 'mnrl'.*joint, f2llm"):
        losses.task_loss("retrieval", "mnrl")


# --- distillation ------------------------------------------------------------------------------


def _teacher(batch, seed=3):
    """Teacher scores on a cross-encoder's scale, with the gaps a real batch has: a row the
    teacher never scored, a negative it skipped, and the padded negatives of ``neg_mask``."""
    rng = np.random.default_rng(seed)
    b, k = batch["neg_mask"].shape
    teacher = rng.normal(0.0, 4.0, (b, 1 + k)).astype(np.float32)
    teacher[1] = np.nan  # a row of a dataset without scores
    teacher[2, 2] = np.nan  # a negative the teacher did not score
    return teacher


def _ref_distill(q, p, n, teacher, neg_mask, t, tt):
    qn, pn, nn = _unit(q), _unit(p), _unit(n)
    kl_rows, mse_terms = [], []
    for i in range(q.shape[0]):
        if not np.isfinite(teacher[i, 0]):
            continue
        student = [qn[i] @ pn[i] / t] + [qn[i] @ nn[i, j] / t for j in range(n.shape[1])]
        keep = [0] + [
            1 + j for j in range(n.shape[1]) if neg_mask[i, j] and np.isfinite(teacher[i, 1 + j])
        ]
        s = np.array([student[c] for c in keep], np.float64)
        g = np.array([teacher[i, c] / tt for c in keep], np.float64)
        log_s = s - np.log(np.exp(s - s.max()).sum()) - s.max()
        log_g = g - np.log(np.exp(g - g.max()).sum()) - g.max()
        kl_rows.append(np.sum(np.exp(log_g) * (log_g - log_s)))
        mse_terms += [((s[0] - s[c]) - (g[0] - g[c])) ** 2 for c in range(1, len(keep))]
    return np.mean(kl_rows), np.mean(mse_terms)


@jax.jit
def _distill_losses(q, p, n, teacher, neg_mask):
    kw = dict(temperature=0.05, teacher_temperature=2.0, neg_mask=neg_mask)
    kl = losses.kl_distill_loss(q, p, n, teacher, **kw)
    mse = losses.margin_mse_loss(q, p, n, teacher, **kw)
    combined = losses.with_distillation(losses.retrieval_loss, 0.5, 2.0, 0.1, 2.0)
    total = combined(q, p, n, teacher=teacher, temperature=0.05, neg_mask=neg_mask)
    infonce = losses.retrieval_loss(q, p, n, temperature=0.05, neg_mask=neg_mask)
    return kl, mse, total, infonce


def test_distillation_losses_match_reference():
    batch = make_batch(seed=5)
    teacher = _teacher(batch)
    args = (batch["q"], batch["p"], batch["n"], teacher, batch["neg_mask"])
    kl, mse, total, infonce = (float(x) for x in _distill_losses(*args))
    want_kl, want_mse = _ref_distill(*args, 0.05, 2.0)
    assert kl == pytest.approx(want_kl, abs=1e-5, rel=1e-5)
    assert mse == pytest.approx(want_mse, abs=1e-5, rel=1e-5)
    assert total == pytest.approx(0.5 * infonce + 2.0 * kl + 0.1 * mse, rel=1e-6)
    # The student that copies the teacher's logits has zero KL and zero Margin-MSE.
    q = np.eye(4, dtype=np.float32)[:2]
    p = q.copy()
    n = np.stack([np.eye(4, dtype=np.float32)[2:]] * 2)  # orthogonal: cos 0
    copy = np.array([[1.0, 0.0, 0.0]] * 2, np.float32) / 0.05 * 2.0  # teacher / tt == student
    kl0, mse0, _, _ = _distill_losses(q, p, n, copy, np.ones((2, 2), bool))
    assert abs(float(kl0)) < 1e-6 and abs(float(mse0)) < 1e-6


def test_distillation_gradients_match_finite_differences():
    batch = make_batch(seed=6)
    teacher = _teacher(batch, seed=4)
    mask = batch["neg_mask"]

    def f(q):
        kl, mse, _, _ = _distill_losses(q, batch["p"], batch["n"], teacher, mask)
        return kl + mse

    # Directional central differences in float64 along random directions (every entry of
    # the gradient takes part), as for the contrastive losses: good to ~1e-8 here.
    with jax.enable_x64(True):
        q = jnp.asarray(batch["q"], jnp.float64)
        grad = np.asarray(jax.grad(f)(q))
        rng, eps = np.random.default_rng(0), 1e-6
        for _ in range(4):
            v = rng.normal(size=q.shape)
            fd = (float(f(q + eps * v)) - float(f(q - eps * v))) / (2 * eps)
            np.testing.assert_allclose(np.sum(grad * v), fd, rtol=1e-6, atol=1e-8)
    # A row without teacher scores gets no gradient from distillation.
    assert np.abs(grad[1]).max() == 0.0


def test_every_similarity_product_is_exact_fp32_on_tpu_and_gpu():
    """At JAX's default precision an fp32 product runs as one bf16 pass on TPU and in TF32 on
    GPU (the first GPU run's resumed and exported values moved by 5e-5 to 2e-4 for it): every
    product of every loss, forward and backward, distillation too, asks for HIGHEST. Lowered
    for TPU and CUDA on this host; CPU computes fp32 either way, so only the program shows it."""
    batch = make_batch()
    q, p, n = (np.asarray(batch[k], np.float32) for k in "qpn")
    masks = _masks(batch, True)
    cases = [
        (all_grads, (q, p, n, np.float32(0.05), masks)),
        (_distill_losses, (q, p, n, _teacher(batch), batch["neg_mask"])),
    ]
    for platform in ("tpu", "cuda"):
        for fn, args in cases:
            text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
            dots = [line for line in text.splitlines() if "dot_general" in line]
            assert dots, f"no products in {fn.__name__}"
            loose = [d.strip()[:160] for d in dots if "HIGHEST" not in d]
            assert not loose, f"{platform} {fn.__name__}: {len(loose)} of {len(dots)}: {loose[0]}"


# --- late interaction (multi-vector): token vectors, MaxSim -----------------------------------


def _token_batch(seed=0, b=B, k=K, lq=5, lp=7, d=D):
    """``make_batch``'s rows and masks with token vectors: every text 1..L real tokens, a
    padded negative with none."""
    batch = make_batch(seed, b, k, d)
    rng = np.random.default_rng(seed + 1)
    q, p, n = (
        rng.normal(size=(b, lq, d)),
        rng.normal(size=(b, lp, d)),
        rng.normal(size=(b, k, lp, d)),
    )
    p += 0.5 * q.mean(1, keepdims=True)

    def real(shape, length):
        return np.arange(length) < rng.integers(1, length + 1, shape)[..., None]

    masks = dict(q=real(b, lq), p=real(b, lp), n=real((b, k), lp))
    masks["n"][6] = False  # row 6's negatives are padding: no tokens at all
    return batch, dict(q=q, p=p, n=n), masks


def _ref_maxsim(a, a_mask, b, b_mask):
    """float64 MaxSim of one query's real tokens against one document's real tokens."""
    s = _unit(a[a_mask]) @ _unit(b[b_mask]).T
    return s.max(axis=1).sum() if b_mask.any() else 0.0


def _ref_token_losses(x, m, batch, t):
    """Per-example joint, symmetric-joint and hard-only losses, candidates dropped (not
    masked) as in `reference`."""
    b, k = batch["neg_mask"].shape
    pos_hash, neg_hash, neg_mask = batch["pos_hash"], batch["neg_hash"], batch["neg_mask"]
    qp = np.array([[_ref_maxsim(x["q"][i], m["q"][i], x["p"][j], m["p"][j]) for j in range(b)]
                   for i in range(b)]) / t  # fmt: skip
    qn = np.array([[[_ref_maxsim(x["q"][i], m["q"][i], x["n"][j, c], m["n"][j, c])
                     for c in range(k)] for j in range(b)] for i in range(b)]) / t  # fmt: skip
    joint, back, hard = [], [], []
    for i in range(b):
        keep = (np.arange(b) == i) | (pos_hash != pos_hash[i])
        live = neg_mask & (neg_hash != pos_hash[i])
        joint.append(_nll(qp[i, i], np.concatenate([qp[i][keep], qn[i][live]])))
        back.append(_nll(qp[i, i], qp[:, i][keep]))
        own = neg_mask[i] & (neg_hash[i] != pos_hash[i])
        hard.append(_nll(qp[i, i], np.concatenate([[qp[i, i]], qn[i, i][own]])))
    joint, back = np.array(joint), np.array(back)
    return {"joint": joint, "symmetric": (joint + back) / 2, "hard": np.array(hard)}


def _token_losses_fn(x, m, masks, t):
    q = search.token_sets(x["q"], m["q"], query=True)
    p, n = (search.token_sets(x[s], m[s], query=False) for s in "pn")
    kw = dict(temperature=t, reduce=False, **masks)
    return {
        "joint": losses.retrieval_loss(q, p, n, **kw),
        "symmetric": losses.retrieval_loss(q, p, n, symmetric=True, **kw),
        "hard": losses.hard_negative_loss(q, p, n, **kw),
    }


_token_losses = jax.jit(_token_losses_fn)


def test_late_interaction_losses_match_a_float64_reference(monkeypatch):
    """MaxSim InfoNCE (ColBERT): query tokens against the in-batch positives' and every hard
    negative's tokens, padding on either side never scored, false and padded negatives
    left out; in float64 against a reference that drops what the library masks. The
    in-batch scores run in chunks of 3 documents (8 padded to 9)."""
    batch, x, m = _token_batch()
    with jax.enable_x64(True):
        masks = _masks(batch, True)
        got = _token_losses(x, m, masks, 0.05)
        monkeypatch.setattr(search, "MAXSIM_CHUNK", 3)
        chunked = jax.jit(lambda *a: _token_losses_fn(*a))(x, m, masks, 0.05)  # a new trace
    want = _ref_token_losses(x, m, batch, 0.05)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(chunked[name], want[name], rtol=1e-10, err_msg=name)


def test_late_interaction_gradients_match_finite_differences():
    """Gradients through MaxSim's max, the chunked map and its recomputation (float64),
    against central differences of the loss along a random direction of every input."""
    batch, x, m = _token_batch(seed=2)
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        masks = _masks(batch, True)

        def mean_loss(x):
            return jnp.mean(_token_losses(x, m, masks, 0.1)["symmetric"])

        grads = jax.grad(mean_loss)(x)
        for name in "qpn":
            direction = rng.normal(size=x[name].shape)
            step = {**x, name: x[name] + 1e-6 * direction}
            back = {**x, name: x[name] - 1e-6 * direction}
            numeric = (mean_loss(step) - mean_loss(back)) / 2e-6
            np.testing.assert_allclose(np.sum(grads[name] * direction), numeric, rtol=1e-6,
                                       err_msg=name)  # fmt: skip
