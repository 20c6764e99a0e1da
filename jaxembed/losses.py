"""Contrastive losses: pure functions of raw embeddings.

Every loss takes the GLOBAL batch (arrays possibly sharded over a mesh) and is written as
plain ``jnp`` over the whole batch, so that inside a jitted step GSPMD inserts the
all-gathers: in-batch and hard negatives then come from every device and host, and
gradients flow back to every gathered passage. There are no collectives here on purpose
(meshes with Explicit axes get one up-front ``reshard`` of the inputs, see ``_gathered``).

Shared calling convention (``q``, ``p``, ``n`` are raw, unnormalised embeddings):

- ``q``: ``[B, D]`` queries; ``p``: ``[B, D]`` positives; ``n``: ``[B, K, D]`` hard
  negatives (``K`` may be 0).
- ``temperature``: python float or scalar array (may be learnable); logits are
  ``cos / temperature``.
- ``neg_mask``: ``[B, K]`` bool, True where a negative is real; padded negatives are left
  out of every softmax. ``None`` means all are real.
- ``pos_hash``: ``[B]`` int hash of each positive's text; ``neg_hash``: ``[B, K]`` int hash
  of each negative's text. For query ``i``, any candidate other than its own positive whose
  hash equals ``pos_hash[i]`` is a false negative and is left out of that query's softmax.
  ``None`` disables the masking (``neg_hash=None`` with ``pos_hash`` given masks only
  in-batch positives).
- ``reduce``: True returns the scalar mean over ``B``; False returns the ``[B]`` per-example
  losses.

Similarities are cosine similarities computed in at least float32 (bf16 inputs are
upcast), so the returned loss is float32 for bf16/float32 inputs.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxembed.choices import LOSS_STYLES, TASKS
from jaxembed.quantization import with_quantization
from jaxembed.search import all_pairs, own

# Finite rather than -inf: exp underflows to exactly 0 either way, but -inf turns into NaN
# as soon as anything subtracts two masked logits or multiplies one by zero.
_MASKED = -1e9
# "cosine": the embeddings are L2-normalised first; "dot": a sparse model's raw vectors.
SIMILARITIES = ("cosine", "dot")


def _normalize(x: jax.Array) -> jax.Array:
    """L2-normalises the last axis in (at least) float32.

    rsqrt of a clamped squared norm rather than ``x / norm``: the gradient of ``sqrt`` at 0
    is infinite, and all-zero padded negatives are common. Clamping the squared norm at
    1e-24 matches ``torch.nn.functional.normalize``'s ``eps=1e-12`` on the norm.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def _float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _gathered(x: jax.Array) -> jax.Array:
    """Replicates ``x`` if an Explicit mesh axis shards it; a no-op otherwise.

    Under Auto axes GSPMD inserts the all-gathers ``q @ p.T`` needs by itself. Explicit axes
    (``jax.make_mesh``'s default) type-check shardings instead and reject a product of two
    batch-sharded operands, so gather up front: the same all-gather, and the gradient comes
    back sharded like the input.
    """
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in tuple(mesh.axis_types):
        return x
    if all(axis is None for axis in sharding.spec):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def _check_inputs(q, p, n, neg_mask, pos_hash, neg_hash) -> None:
    """One vector per text ([B, D]) or one per token ([B, L, D], late interaction)."""
    if (
        q.ndim not in (2, 3)
        or p.ndim != q.ndim
        or (q.shape[0], q.shape[-1])
        != (
            p.shape[0],
            p.shape[-1],
        )
    ):
        raise ValueError(f"q and p must be [B, D] or [B, L, D]; got q {q.shape}, p {p.shape}")
    b, d = q.shape[0], q.shape[-1]
    each = f"L={p.shape[1]}, D={d}" if p.ndim == 3 else f"D={d}"
    if n.ndim != p.ndim + 1 or n.shape[0] != b or n.shape[2:] != p.shape[1:]:
        raise ValueError(f"n must be [B={b}, K, {each}]; got {n.shape}")
    k = n.shape[1]
    if neg_mask is not None and neg_mask.shape != (b, k):
        raise ValueError(f"neg_mask must be [B={b}, K={k}]; got {neg_mask.shape}")
    if pos_hash is not None and pos_hash.shape != (b,):
        raise ValueError(f"pos_hash must be [B={b}]; got {pos_hash.shape}")
    if neg_hash is not None and neg_hash.shape != (b, k):
        raise ValueError(f"neg_hash must be [B={b}, K={k}]; got {neg_hash.shape}")


