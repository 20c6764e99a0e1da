"""Dropout seeds: a keyed 32-bit integer hash, the same however a batch is chunked or sharded.

Shared by the backbones (dropout masks) and the training core (per-row seeds for GradCache);
it depends on nothing but JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Dropout randomness is a keyed integer hash of (seed, element index), not threefry: XLA
# compiles threefry slowly (about 12 s extra per train step on CPU for a 2-layer model), and
# a hash of the element index is trivially the same however a batch is chunked or sharded.
_M1, _M2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser with good avalanche ("lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_M2)
    return x ^ (x >> 16)


def to_seed(rng: jax.Array | None) -> jax.Array | None:
    """A uint32 dropout seed from a seed or a JAX PRNG key (None stays None)."""
    if rng is None:
        return None
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.bits(rng, (), jnp.uint32)
    return jnp.asarray(rng).astype(jnp.uint32)


def fold_seed(seed: jax.Array, n) -> jax.Array:
    """A new seed derived from ``seed`` and an integer (a site, layer or row index)."""
    n = jnp.asarray(n).astype(jnp.uint32)
    return mix32(seed ^ mix32(n * jnp.uint32(_GOLDEN) + jnp.uint32(_GOLDEN)))


def split_rng(seed: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent seeds, or ``n`` Nones when dropout is off."""
    if seed is None:
        return [None] * n
    return [fold_seed(seed, i) for i in range(n)]
