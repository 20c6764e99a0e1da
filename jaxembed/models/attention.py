"""One attention for every backbone, run by the kernel each platform does best.

A backbone describes *which* keys each query may see with a `Mask`: segment ids for the
queries and the keys (packed rows number their texts 1, 2, ...; an unpacked row is one
segment whose padding keys are 0), whether it is causal, and a sliding window. `attention`
turns that description into what the chosen implementation takes:

- ``xla``: einsums and a softmax over the (batch, heads, L, L) scores, the mask as an fp32
  additive bias. Runs everywhere, applies attention-probability dropout and logit
  soft-capping; what CPU runs and what the tests compare the kernels with.
- ``cudnn``: `jax.nn.dot_product_attention` asked for cuDNN's flash attention by name
  (NVIDIA GPUs, bf16 / fp16): padding as per-row key lengths, causal and left windows as
  the kernel's own flags, packed rows as a boolean (batch, 1, L, L) mask (never the
  (batch, heads, L, L) scores). What it cannot take (`cudnn_refuses`: two-sided windows,
  soft-capping, fp32, head sizes) is an error when asked for by name.
- ``splash``: the Pallas splash-attention kernel for TPU: segment ids, causal and local
  masks natively, grouped-query heads as multi-query kernels per key/value head, run per
  device under `jax.shard_map` (a Mosaic kernel cannot be partitioned automatically);
  rows are padded to a multiple of 128 tokens. Off TPU it runs in Pallas interpret mode
  (tests).
- ``auto``: per call, the fused kernel of the platform the step is lowered for (`target`)
  where it takes the call, else ``xla``: cuDNN on GPU unless `cudnn_refuses`, splash on
  TPU for lengths that are multiples of 128. `recording` collects what each call chose
  and why, which the start of a run and ``--dry-run`` print.

The fused kernels apply no dropout to the attention probabilities (the other dropouts of
a layer are unchanged); `describe` says so at start.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from jaxembed.choices import ATTENTION, check
from jaxembed.models.layers import dropout

# What `attention` calls jax.nn.dot_product_attention with for "cudnn"; the tests set it
# to "xla" to run the same call on CPU (in fp32, which cuDNN itself refuses).
CUDNN_IMPLEMENTATION = "cudnn"


@struct.dataclass
class Mask:
    """Which keys each query sees: key j is visible to query i when their segment ids are
    equal, and (``causal``) j <= i, and (``window`` = (left, right)) i - left <= j <= i +
    right. ``packed``: rows hold several texts (else one text, right-padded). ``impl``: the
    implementation `attention` runs (one of `jaxembed.choices.ATTENTION`)."""

    q_segments: jax.Array  # (batch, length) int32
    kv_segments: jax.Array  # (batch, length) int32; 0 = padding
    causal: bool = struct.field(pytree_node=False, default=False)
    window: tuple[int, int] | None = struct.field(pytree_node=False, default=None)
    packed: bool = struct.field(pytree_node=False, default=False)
    impl: str = struct.field(pytree_node=False, default="auto")

    @classmethod
    def of(cls, attention_mask, segment_ids=None, *, causal=False, impl="auto") -> Mask:
        """The mask of a backbone's inputs: packed rows by ``segment_ids`` (padding 0 sees
        padding, so no query is left without keys), else by row, where every query of a row
        with text sees that text's tokens. Either way only the keys ``attention_mask`` marks
        (1, else 0: padding, or ColBERT's query expansion, which reads its text but is
        read by none of it) are seen."""
        if segment_ids is not None:
            seg = segment_ids.astype(jnp.int32)
            kv = jnp.where(attention_mask > 0, seg, 0)
            return cls(seg, kv, causal=causal, packed=True, impl=impl)
        kv = (attention_mask > 0).astype(jnp.int32)
        # A row of padding only (batch filler) sees its padding: finite, and never read.
        q = jnp.broadcast_to(jnp.max(kv, axis=1, keepdims=True), kv.shape)
        kv = jnp.where(q > 0, kv, 0)
        return cls(q, kv, causal=causal, impl=impl)

    def local(self, window: tuple[int, int]) -> Mask:
        return self.replace(window=window)

    def same_segment(self) -> jax.Array:
        """Boolean (batch, L, L): the key belongs to the query's segment."""
        return self.q_segments[:, :, None] == self.kv_segments[:, None, :]

    def allowed(self) -> jax.Array:
        """Boolean (batch, L or 1, L): the dense form, broadcastable over the queries."""
        if not (self.packed or self.causal or self.window):  # padding only: keys decide
            return self.kv_segments[:, None, :] == jnp.max(self.q_segments, 1)[:, None, None]
        ok = self.same_segment()
        i = jnp.arange(self.q_segments.shape[1])
        d = i[:, None] - i[None, :]  # query index - key index
        if self.causal:
            ok &= (d >= 0)[None]
        if self.window is not None:
            left, right = self.window
            ok &= ((d <= left) & (-d <= right))[None]
        return ok