def _prepare(q, p, n, temperature, neg_mask, pos_hash, neg_hash, similarity="cosine"):
    """Validates shapes; returns q, p, n normalised (``similarity="cosine"``) or not
    ("dot": a sparse model's), the float temperature and a [B, K] mask."""
    q, p, n = (_gathered(jnp.asarray(x)) for x in (q, p, n))
    neg_mask = None if neg_mask is None else _gathered(jnp.asarray(neg_mask, bool))
    pos_hash = None if pos_hash is None else _gathered(jnp.asarray(pos_hash))
    neg_hash = None if neg_hash is None else _gathered(jnp.asarray(neg_hash))
    _check_inputs(q, p, n, neg_mask, pos_hash, neg_hash)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity {similarity!r}; expected one of {SIMILARITIES}")
    prepare = _normalize if similarity == "cosine" else _float32
    qn, pn, nn = prepare(q), prepare(p), prepare(n)
    temp = jnp.asarray(temperature, qn.dtype)
    if neg_mask is None:
        neg_mask = jnp.ones(n.shape[:2], bool)
    return qn, pn, nn, temp, neg_mask, pos_hash, neg_hash


def _cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per row, given the target's logit (already in logits)."""
    return jax.nn.logsumexp(logits, axis=-1) - target


def _in_batch_valid(pos_hash) -> jax.Array | None:
    """[B, B] bool, False where in-batch positive j is a false negative for row i.

    Symmetric, so it serves both the query->passage and the passage->query direction.
    """
    if pos_hash is None:
        return None
    b = pos_hash.shape[0]
    same = pos_hash[:, None] == pos_hash[None, :]
    return ~same | jnp.eye(b, dtype=bool)


def _in_batch_term(qn, pn, nn, temp, neg_mask, pos_hash, neg_hash, *, with_negatives, symmetric):
    """Per-example in-batch loss.

    Forward: query i against all B positives (plus all B*K hard negatives when
    ``with_negatives``) in one softmax, target p_i. Backward, averaged in when
    ``symmetric``: positive i against all B queries, target q_i (hard negatives are
    passages, so they have no place there).
    """
    b = qn.shape[0]
    qp = all_pairs(qn, pn) / temp  # [B, B]
    valid = _in_batch_valid(pos_hash)
    qp_masked = qp if valid is None else jnp.where(valid, qp, _MASKED)
    # Row i's own logit, picked by a mask: `jnp.diagonal` is a `cond` on the platform, and
    # on a mesh its gradient's collectives sat inside it (a deadlock on XLA:CPU: the
    # design notes, convention 7).
    target = jnp.sum(jnp.where(jnp.eye(b, dtype=bool), qp, 0.0), axis=1)
    logits = qp_masked
    if with_negatives:
        flat = nn.reshape(-1, *nn.shape[2:])  # [B*K, ...]: the global pool of hard negatives
        qn_logits = all_pairs(qn, flat) / temp  # [B, B*K]
        neg_valid = jnp.broadcast_to(neg_mask.reshape(1, -1), (b, flat.shape[0]))
        if pos_hash is not None and neg_hash is not None:
            neg_valid = neg_valid & (neg_hash.reshape(1, -1) != pos_hash[:, None])
        logits = jnp.concatenate([qp_masked, jnp.where(neg_valid, qn_logits, _MASKED)], axis=1)
    forward = _cross_entropy(logits, target)
    if not symmetric:
        return forward
    return (forward + _cross_entropy(qp_masked.T, target)) / 2


