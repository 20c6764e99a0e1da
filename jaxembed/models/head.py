"""The layers sentence-transformers applies after pooling: ``Dense`` projections, ``Normalize``.

LaBSE has a tanh ``Dense`` after CLS pooling; EmbeddingGemma two bias-free ``Dense`` layers
(768 -> 3072 -> 768) after mean pooling. `Head` runs such a stack on pooled (..., dim)
vectors, in fp32 whatever the backbone's compute dtype: it is a few small matrices applied
once per text. Its parameters train with the backbone's (their own logical axes, so they
shard like any weight) and export back to the same ``N_Dense`` folders
(`jaxembed.hf.sentence_transformers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed.models.layers import ACTIVATIONS, Linear
from jaxembed.models.pooling import l2_normalize

HEAD_ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "silu", "sigmoid")


@dataclasses.dataclass(frozen=True)
class HeadLayer:
    """One module after pooling: ``kind`` "dense" (with its shape) or "normalize".

    A dense layer is sentence-transformers' ``Dense``: ``act(x @ W + b)``, plus ``x`` (or a
    bias-free projection of ``x`` when the sizes differ) with ``residual``.
    """

    kind: str
    in_features: int = 0
    out_features: int = 0
    bias: bool = True
    activation: str = "identity"
    residual: bool = False

    def __post_init__(self):
        if self.kind not in ("dense", "normalize"):
            raise ValueError(f"head layer kind {self.kind!r}; expected 'dense' or 'normalize'")
        if self.kind == "dense" and self.activation not in HEAD_ACTIVATIONS:
            raise ValueError(
                f"Dense activation {self.activation!r}; supported: {list(HEAD_ACTIVATIONS)}"
            )


def _activate(name: str, x: jax.Array) -> jax.Array:
    if name == "identity":
        return x
    if name == "sigmoid":
        return jax.nn.sigmoid(x)
    return ACTIVATIONS[name](x)


class Dense(nnx.Module):
    """sentence-transformers' ``Dense``: a linear layer, its activation, an optional residual."""

    def __init__(self, layer: HeadLayer, *, rngs: nnx.Rngs):
        n_in, n_out = layer.in_features, layer.out_features
        self.linear = Linear(n_in, n_out, axes=("embed", "mlp"), use_bias=layer.bias, rngs=rngs)
        # With different sizes the residual goes through its own bias-free projection.
        project = layer.residual and n_in != n_out
        self.residual = (
            Linear(n_in, n_out, axes=("embed", "mlp"), use_bias=False, rngs=rngs)
            if project
            else None
        )
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _activate(self.layer.activation, self.linear(x))
        if self.layer.residual:
            y = y + (x if self.residual is None else self.residual(x))
        return y


class Head(nnx.Module):
    """The post-pooling stack: its dense layers in ``dense``, in order, normalisations between."""

    def __init__(self, layers: Sequence[HeadLayer], *, rngs: nnx.Rngs):
        self.layers = tuple(layers)
        check_chain(self.layers)
        self.dense = nnx.List([Dense(x, rngs=rngs) for x in self.layers if x.kind == "dense"])

    @property
    def out_features(self) -> int | None:
        """The embedding size after the head (None: no dense layer, the pooled size)."""
        return self.dense[-1].layer.out_features if len(self.dense) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        dense = iter(self.dense)
        for layer in self.layers:
            x = next(dense)(x) if layer.kind == "dense" else l2_normalize(x)
        return x


def check_chain(layers: Sequence[HeadLayer], pooled: int | None = None) -> None:
    """Each dense layer must take the previous one's output size (the first: ``pooled``)."""
    size = pooled
    for i, layer in enumerate(layers):
        if layer.kind != "dense":
            continue
        if size is not None and layer.in_features != size:
            raise ValueError(
                f"head layer {i} (Dense) takes {layer.in_features} features but receives {size}"
            )
        size = layer.out_features


def build_head(
    layers: Sequence[HeadLayer], pooled: int | None = None, seed: int = 0
) -> Head | None:
    """A randomly initialised `Head` of ``layers``; None when they hold no dense layer.

    ``pooled``, if given, is the size of the pooled vectors the head receives.

    A head of normalisations only needs no parameters: the embeddings are L2-normalised
    in the end anyway, and a normalisation of a normalised vector changes nothing.
    """
    check_chain(layers, pooled)
    if not any(x.kind == "dense" for x in layers):
        return None
    return Head(layers, rngs=nnx.Rngs(seed))