# --- which implementation runs ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """What the attention is lowered for: a platform ("cpu", "gpu", "tpu") and, on NVIDIA
    GPUs, the compute capability (cuDNN's limits depend on it)."""

    platform: str
    compute_capability: tuple[int, int] | None = None


_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("target", default=None)
_CHOSEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("chosen", default=None)


def target() -> Target:
    """The target `lowering_for` sets, else this process's default backend."""
    if (t := _TARGET.get()) is not None:
        return t
    platform = jax.default_backend()
    cc = None
    if platform == "gpu":
        cc_text = getattr(jax.devices()[0], "compute_capability", None)
        cc = tuple(int(x) for x in cc_text.split(".")[:2]) if cc_text else None
    return Target(platform, cc)


@contextlib.contextmanager
def lowering_for(platform: str, compute_capability: tuple[int, int] | None = None):
    """Traces inside choose kernels for ``platform`` (a dry run on a host without it): `auto`
    resolves for it, splash is built for the chip rather than interpreted. Hopper (9, 0) is
    assumed for a GPU whose capability is not given."""
    if platform == "gpu" and compute_capability is None:
        compute_capability = (9, 0)
    token = _TARGET.set(Target(platform, compute_capability))
    try:
        yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def recording():
    """Collects, for every attention call traced inside, ``(implementation, why not fused)``
    (why is "" when nothing was left out): what `describe` and the dry run report."""
    calls: list[tuple[str, str]] = []
    token = _CHOSEN.set(calls)
    try:
        yield calls
    finally:
        _CHOSEN.reset(token)


def cudnn_refuses(mask: Mask, head_dim: int, length: int, dtype, softcap=None) -> str | None:
    """Why cuDNN's fused attention, as `jax.nn.dot_product_attention` calls it (jax 0.10.2),
    cannot take a call; None when it can. The conditions are JAX's own checks
    (jax/_src/cudnn/fused_attention_stablehlo.py `check_layout`, `check_is_flash_attention`;
    jax/_src/nn/functions.py for windows)."""
    # The tests' stand-in (JAX's XLA implementation of the same call) computes in fp32 too.
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if not half and CUDNN_IMPLEMENTATION == "cudnn":
        return f"it computes in bf16 / fp16 only, not {jnp.dtype(dtype).name} (model.dtype)"
    if softcap:
        return "it takes no logit soft-cap"
    cc = target().compute_capability or (0, 0)
    limit = 256 if cc >= (9, 0) else 128
    if head_dim % 8 or head_dim > limit:
        return f"head size {head_dim}: it takes multiples of 8 up to {limit} on this GPU"
    if length % 2:
        return f"odd length {length}: its backward pass takes even lengths"
    if mask.window is not None and mask.window[1] and not mask.causal:
        return f"two-sided window {mask.window}: it has left windows only"
    return None


def resolve(
    impl: str, mask: Mask, head_dim: int, length: int, dtype, softcap=None
) -> tuple[str, str]:
    """``(implementation, why)``: what ``impl`` runs for one attention call on the `target`,
    and, when ``auto`` leaves the platform's fused kernel out, why ("" otherwise).

    ``auto``: cuDNN on a GPU where it takes the call, splash on a TPU for lengths that are
    multiples of 128, else XLA. Asked for by name, a kernel that cannot take the call is an
    error naming why, not a silent fallback."""
    check(impl, ATTENTION, "model.attention")
    platform = target().platform
    if impl == "cudnn":
        if why := cudnn_refuses(mask, head_dim, length, dtype, softcap):
            raise ValueError(
                f"model.attention=cudnn: cuDNN cannot take this attention ({why}); "
                "model.attention=auto runs XLA where it cannot"
            )
        return impl, ""
    if impl != "auto":
        return impl, ""
    if platform == "gpu":
        why = cudnn_refuses(mask, head_dim, length, dtype, softcap)
        return ("xla", f"cuDNN: {why}") if why else ("cudnn", "")
    if platform == "tpu":
        if length % 128:
            return "xla", f"splash: length {length} is not a multiple of 128"
        return "splash", ""
    return "xla", ""


def probs_dropout(config) -> float:
    """A backbone config's dropout on attention probabilities (BERT's and ModernBERT's names;
    the decoders have none)."""
    rate = getattr(config, "attention_probs_dropout_prob", None)
    return float(rate if rate is not None else getattr(config, "attention_dropout", 0.0))


def describe(impl: str, calls: list[tuple[str, str]], dropout_rate: float = 0.0) -> str:
    """One line for the start of a run from the calls `recording` collected: what runs, in
    how many of them, why a fused kernel was left out, what a fused kernel leaves out."""
    platform = target().platform
    counts: dict[tuple[str, str], int] = {}
    for call in calls:
        counts[call] = counts.get(call, 0) + 1
    parts = [
        f"{chosen}"
        + (f" ({why})" if why else "")
        + (f" in {n} of {len(calls)} calls" if len(counts) > 1 else "")
        for (chosen, why), n in sorted(counts.items())
    ]
    line = "attention: " + "; ".join(parts) + (f" (auto on {platform})" if impl == "auto" else "")
    if any(chosen != "xla" for chosen, _ in counts) and dropout_rate:
        line += f"; the fused kernel applies no attention dropout (the model's {dropout_rate})"
    return line


def describe_model(model, lengths, packed: bool, dropout_rate: float = 0.0) -> str:
    """`describe` for ``model`` (concrete or abstract) on rows of each of ``lengths`` tokens,
    packed or one text per row: the calls are traced (`jax.eval_shape`), nothing runs."""
    graphdef, state = nnx.split(model)

    def forward(state, ids):
        segments = ids if packed else None
        return nnx.merge(graphdef, state)(ids, ids > 0, segment_ids=segments)

    with recording() as calls:
        for length in sorted(set(lengths)):
            jax.eval_shape(forward, state, jax.ShapeDtypeStruct((2, length), jnp.int32))
    return describe(model.attention, calls, dropout_rate)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    scale: float,
    softcap: float | None = None,
    dropout_rate: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """``softmax(q k^T * scale) v`` over the keys ``mask`` allows, as (batch, length,
    heads * head_dim).

    ``q`` is (batch, length, heads, head_dim), ``k`` and ``v`` (batch, length, kv_heads,
    head_dim): query head n = kv * g + j reads key/value head kv (HF's ``repeat_kv``
    order). ``softcap`` (Gemma) squashes the scores with ``tanh``; ``dropout_rate`` and
    ``rng`` drop attention probabilities (``xla`` only).
    """
    impl, why = resolve(mask.impl, mask, q.shape[3], q.shape[1], q.dtype, softcap)
    if (calls := _CHOSEN.get()) is not None:
        calls.append((impl, why))
    if impl == "cudnn":
        return _dot_product_attention(q, k, v, mask, scale)
    if impl == "splash":
        return _splash(q, k, v, mask, scale, softcap)
    return _xla(q, k, v, mask, scale, softcap, dropout_rate, rng)


def _xla(q, k, v, mask, scale, softcap, dropout_rate, rng):
    b, l, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    # Heads-major 4-D batched GEMMs, a group's query heads stacked as rows of its key/value
    # head (no repeated keys): no transposed (L, L) results, and 5-D score views cost the
    # backward pass twice the time on CPU. Scaling q costs L*d multiplies, not L*L.
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, l, nkv, g, d)
    q = q.transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * l, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    # The most negative float (as HF) keeps a query without visible keys finite.
    bias = jnp.where(mask.allowed(), 0.0, jnp.finfo(jnp.float32).min)
    if g > 1 and bias.shape[1] > 1:
        bias = jnp.tile(bias, (1, g, 1))  # the same mask for each query head of a group
    probs = jax.nn.softmax(scores + bias[:, None], axis=-1)
    probs = dropout(probs, dropout_rate, rng).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, nkv, g, l, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, nq * d)