def _hard_term(qn, pn, nn, temp, neg_mask, pos_hash, neg_hash):
    """Per-example loss of query i against [p_i, n_i,0 .. n_i,K-1]."""
    pos = own(qn, pn[:, None])[:, 0] / temp  # [B]
    neg = own(qn, nn) / temp  # [B, K]
    valid = neg_mask
    if pos_hash is not None and neg_hash is not None:
        valid = valid & (neg_hash != pos_hash[:, None])
    logits = jnp.concatenate([pos[:, None], jnp.where(valid, neg, _MASKED)], axis=1)
    return _cross_entropy(logits, pos)


def _reduce(per_example: jax.Array, reduce: bool) -> jax.Array:
    return jnp.mean(per_example) if reduce else per_example


def retrieval_loss(
    q,
    p,
    n,
    *,
    temperature,
    neg_mask=None,
    pos_hash=None,
    neg_hash=None,
    symmetric: bool = False,
    reduce: bool = True,
    similarity: str = "cosine",
) -> jax.Array:
    """In-batch + hard-negative InfoNCE in one softmax (MultipleNegativesRanking style).

    Query i is scored against all B positives and all B*K hard negatives of the global
    batch; the target is p_i. False negatives (candidates other than p_i sharing
    ``pos_hash[i]``) and padded negatives are left out of the softmax.

    Args:
        q: [B, D] query embeddings, unnormalised.
        p: [B, D] positive embeddings, unnormalised.
        n: [B, K, D] hard-negative embeddings, unnormalised; K may be 0.
        temperature: scalar; logits are cosine / temperature. Differentiable.
        neg_mask: optional [B, K] bool, True for real negatives.
        pos_hash: optional [B] int hash of each positive's text.
        neg_hash: optional [B, K] int hash of each negative's text.
        symmetric: also score each positive p_i against all B queries (target q_i, queries
            whose positive shares ``pos_hash[i]`` masked) and average the two directions,
            as sentence-transformers' MultipleNegativesSymmetricRankingLoss does.
        reduce: return the mean over B (True) or the [B] per-example losses (False).

    Returns:
        Scalar mean loss, or [B] per-example losses when ``reduce`` is False.
    """
    qn, pn, nn, temp, neg_mask, pos_hash, neg_hash = _prepare(
        q, p, n, temperature, neg_mask, pos_hash, neg_hash, similarity
    )
    per_example = _in_batch_term(
        qn, pn, nn, temp, neg_mask, pos_hash, neg_hash, with_negatives=True, symmetric=symmetric
    )
    return _reduce(per_example, reduce)


def f2llm_retrieval_loss(
    q,
    p,
    n,
    *,
    temperature,
    neg_mask=None,
    pos_hash=None,
    neg_hash=None,
    symmetric: bool = False,
    reduce: bool = True,
    similarity: str = "cosine",
) -> jax.Array:
    """F2LLM retrieval loss: in-batch loss plus hard-negative loss, summed unweighted.

    The in-batch term scores query i against the B positives only (false negatives
    masked); the hard term scores query i against [p_i, its own K negatives]. Arguments
    are as in :func:`retrieval_loss`; ``symmetric`` applies to the in-batch term only.

    Returns:
        Scalar mean loss, or [B] per-example losses when ``reduce`` is False.
    """
    qn, pn, nn, temp, neg_mask, pos_hash, neg_hash = _prepare(
        q, p, n, temperature, neg_mask, pos_hash, neg_hash, similarity
    )
    in_batch = _in_batch_term(
        qn, pn, nn, temp, neg_mask, pos_hash, neg_hash, with_negatives=False, symmetric=symmetric
    )
    hard = _hard_term(qn, pn, nn, temp, neg_mask, pos_hash, neg_hash)
    return _reduce(in_batch + hard, reduce)


