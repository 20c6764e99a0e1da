"""Pooling of token states into one vector per text, L2 normalisation, Matryoshka truncation.

All pooling runs in fp32 whatever the backbone's compute dtype: summing hundreds of bf16
token states loses the low bits that separate near-duplicate embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxembed.models.layers import segment_positions

# The names sentence-transformers uses in 1_Pooling/config.json.
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# SPLADE (sentence-transformers' SpladePooling, max, relu): the max over a text's tokens of
# log(1 + ReLU(x)), x the MLM head's logits (the model computes them, `splade_inputs`): a
# vector of the vocabulary's size, mostly zeros.
SPLADE = "splade"
# Late interaction (ColBERT; sentence-transformers' MultiVectorEncoder): no pooling, every
# token's vector is kept, projected by the head and scored by MaxSim (`losses.maxsim`).
TOKENS = "tokens"


def check_pooling(mode: str) -> str:
    if mode not in (*POOLING_MODES, SPLADE, TOKENS):
        supported = [*POOLING_MODES, SPLADE, TOKENS]
        raise ValueError(f"unsupported pooling {mode!r}; supported: {supported}")
    return mode


def _splade(logits: jax.Array) -> jax.Array:
    return jnp.log1p(jax.nn.relu(logits))


def splade_inputs(model, hidden: jax.Array, mode: str) -> jax.Array:
    """What a pooling mode pools: the last hidden states, or for SPLADE the MLM logits."""
    return model.mlm_logits(hidden) if mode == SPLADE else hidden


def pool(
    hidden: jax.Array, mask: jax.Array, mode: str, *, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Pools (batch, length, hidden) states over the tokens where ``mask`` is 1.

    ``mask`` is the attention mask, possibly with prompt tokens zeroed (sentence-transformers'
    ``include_prompt=False``); ``attention_mask`` is the unmodified one, which only
    ``weightedmean`` needs (its weights count from the first real token, prompt or not).
    ``cls`` takes the first pooled token and ``lasttoken`` the last, so both are right for
    right- and left-padded batches, as in sentence-transformers.
    """
    check_pooling(mode)
    h = hidden.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    positions = jnp.arange(mask.shape[1])
    if mode == "cls":
        first = jnp.argmax(mask > 0, axis=1)
        return jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0]
    if mode == "lasttoken":
        last = jnp.argmax(jnp.where(mask > 0, positions, -1), axis=1)
        return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    if mode == "max":
        return jnp.max(jnp.where(m > 0, h, jnp.finfo(jnp.float32).min), axis=1)
    if mode == SPLADE:  # every value is >= 0: padding's 0 never wins over a real token's
        return jnp.max(_splade(h) * m, axis=1)
    if mode == "weightedmean":
        full = mask if attention_mask is None else attention_mask
        start = jnp.argmax(full > 0, axis=1)  # left padding shifts the weights
        m = m * (positions[None, :] + 1 - start[:, None]).astype(jnp.float32)[..., None]
    summed = jnp.sum(h * m, axis=1)
    count = jnp.sum(m, axis=1)
    if mode == "mean_sqrt_len_tokens":
        return summed / jnp.sqrt(jnp.maximum(count, 1e-9))
    return summed / jnp.maximum(count, 1e-9)


def pool_segments(
    hidden: jax.Array, pool_ids: jax.Array, segment_ids: jax.Array, mode: str, num_segments: int
) -> jax.Array:
    """`pool` for every text of packed rows: (rows, num_segments, hidden).

    ``segment_ids`` numbers each row's texts 1..num_segments (0: padding); ``pool_ids`` is
    the same with the tokens excluded from pooling (prompt tokens) set to 0. Each segment is
    pooled exactly as `pool` pools a text alone in a row; absent segments give zeros.
    """
    check_pooling(mode)
    h = hidden.astype(jnp.float32)
    segs = jnp.arange(1, num_segments + 1)
    member = pool_ids[:, None, :] == segs[None, :, None]  # (rows, segments, length)
    positions = jnp.arange(pool_ids.shape[1])
    if mode in ("cls", "lasttoken"):
        score = positions if mode == "lasttoken" else -positions
        pick = jnp.argmax(jnp.where(member, score, jnp.iinfo(jnp.int32).min), axis=-1)
        out = jnp.take_along_axis(h, pick[..., None], axis=1)  # (rows, segments, hidden)
        return jnp.where(member.any(-1)[..., None], out, 0.0)
    if mode in ("max", SPLADE):  # one segment at a time: (rows, length, vocab) is large

        def one(s):
            m = (pool_ids == s)[..., None]
            if mode == SPLADE:
                return jnp.max(jnp.where(m, _splade(h), 0.0), axis=1)
            return jnp.max(jnp.where(m, h, jnp.finfo(jnp.float32).min), axis=1)

        out = jax.lax.map(one, segs).transpose(1, 0, 2)
        return jnp.where(member.any(-1)[..., None], out, 0.0)
    w = member.astype(jnp.float32)
    if mode == "weightedmean":
        # Weights count from each text's first token (prompt or not), as in `pool`.
        w = w * (segment_positions(segment_ids) + 1).astype(jnp.float32)[:, None, :]
    summed = jnp.einsum("rsl,rlh->rsh", w, h)
    count = jnp.sum(w, axis=-1)[..., None]
    if mode == "mean_sqrt_len_tokens":
        return summed / jnp.sqrt(jnp.maximum(count, 1e-9))
    return summed / jnp.maximum(count, 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` in fp32, as ``torch.nn.functional.normalize``."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)