def _dot_product_attention(q, k, v, mask: Mask, scale):
    """cuDNN through JAX's public entry, asked for by name (``implementation=None`` is JAX's
    XLA attention in jax 0.10.2). Padded rows pass key lengths (and query lengths: JAX's
    batching of its default would not trace); packed rows a boolean (batch, 1, L, L) mask,
    which JAX turns into an additive bias per layer (its gradient is computed and dropped):
    B x L x L bf16 per layer, a twelfth of XLA's fp32 scores for 12 heads. JAX's private
    packed-segment route (THD layout) was measured and left out: it needs Hopper, cuDNN >=
    9.6, a static segment count, and its softmax statistics (B x segments x heads x L fp32)
    outweigh the bias at our 64 segments per row (bench/RESULTS.md, "First contact")."""
    b, l, nq, d = q.shape
    kw = dict(scale=scale, is_causal=mask.causal, implementation=CUDNN_IMPLEMENTATION)
    if mask.window is not None:
        # Causal, the right side is empty anyway; JAX refuses it beside key lengths.
        kw["local_window_size"] = (mask.window[0], 0 if mask.causal else mask.window[1])
    if mask.packed:
        kw["mask"] = mask.same_segment()[:, None]
    else:  # right-padded rows: the kernel's key lengths (at least 1: finite filler rows)
        lengths = jnp.maximum(jnp.sum(mask.kv_segments > 0, axis=1), 1).astype(jnp.int32)
        kw["key_value_seq_lengths"] = lengths
        kw["query_seq_lengths"] = jnp.full_like(lengths, l)
    out = jax.nn.dot_product_attention(q, k, v, **kw)
    return out.reshape(b, l, nq * d)


