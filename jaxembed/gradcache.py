"""GradCache: exact gradients of an in-batch contrastive loss for batches larger than memory.

An in-batch loss couples every example, so plain gradient accumulation is not the same as
one big batch. GradCache (Gao et al., 2021) splits the work in three:

1. encode every tower (queries, positives, negatives) chunk by chunk without keeping
   activations: nothing is differentiated, so each chunk's activations die with it;
2. evaluate the loss on the full embedding matrices and differentiate it with respect to
   the embeddings only (cheap: embeddings are (rows, dim));
3. re-encode each chunk under `jax.vjp` and pull the cached embedding gradients back into
   the parameters, accumulating over chunks.

Memory is one chunk's activations plus the (rows, dim) embeddings, whatever the batch size,
at the price of a second forward pass. Dropout is seeded per row (see `row_seeds`), so both
passes, and the unchunked path, draw identical masks. Chunks are strided over the batch
(chunk k holds rows k, k + n_chunks, ...), so each chunk is spread evenly over the
data-parallel devices and no rows move between devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxembed.seeds import fold_seed


def row_seeds(seed: jax.Array | None, tower: int, rows: int) -> jax.Array | None:
    """One uint32 dropout seed per row, a pure function of (step seed, tower, global row).

    Seeding rows individually makes dropout independent of chunking and of the mesh shape.
    """
    if seed is None:
        return None
    return fold_seed(fold_seed(seed, tower), jnp.arange(rows, dtype=jnp.uint32))


def to_chunks(x: jax.Array, n_chunks: int) -> jax.Array:
    """(rows, ...) -> (n_chunks, rows / n_chunks, ...), chunk k holding rows k::n_chunks."""
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape(rows // n_chunks, n_chunks, *x.shape[1:]), 0, 1)


def from_chunks(x: jax.Array) -> jax.Array:
    """The inverse of `to_chunks`."""
    n_chunks, size = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(n_chunks * size, *x.shape[2:])


def num_chunks(rows: int, chunk_size: int, what: str) -> int:
    if rows % chunk_size:
        raise ValueError(
            f"gradcache: {what} has {rows} rows, not divisible by chunk size {chunk_size}"
        )
    return rows // chunk_size


def chunked_encode(
    encode: Callable, params, inputs: tuple, n_chunks: int, constrain: Callable = lambda x: x
) -> jax.Array:
    """Pass 1: embeddings of every row, computed chunk by chunk, with no gradient."""
    chunks = jax.tree.map(lambda x: to_chunks(x, n_chunks), inputs)

    def one(chunk):
        return encode(jax.lax.stop_gradient(params), *jax.tree.map(constrain, chunk))

    return from_chunks(jax.lax.map(one, chunks))


def chunked_vjp(
    encode: Callable,
    params,
    inputs: tuple,
    cotangent: jax.Array,
    n_chunks: int,
    constrain: Callable = lambda x: x,
):
    """Pass 3: sum over chunks of (d embeddings / d params)^T @ cached embedding gradients."""
    chunks = jax.tree.map(lambda x: to_chunks(x, n_chunks), inputs)
    cts = to_chunks(cotangent, n_chunks)

    def body(acc, xs):
        chunk, ct = xs
        chunk = jax.tree.map(constrain, chunk)
        _, pullback = jax.vjp(lambda p: encode(p, *chunk), params)
        (grad,) = pullback(constrain(ct))
        return jax.tree.map(jnp.add, acc, grad), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(body, zeros, (chunks, cts))
    return grads


def value_and_grad(
    encode: Callable,
    loss_of_embeddings: Callable,
    params,
    towers: dict[str, tuple],
    extra,
    chunk_size: int,
    constrain: Callable = lambda x: x,
):
    """GradCache's loss and gradients, equal to differentiating the unchunked computation.

    Args:
      encode: ``encode(params, *tower_inputs) -> (rows, dim)`` embeddings.
      loss_of_embeddings: ``loss(embeddings: dict[name, (rows, dim)], extra) -> (scalar,
        aux)``, ``aux`` anything the loss computes besides (returned, not differentiated).
      params: the parameters to differentiate.
      towers: name -> tuple of arrays with a leading row dimension (ids, masks, row keys...).
      extra: other differentiable loss inputs (e.g. a learnable temperature).
      chunk_size: rows per chunk; must divide every tower's row count.
      constrain: applied to each chunk's arrays (a sharding constraint on the mesh).

    Returns:
      ``((loss, aux), (param_grads, extra_grads))``.
    """
    n = {
        name: num_chunks(inputs[0].shape[0], chunk_size, f"tower '{name}'")
        for name, inputs in towers.items()
    }
    embeddings = {
        name: chunked_encode(encode, params, inputs, n[name], constrain)
        for name, inputs in towers.items()
    }
    loss, (emb_grads, extra_grads) = jax.value_and_grad(
        loss_of_embeddings, argnums=(0, 1), has_aux=True
    )(embeddings, extra)
    grads = None
    for name, inputs in towers.items():
        g = chunked_vjp(encode, params, inputs, emb_grads[name], n[name], constrain)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    return loss, (grads, extra_grads)