def hard_negative_loss(
    q,
    p,
    n,
    *,
    temperature,
    neg_mask=None,
    pos_hash=None,
    neg_hash=None,
    symmetric: bool = False,
    reduce: bool = True,
    similarity: str = "cosine",
) -> jax.Array:
    """Hard-negative-only InfoNCE for classification and clustering tasks.

    Query i is scored against [p_i, n_i,0 .. n_i,K-1] only: in a classification batch
    other rows' positives are often the same label, so in-batch negatives would be wrong.
    With K = 0 (or every negative masked) this is a 1-way softmax and the loss is 0.

    Args:
        q: [B, D] query embeddings, unnormalised.
        p: [B, D] positive embeddings, unnormalised.
        n: [B, K, D] hard-negative embeddings, unnormalised.
        temperature: scalar; logits are cosine / temperature. Differentiable.
        neg_mask: optional [B, K] bool, True for real negatives.
        pos_hash: optional [B] int hash of each positive's text.
        neg_hash: optional [B, K] int hash of each negative's text; own negatives sharing
            ``pos_hash[i]`` are masked.
        symmetric: accepted so that every function :func:`task_loss` returns takes the same
            arguments; ignored, since there is no in-batch direction to mirror.
        reduce: return the mean over B (True) or the [B] per-example losses (False).

    Returns:
        Scalar mean loss, or [B] per-example losses when ``reduce`` is False.
    """
    del symmetric
    qn, pn, nn, temp, neg_mask, pos_hash, neg_hash = _prepare(
        q, p, n, temperature, neg_mask, pos_hash, neg_hash, similarity
    )
    return _reduce(_hard_term(qn, pn, nn, temp, neg_mask, pos_hash, neg_hash), reduce)


def matryoshka(
    loss_fn: Callable[..., jax.Array],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
) -> Callable[..., jax.Array]:
    """Wraps a loss so it is the weighted sum over Matryoshka prefix dimensions.

    Args:
        loss_fn: a loss with the shared signature ``(q, p, n, *, temperature, ...)``; it
            renormalises the truncated embeddings itself.
        dims: embedding prefix sizes; each must be positive and at most D (checked when the
            returned function is called, since D is only known then).
        weights: one weight per dim; all 1.0 if omitted.

    Returns:
        A function with ``loss_fn``'s signature returning
        ``sum_i weights[i] * loss_fn(q[..., :dims[i]], p[..., :dims[i]], n[..., :dims[i]])``.
    """
    dims = tuple(dims)
    if not dims:
        raise ValueError("matryoshka: dims must not be empty")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"matryoshka: every dim must be a positive int; got {d!r}")
    weights = (1.0,) * len(dims) if weights is None else tuple(weights)
    if len(weights) != len(dims):
        raise ValueError(
            f"matryoshka: got {len(weights)} weights for {len(dims)} dims; need one per dim"
        )

    def loss(q, p, n, **kwargs):
        full = q.shape[-1]
        for d in dims:
            if d > full:
                raise ValueError(f"matryoshka: dim {d} exceeds the embedding size D={full}")
        total = 0.0
        for d, w in zip(dims, weights, strict=True):
            total = total + w * loss_fn(q[..., :d], p[..., :d], n[..., :d], **kwargs)
        return total

    return loss


