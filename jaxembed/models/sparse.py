"""CSR: a sparse top-k autoencoder over a dense model's embedding (Wen et al., 2025,
"Beyond Matryoshka: Revisiting Sparse Coding for Adaptive Representation").

sentence-transformers 6 turns a dense model into a `SparseEncoder` by appending its
``SparseAutoEncoder`` module: the unit embedding ``x`` goes through ``(x - pre_bias) @ W +
latent_bias``, of which the ``k`` largest latents are kept (ReLU'd) and the rest set to 0:
a vector of ``hidden`` dimensions with at most ``k`` non-zeros, scored by dot product.
``W`` is tied: the decoder reads the latents back with its transpose, ``latents @ W.T +
pre_bias``. (sentence-transformers appends it after a SentenceTransformer folder's last
module, its Normalize, and to a bare transformer folder after mean pooling without one;
here the input is always the unit embedding: a Normalize is added where a folder has none.)

Training is sentence-transformers' ``CSRLoss``: InfoNCE on the sparse vectors (``gamma``,
in `jaxembed.step`) plus the reconstructions of ``x`` (`reconstruction_loss`) from its
top-k and top-4k latents (the second weighted 1/8) and, weighted ``beta``, the auxiliary
loss that revives dead latents: the ``k_aux`` largest of the latents that have not fired
for ``dead_threshold`` forward passes reconstruct what the top-k missed. Which latents are
dead is a count per latent (``stats_last_nonzero``), updated as the torch module updates
its buffer: twice per column (queries, positives, each hard negative) and step, after the
top-k and after the top-4k, reset to 1 where a latent fired. The count is state but not a
parameter: the train state keeps it in ``buffers``, computed from the global batch, so it
is the same on every mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed.models.layers import Linear, param

STATS = "stats_last_nonzero"  # the torch module's buffer name, kept for the export


class SparseAutoEncoder(nnx.Module):
    """sentence-transformers' ``SparseAutoEncoder`` (``normalize=False``), ``layer`` a
    `jaxembed.models.head.HeadLayer` of kind "sparse_autoencoder"."""

    def __init__(self, layer, *, rngs: nnx.Rngs):
        n_in, hidden = layer.in_features, layer.out_features
        self.pre_bias = param(jnp.zeros((n_in,), jnp.float32), ("embed",))
        # torch's nn.Linear draws U(-1/sqrt(in), 1/sqrt(in)): the same variance, as a normal.
        std = (3.0 * n_in) ** -0.5
        self.encoder = Linear(
            n_in, hidden, axes=("embed", "mlp"), use_bias=False, init_std=std, rngs=rngs
        )
        self.latent_bias = param(jnp.zeros((hidden,), jnp.float32), ("mlp",))
        self.layer = layer

    def pre_activation(self, x: jax.Array) -> jax.Array:
        """The latents before the top-k, (..., hidden), fp32."""
        x = x.astype(jnp.float32) - self.pre_bias[...]
        return self.encoder(x) + self.latent_bias[...]

    def decode(self, latents: jax.Array) -> jax.Array:
        """The tied decoder without its bias: ``latents @ W.T``."""
        return latents @ self.encoder.kernel[...].T

    def __call__(self, x: jax.Array, k: int | None = None) -> jax.Array:
        """The sparse embedding: the ``k`` (default: the layer's) largest latents, ReLU'd."""
        return top_k(self.pre_activation(x), k or self.layer.k)[0]


def top_k(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ReLU of the top-k latents scattered into zeros, their indices, their values)``."""
    values, indices = jax.lax.top_k(pre, k)
    kept = jnp.put_along_axis(jnp.zeros_like(pre), indices, values, axis=-1, inplace=False)
    return jax.nn.relu(kept), indices, values


def _fired(indices: jax.Array, values: jax.Array, rows: jax.Array, hidden: int) -> jax.Array:
    """(hidden,) bool: latents among some real row's top values above 1e-5 (the torch rule)."""
    hit = (values > 1e-5) & rows[:, None]
    counts = (
        jnp.zeros((hidden,), jnp.int32)
        .at[indices.reshape(-1)]
        .add(hit.reshape(-1).astype(jnp.int32))
    )
    return counts > 0


def _update(stats: jax.Array, fired: jax.Array) -> jax.Array:
    return jnp.where(fired, 0, stats) + 1


def _mse(a: jax.Array, b: jax.Array, rows: jax.Array) -> jax.Array:
    """torch's ``F.mse_loss`` (the mean over elements) over the real ``rows``."""
    per_row = jnp.mean((a - b) ** 2, axis=-1)
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def _normalized_mse(recon: jax.Array, x: jax.Array, rows: jax.Array) -> jax.Array:
    """sentence-transformers' ``normalized_mean_squared_error``: the MSE over the MSE of
    predicting the batch mean (1 where that is 0 or every row equals the first)."""
    n = jnp.maximum(jnp.sum(rows), 1)
    mean = jnp.sum(jnp.where(rows[:, None], x, 0.0), axis=0) / n
    scale = _mse(jnp.broadcast_to(mean, x.shape), x, rows)
    first = x[jnp.argmax(rows)]
    same = jnp.all(jnp.where(rows[:, None], x == first, True))
    scale = jnp.where((scale == 0) | same, 1.0, scale)
    return _mse(recon, x, rows) / scale


def reconstruction_loss(
    sae: SparseAutoEncoder, towers: list[tuple[jax.Array, jax.Array]], stats: jax.Array, beta
) -> tuple[jax.Array, jax.Array]:
    """CSR's reconstruction terms, averaged over the columns, and the updated dead counts.

    ``towers``: ``(x, rows)`` per column in the order sentence-transformers runs them
    (queries, positives, each hard negative): x the (n, dim) inputs of the autoencoder,
    rows the (n,) bool of real texts (padded negatives take no part; a column without one
    is no column: neither averaged nor counted). Returns ``(L_k + L_4k / 8 + beta * L_aux,
    stats)``.
    """
    layer = sae.layer
    hidden = layer.out_features
    total, columns = 0.0, 0
    for x, rows in towers:
        present = jnp.any(rows)
        x = x.astype(jnp.float32)
        pre = sae.pre_activation(x)
        latents_k, idx, vals = top_k(pre, layer.k)
        stats = jnp.where(present, _update(stats, _fired(idx, vals, rows, hidden)), stats)
        dead = stats > layer.dead_threshold  # read after the top-k's update, as torch does
        latents_4k, idx4, vals4 = top_k(pre, min(4 * layer.k, hidden))
        stats = jnp.where(present, _update(stats, _fired(idx4, vals4, rows, hidden)), stats)
        bias = sae.pre_bias[...]
        recon_k = sae.decode(latents_k)  # before the bias: the auxiliary target needs it
        term = _mse(x, recon_k + bias, rows) + _mse(x, sae.decode(latents_4k) + bias, rows) / 8
        if layer.k_aux:
            aux = top_k(pre * dead, min(layer.k_aux, hidden))[0]
            target = x - jax.lax.stop_gradient(recon_k)
            term = term + beta * _normalized_mse(sae.decode(aux) + bias, target, rows)
        total, columns = total + jnp.where(present, term, 0.0), columns + present
    return total / jnp.maximum(columns, 1), stats


def active_dims(x) -> float:
    """The mean count of non-zero dimensions per row of ``x`` (a NumPy, JAX or
    ``scipy.sparse`` array)."""
    if x.shape[0] == 0:
        return 0.0
    if hasattr(x, "getnnz"):  # scipy.sparse: its stored values may include explicit zeros
        return float((abs(x) > 0).sum(axis=1).mean())
    return float((x != 0).sum(-1).mean())