def _splash(q, k, v, mask: Mask, scale, softcap):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )

    b, l, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    # The kernel's blocks are multiples of 128 tokens: shorter rows (queries of 64, asked for
    # splash by name; `auto` leaves them to XLA) get keys and queries of padding (segment 0),
    # which no real token sees, cut off after.
    pad = -l % 128
    segments = [mask.q_segments, mask.kv_segments]
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segments = [jnp.pad(x, ((0, 0), (0, pad))) for x in segments]
    kernel = _splash_kernel(l + pad, g, mask.causal, mask.window, softcap, target())
    # (batch, kv heads, group, L, d) queries; each kv head is a multi-query kernel call.
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, l + pad, nkv, g, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def rows(q, k, v, q_seg, kv_seg):
        def one_row(q, k, v, q_seg, kv_seg):
            ids = splash.SegmentIds(q=q_seg, kv=kv_seg)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

        return jax.vmap(one_row)(q, k, v, q_seg, kv_seg)

    out = per_device(rows, q, k, v, *segments)  # b, kv, g, L + pad, d
    return out[:, :, :, :l].transpose(0, 3, 1, 2, 4).reshape(b, l, nq * d)


def per_device(rows, q, k, v, q_seg, kv_seg):
    """``rows(q, k, v, q_seg, kv_seg)`` run on each device's share of the mesh the inputs
    live on: rows over the data-parallel axes, key/value heads over ``tensor`` when it
    divides them, the rest replicated.

    A Mosaic (Pallas TPU) kernel cannot be partitioned by GSPMD: lowered in a jit over more
    than one device it raises unless every mesh axis is manual (jax/_src/tpu_custom_call.py),
    so the kernel calls go inside a `jax.shard_map` over all of them. The mesh is the one the
    step is traced under (`jax.set_mesh`), else the one the inputs' shardings carry; none, or
    one device: a direct call. A batch the data-parallel size does not divide (an encoder's
    last batch) gets rows of padding (segment 0, which sees itself: finite), dropped after.
    ``q`` is (batch, kv heads, group, L, d), ``k`` / ``v`` (batch, kv heads, L, d).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        meshes = (getattr(jax.typeof(x).sharding, "mesh", None) for x in (q, k, v))
        mesh = next((m for m in meshes if m is not None and not m.empty), mesh)
    free = [] if mesh.empty else [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if math.prod(mesh.shape[a] for a in free) <= 1:
        return rows(q, k, v, q_seg, kv_seg)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in free and mesh.shape[a] > 1)
    dp = math.prod(mesh.shape[a] for a in batch_axes)
    b = q.shape[0]
    pad = -b % dp
    if pad:
        q, k, v, q_seg, kv_seg = (
            jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (q, k, v, q_seg, kv_seg)
        )
    tensor = mesh.shape["tensor"] if "tensor" in free else 1
    heads = "tensor" if tensor > 1 and k.shape[1] % tensor == 0 else None
    batch = (batch_axes if len(batch_axes) > 1 else batch_axes[0]) if batch_axes else None
    qkv, seg = P(batch, heads), P(batch)
    out = jax.shard_map(
        rows,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, seg, seg),
        out_specs=qkv,
        axis_names=set(free),
        check_vma=False,  # the kernel's outputs carry no varying-axes type
    )(q, k, v, q_seg, kv_seg)
    return out[:b] if pad else out


def _splash_kernel(l: int, heads: int, causal: bool, window, softcap, target: Target):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    if window is not None:
        left, right = window
        base = masks.LocalMask((l, l), (left, 0 if causal else right), offset=0)
    elif causal:
        base = masks.CausalMask((l, l))
    else:
        base = masks.FullMask((l, l))
    block = next(size for size in (512, 256, 128) if l % size == 0)
    sizes = dict.fromkeys(
        ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
         "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"),
        block,
    )  # fmt: skip
    return splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([base] * heads),
        block_sizes=splash.BlockSizes(**sizes),
        attn_logits_soft_cap=softcap,
        interpret=target.platform != "tpu",
    )
