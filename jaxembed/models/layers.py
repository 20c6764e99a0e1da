"""Small NNX building blocks shared by the backbones.

Every parameter carries its logical axis names in the variable metadata key ``axes``
(e.g. ``("embed", "mlp")``). `jaxembed.sharding` turns those names into mesh axes with a
small rules table; the models themselves never see a mesh. We keep the names in our own
metadata key instead of Flax's ``out_sharding`` so that creating a model outside a mesh
context (loading, tests, export) never triggers Flax's eager sharding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed.seeds import fold_seed, mix32

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """An fp32 (or given-dtype) parameter annotated with logical axis names."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, axes=axes)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with the kernel stored (in, out), cast to ``dtype`` for compute.

    With a LoRA adapter (``lora``) its low-rank update is added.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(_normal(rngs, (in_features, out_features), init_std, param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.dtype = dtype
        self.lora = nnx.data(None)  # a LoRA adapter (`jaxembed.models.lora`), when one is added

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype)
        return y


class Embed(nnx.Module):
    """A lookup table of shape (num_embeddings, features)."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: Axes,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.embedding = param(
            _normal(rngs, (num_embeddings, features), init_std, param_dtype), axes
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in fp32 whatever the compute dtype (bf16 variance underflows)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.scale = param(jnp.ones((features,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((features,), param_dtype), ("norm",)) if use_bias else None
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, seed: jax.Array | None) -> jax.Array:
    """Inverted dropout driven by an explicit uint32 seed; the identity when ``seed`` is None.

    An explicit seed (instead of a stateful ``nnx.Rngs`` stream) makes the randomness a pure
    function of its inputs, which GradCache needs to replay dropout exactly in its second pass.
    ``seed`` is one scalar, or one seed per row (shape ``x.shape[:1]``, the train step's): a
    row's mask is then a function of its own seed and of the element's index within the row
    only, so it is the same however the rows are chunked or sharded, without running the
    backbone under a per-row `jax.vmap` (which fused attention kernels cannot batch).
    """
    if seed is None or rate == 0.0:
        return x
    lead = seed.ndim  # 0: one seed for all of x; 1: one per row
    within = x.shape[lead:]
    idx = jax.lax.iota(jnp.uint32, math.prod(within)).reshape(within)
    seed = seed.reshape(seed.shape + (1,) * len(within))
    bits = mix32(mix32(idx ^ seed) ^ fold_seed(seed, 0x5EED))
    keep = bits >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    """The HF ``hidden_act`` by name, with the exact (erf) GELU for ``"gelu"`` as in PyTorch."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


# --- running layers: remat, stacked layers (scan) --------------------------------------------


def merged_call(graphdef, state, *args):
    """``nnx.merge(graphdef, state)(*args)``: a module as a pure function of its state, which
    `jax.checkpoint` and `jax.lax.scan` need."""
    return nnx.merge(graphdef, state)(*args)


def call_layer(layer: nnx.Module, *args, remat: bool = False):
    """``layer(*args)``; with ``remat`` only the layer's inputs are kept for the backward pass
    and the rest is recomputed. A plain `jax.checkpoint` over the layer's state (not
    ``nnx.remat``) composes with the JAX transformations around the model (GradCache's vjp)."""
    if not remat:
        return layer(*args)
    graphdef, state = nnx.split(layer)
    return jax.checkpoint(functools.partial(merged_call, graphdef))(state, *args)


def stacked_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` layers (``make_layer(rngs)``) as one module with a leading layer dimension.

    Run by `jax.lax.scan`, so compile time does not grow with depth.
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
        return make_layer(rngs)

    layers = make(rngs)
    # Our logical names live in the "axes" metadata, which nnx.vmap does not know about.
    for _, var in nnx.iter_graph(layers):
        if isinstance(var, nnx.Param):
            var.set_metadata("axes", ("layers", *var.get_metadata("axes")))
    return layers


# --- decoder blocks shared by Qwen3 and Gemma3 ------------------------------------------------


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, Llama-style, with HF's names."""

    def __init__(self, hidden: int, intermediate: int, act: str, *, dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# --- rotary position embeddings (Qwen3, ModernBERT) ----------------------------------------


def rotary(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, ...]:
    """cos and sin tables (batch, length, head_dim) of ``positions`` (batch or 1, length) for
    HF's "rotate half" rotary embedding."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` (batch, length, heads, head_dim) rotated by position."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- sequence packing -----------------------------------------------------------------------
# A packed row holds several texts ("segments") back to back: ``segment_ids`` numbers them
# 1, 2, ... and marks padding 0. Attention stays inside a segment and positions restart in
# each, so every text gets the states it would get alone in an unpacked row.


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(batch, length) position of every token within its own segment (0 at its start)."""
    idx = jnp.arange(segment_ids.shape[1])
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    first = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
    return idx - first