def task_loss(task: str, style: str = "joint") -> Callable[..., jax.Array]:
    """Returns the loss function for a task.

    Args:
        task: one of ``TASKS``. Retrieval uses in-batch plus hard negatives; classification
            and clustering use hard negatives only.
        style: one of ``LOSS_STYLES``, used for retrieval only: "joint" is
            :func:`retrieval_loss` (one softmax), "f2llm" is :func:`f2llm_retrieval_loss`.

    Returns:
        A loss function; all of them share the same keyword arguments.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if style not in LOSS_STYLES:
        raise ValueError(f"unknown loss style {style!r}; allowed: {', '.join(LOSS_STYLES)}")
    if task != "retrieval":
        return hard_negative_loss
    return retrieval_loss if style == "joint" else f2llm_retrieval_loss


# --- distillation from a teacher's scores ----------------------------------------------------
# ``teacher``: [B, 1 + K] scores of the row's positive (column 0) and its K hard negatives,
# as the teacher gave them (a cross-encoder's logits, a bi-encoder's cosine); NaN where the
# teacher gave none (padded negatives, rows of datasets without scores). Student scores are
# the logits InfoNCE uses, cos / temperature; teacher scores are divided by
# ``teacher_temperature``. Rows without a positive score are left out of the mean.


def _candidates(q, p, n, teacher, temperature, teacher_temperature, neg_mask, similarity):
    """Student and teacher logits over [p_i, n_i,0 ..], the valid mask, the rows scored."""
    qn, pn, nn, temp, neg_mask, _, _ = _prepare(
        q, p, n, temperature, neg_mask, None, None, similarity
    )
    teacher = _gathered(jnp.asarray(teacher, jnp.float32))
    b, k = neg_mask.shape
    if teacher.shape != (b, 1 + k):
        raise ValueError(f"teacher scores must be [B={b}, 1+K={1 + k}]; got {teacher.shape}")
    student = own(qn, jnp.concatenate([pn[:, None], nn], axis=1)) / temp
    valid = jnp.concatenate([jnp.ones((b, 1), bool), neg_mask], axis=1) & jnp.isfinite(teacher)
    scored = valid[:, 0]
    t = jnp.where(valid, teacher, 0.0) / jnp.asarray(teacher_temperature, jnp.float32)
    return student, t, valid, scored


def _mean_over(values: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(rows, values, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def kl_distill_loss(
    q, p, n, teacher, *, temperature, teacher_temperature=1.0, neg_mask=None, similarity="cosine"
):
    """KL(teacher || student) between the softmaxes over each query's candidates.

    The candidates are the row's positive and hard negatives that the teacher scored; the
    mean is over rows whose positive has a score (the others contribute nothing).
    """
    student, t, valid, scored = _candidates(
        q, p, n, teacher, temperature, teacher_temperature, neg_mask, similarity
    )
    log_s = jax.nn.log_softmax(jnp.where(valid, student, _MASKED), axis=-1)
    log_t = jax.nn.log_softmax(jnp.where(valid, t, _MASKED), axis=-1)
    per_row = jnp.sum(jnp.where(valid, jnp.exp(log_t) * (log_t - log_s), 0.0), axis=-1)
    return _mean_over(per_row, scored)


def margin_mse_loss(
    q, p, n, teacher, *, temperature, teacher_temperature=1.0, neg_mask=None, similarity="cosine"
):
    """Margin-MSE (Hofstätter et al.): the student's positive-minus-negative margins match the
    teacher's, squared error averaged over the (row, negative) pairs both scored."""
    student, t, valid, _ = _candidates(
        q, p, n, teacher, temperature, teacher_temperature, neg_mask, similarity
    )
    pairs = valid[:, 1:] & valid[:, :1]
    err = (student[:, :1] - student[:, 1:]) - (t[:, :1] - t[:, 1:])
    return jnp.sum(jnp.where(pairs, err * err, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)


def with_distillation(
    loss_fn: Callable[..., jax.Array],
    infonce: float = 1.0,
    kl: float = 0.0,
    margin_mse: float = 0.0,
    teacher_temperature: float = 1.0,
) -> Callable[..., jax.Array]:
    """``infonce * loss_fn + kl * KL + margin_mse * Margin-MSE``, taking ``teacher=`` scores.

    The result has the shared signature plus ``teacher`` (so `matryoshka` wraps it as any
    loss); a zero weight skips its term.
    """

    def loss(q, p, n, *, teacher, temperature, neg_mask=None, **kwargs):
        total = 0.0
        if infonce:
            total = infonce * loss_fn(q, p, n, temperature=temperature, neg_mask=neg_mask, **kwargs)
        common = dict(temperature=temperature, teacher_temperature=teacher_temperature,
                      similarity=kwargs.get("similarity", "cosine"))  # fmt: skip
        if kl:
            total = total + kl * kl_distill_loss(q, p, n, teacher, neg_mask=neg_mask, **common)
        if margin_mse:
            total = total + margin_mse * margin_mse_loss(
                q, p, n, teacher, neg_mask=neg_mask, **common
            )
        return total

    return loss


def flops(x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """The FLOPS regulariser (Paria et al., 2020; SPLADE): the sum over dimensions of the
    squared mean activation over the batch's real ``rows`` ((N,) bool; None: all). The
    mean is over the GLOBAL batch, as it must be: a per-device mean squared and averaged
    over devices is another, larger penalty (Tevatron #36)."""
    x = _float32(_gathered(jnp.asarray(x)))
    if rows is None:
        return jnp.sum(jnp.mean(x, axis=0) ** 2)
    rows = _gathered(jnp.asarray(rows, bool))
    mean = jnp.sum(jnp.where(rows[:, None], x, 0.0), axis=0) / jnp.maximum(jnp.sum(rows), 1)
    return jnp.sum(mean**2)


# --- a run's loss -----------------------------------------------------------------------------


def make_loss(cfg, task: str, similarity: str = "cosine") -> Callable[..., jax.Array]:
    """The training loss of ``task`` per a run's loss settings (``config.loss``), built once:
    the task's InfoNCE (`task_loss`, ``cfg.style``; ``cfg.symmetric``), with KL and
    Margin-MSE on teacher scores (`with_distillation`) where the task's weights ask for them,
    plus the loss of quantized codes (`quantization.with_quantization`, ``cfg.quantization``),
    summed over ``cfg.matryoshka_dims`` prefixes if any; false-negative masking per
    ``cfg.false_negative_masking``.

    Returns ``loss(q, p, n, *, temperature, neg_mask, pos_hash, neg_hash, teacher)``: the
    hashes are ignored without masking, the teacher scores without distillation. Scores
    are cosine similarities, or with ``similarity="dot"`` (a sparse model) dot products.
    """
    fn = task_loss(task, cfg.style)
    weights = (cfg.infonce_weight[task], cfg.kl_weight[task], cfg.margin_mse_weight[task])
    distill = weights != (1.0, 0.0, 0.0)
    if distill:
        fn = with_distillation(fn, *weights, cfg.teacher_temperature)
    if cfg.quantization != "none":  # inside Matryoshka: each prefix is quantized too
        fn = with_quantization(fn, cfg.quantization, cfg.quantization_weight)
    if cfg.matryoshka_dims:
        fn = matryoshka(fn, cfg.matryoshka_dims, cfg.matryoshka_weights or None)
    masking, symmetric = cfg.false_negative_masking, cfg.symmetric

    def loss(q, p, n, *, temperature, neg_mask, pos_hash, neg_hash, teacher):
        kwargs = dict(temperature=temperature, neg_mask=neg_mask, symmetric=symmetric,
                      similarity=similarity)  # fmt: skip
        if masking:
            kwargs.update(pos_hash=pos_hash, neg_hash=neg_hash)
        if distill:
            kwargs["teacher"] = teacher
        return fn(q, p, n, **kwargs)

    return loss


def temperature(extra: dict, cfg) -> jax.Array:
    """The logits' temperature: learned (``extra["log_temperature"]``) or ``cfg.temperature``."""
    if "log_temperature" in extra:
        return jnp.exp(extra["log_temperature"])
    return jnp.float32(cfg.temperature)
