"""The layers sentence-transformers applies after pooling: ``Dense`` projections, ``Normalize``
and, last, a ``SparseAutoEncoder`` (CSR, `jaxembed.models.sparse`).

LaBSE has a tanh ``Dense`` after CLS pooling; EmbeddingGemma two bias-free ``Dense`` layers
(768 -> 3072 -> 768) after mean pooling. `Head` runs such a stack on pooled (..., dim)
vectors, in fp32 whatever the backbone's compute dtype: it is a few small matrices applied
once per text. A head ending in a sparse autoencoder makes a sparse model: its output is
the autoencoder's top-k latents, scored by dot product, never L2-normalised. Its
parameters train with the backbone's (their own logical axes, so they shard like any
weight) and export back to the same ``N_Dense`` / ``N_SparseAutoEncoder`` folders
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
from jaxembed.models.sparse import SparseAutoEncoder

HEAD_ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "silu", "sigmoid")
SPARSE = "sparse_autoencoder"
HEAD_KINDS = ("dense", "normalize", SPARSE)


@dataclasses.dataclass(frozen=True)
class HeadLayer:
    """One module after pooling: ``kind`` "dense" (with its shape), "normalize" or
    "sparse_autoencoder" (input size, hidden size and ``k``, ``k_aux``, ``dead_threshold``).

    A dense layer is sentence-transformers' ``Dense``: ``act(x @ W + b)``, plus ``x`` (or a
    bias-free projection of ``x`` when the sizes differ) with ``residual``.
    """

    kind: str
    in_features: int = 0
    out_features: int = 0
    bias: bool = True
    activation: str = "identity"
    residual: bool = False
    k: int = 0  # sparse_autoencoder: the latents kept, those kept for the auxiliary loss,
    k_aux: int = 0  # and the forward passes without firing after which a latent is dead
    dead_threshold: int = 30

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head layer kind {self.kind!r}; expected one of {HEAD_KINDS}")
        if self.kind == SPARSE and not 0 < self.k <= self.out_features:
            raise ValueError(
                f"SparseAutoEncoder k={self.k} must be in 1..hidden_dim={self.out_features}"
            )
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
    """The post-pooling stack: its dense layers in ``dense``, in order, normalisations
    between, and its sparse autoencoder, last, in ``sparse`` (None: a dense model)."""

    def __init__(self, layers: Sequence[HeadLayer], *, rngs: nnx.Rngs):
        self.layers = tuple(layers)
        check_chain(self.layers)
        self.dense = nnx.List([Dense(x, rngs=rngs) for x in self.layers if x.kind == "dense"])
        last = self.layers[-1] if self.layers else None
        self.sparse = nnx.data(
            SparseAutoEncoder(last, rngs=rngs) if last is not None and last.kind == SPARSE else None
        )

    @property
    def out_features(self) -> int | None:
        """The embedding size after the head (None: no dense layer, the pooled size)."""
        if self.sparse is not None:
            return self.sparse.layer.out_features
        return self.dense[-1].layer.out_features if len(self.dense) else None

    def before_sparse(self, x: jax.Array) -> jax.Array:
        """The layers before the sparse autoencoder (all of them in a dense model)."""
        x = x.astype(jnp.float32)
        dense = iter(self.dense)
        for layer in self.layers:
            if layer.kind == "dense":
                x = next(dense)(x)
            elif layer.kind == "normalize":
                x = l2_normalize(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.before_sparse(x)
        return x if self.sparse is None else self.sparse(x)


def check_chain(layers: Sequence[HeadLayer], pooled: int | None = None) -> None:
    """Each dense layer (and the sparse autoencoder) must take the previous one's output
    size (the first: ``pooled``); a sparse autoencoder can only be last."""
    size = pooled
    for i, layer in enumerate(layers):
        if layer.kind == "normalize":
            continue
        if layer.kind == SPARSE and i != len(layers) - 1:
            raise ValueError(f"head layer {i} (SparseAutoEncoder) must be the last module")
        name = "Dense" if layer.kind == "dense" else "SparseAutoEncoder"
        if size is not None and layer.in_features != size:
            raise ValueError(
                f"head layer {i} ({name}) takes {layer.in_features} features but receives {size}"
            )
        size = layer.out_features


def build_head(
    layers: Sequence[HeadLayer], pooled: int | None = None, seed: int = 0
) -> Head | None:
    """A randomly initialised `Head` of ``layers``; None when they have no parameters.

    ``pooled``, if given, is the size of the pooled vectors the head receives.

    A head of normalisations only needs no parameters: the embeddings are L2-normalised
    in the end anyway, and a normalisation of a normalised vector changes nothing.
    """
    check_chain(layers, pooled)
    if all(x.kind == "normalize" for x in layers):
        return None
    return Head(layers, rngs=nnx.Rngs(seed))
