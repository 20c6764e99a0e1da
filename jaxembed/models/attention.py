"""One attention for every backbone, run by the kernel each platform does best.

A backbone describes *which* keys each query may see with a `Mask`: segment ids for the
queries and the keys (packed rows number their texts 1, 2, ...; an unpacked row is one
segment whose padding keys are 0), whether it is causal, and a sliding window. `attention`
turns that description into what the chosen implementation takes:

- ``xla``: einsums and a softmax over the (batch, heads, L, L) scores, the mask as an fp32
  additive bias. Runs everywhere, applies attention-probability dropout and logit
  soft-capping; what CPU runs and what the tests compare the kernels with.
- ``cudnn``: `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs):
  padding as per-row key lengths, causal and window as the kernel's own flags, packed rows
  as a boolean (batch, 1, L, L) mask (the kernel never materialises the scores).
- ``splash``: the Pallas splash-attention kernel for TPU: segment ids, causal and local
  masks natively, grouped-query heads as multi-query kernels per key/value head; lengths
  must be multiples of 128. On other platforms it runs in Pallas interpret mode (tests).
- ``auto``: ``xla`` on CPU, ``cudnn`` on GPU in bf16 / fp16 (JAX itself falls back to its
  XLA attention for shapes cuDNN does not take) unless the model soft-caps its logits,
  ``splash`` on TPU when the length is a multiple of 128, else ``xla``.

The fused kernels apply no dropout to the attention probabilities (the other dropouts of
a layer are unchanged) and ``cudnn`` no soft-capping; `describe` says so at start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxembed.choices import ATTENTION, check
from jaxembed.models.layers import dropout

# What `attention` calls jax.nn.dot_product_attention with for "cudnn"; the tests set it
# to "xla" to run the same call on CPU.
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
        padding, so no query is left without keys), else ``attention_mask`` (1 real, 0
        padding), where every query of a row with text sees that text's tokens."""
        if segment_ids is not None:
            seg = segment_ids.astype(jnp.int32)
            return cls(seg, seg, causal=causal, packed=True, impl=impl)
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


def resolve(
    impl: str, length: int, dtype="float32", platform: str | None = None, softcap=None
) -> str:
    """The implementation ``impl`` runs as for rows of ``length`` tokens computed in
    ``dtype`` on ``platform`` (default: JAX's default backend), for a model that soft-caps
    its logits at ``softcap`` (None: it does not)."""
    check(impl, ATTENTION, "model.attention")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if platform == "gpu" and half and not softcap:
        return "cudnn"  # cuDNN's flash attention: half precision only, no soft-cap
    if platform == "tpu" and length % 128 == 0:
        return "splash"
    return "xla"


def probs_dropout(config) -> float:
    """A backbone config's dropout on attention probabilities (BERT's and ModernBERT's names;
    the decoders have none)."""
    rate = getattr(config, "attention_probs_dropout_prob", None)
    return float(rate if rate is not None else getattr(config, "attention_dropout", 0.0))


def describe(
    impl: str,
    length: int,
    dropout_rate: float = 0.0,
    dtype="float32",
    platform=None,
    softcap=None,
) -> str:
    """One line for the start of a run: what runs, and what a fused kernel leaves out."""
    platform = platform or jax.default_backend()
    chosen = resolve(impl, length, dtype, platform, softcap)
    line = f"attention: {chosen}" + (f" (auto on {platform})" if impl == "auto" else "")
    if chosen != "xla" and dropout_rate:
        line += f"; the fused kernel applies no attention dropout (the model's {dropout_rate})"
    return line


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
    impl = resolve(mask.impl, q.shape[1], q.dtype, softcap=softcap)
    if impl == "cudnn":
        if softcap:
            raise ValueError("model.attention=cudnn: cuDNN attention takes no logit soft-cap")
        # Asked for by name, cuDNN or an error; chosen by auto, JAX falls back to its own
        # XLA attention for shapes cuDNN does not take (head sizes, lengths).
        implementation = CUDNN_IMPLEMENTATION if mask.impl == "cudnn" else None
        return _dot_product_attention(q, k, v, mask, scale, implementation)
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


def _dot_product_attention(q, k, v, mask: Mask, scale, implementation):
    b, l, nq, d = q.shape
    kw = dict(scale=scale, is_causal=mask.causal, implementation=implementation)
    if mask.window is not None:
        kw["local_window_size"] = mask.window
    if mask.packed:
        kw["mask"] = mask.same_segment()[:, None]
    else:  # right-padded rows: the kernel's key lengths (at least 1: finite filler rows)
        kw["key_value_seq_lengths"] = jnp.maximum(jnp.sum(mask.kv_segments > 0, axis=1), 1)
    out = jax.nn.dot_product_attention(q, k, v, **kw)
    return out.reshape(b, l, nq * d)


def _splash(q, k, v, mask: Mask, scale, softcap):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )

    b, l, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    if l % 128:
        raise ValueError(f"model.attention=splash needs lengths that are multiples of 128, not {l}")
    kernel = _splash_kernel(l, g, mask.causal, mask.window, softcap, jax.default_backend())
    # (batch, kv heads, group, L, d) queries; each kv head is a multi-query kernel call.
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, l, nkv, g, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(q, k, v, q_seg, kv_seg):
        ids = splash.SegmentIds(q=q_seg, kv=kv_seg)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(q, k, v, mask.q_segments, mask.kv_segments)  # b, kv, g, L, d
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, nq * d)


def _splash_kernel(l: int, heads: int, causal: bool, window, softcap, platform: str):
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
        interpret=platform != "tpu",
    )
