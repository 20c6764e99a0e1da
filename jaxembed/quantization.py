"""Quantized embeddings: binary (1 bit a dimension, 32x smaller than float32) and int8 (a
byte, 4x), as sentence-transformers' ``quantize_embeddings`` makes them, their search as
users deploy it, and the straight-through versions training optimises (``loss.quantization``).

Deployment (`quantize`, `search`), following sentence-transformers:

- binary: bit ``x > 0`` per dimension; the index ranks documents by Hamming distance (the
  same order as the inner product of the +-1 vectors); then the best ``rescore_multiplier
  * k`` candidates are rescored with the float query against the +-1 documents.
- int8: per-dimension ranges (min, max) from calibration embeddings; a value's code is
  ``clip(floor((x - min) / step), 0, 255)`` with ``step = (max - min) / 255``; the index
  ranks by the inner product of codes (queries coded with the same ranges); the candidates
  are rescored with the float query against the dequantized documents. The ranges are part
  of the model (`save_ranges`): queries and documents must be coded alike.

Training (`straight_through`, wrapped around a loss by `with_quantization`): the loss of
the quantized embeddings (forward: the codes, backward: the identity), added to the float
loss with weight ``loss.quantization_weight``, so the float embeddings (for rescoring) stay
good. Binary codes are taken from each vector scaled to unit RMS, so the identity gradient
and the +-1 codes are on one scale; int8 ranges are the batch's own (all devices', masked
negatives left out), held fixed for the gradient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.choices import QUANTIZATIONS
from jaxembed.files import atomic_write_text, run_path
from jaxembed.search import top_k

RANGES_FILE = "quantization_ranges.json"  # in an export: the int8 ranges


# --- deployment (NumPy) ---------------------------------------------------------------------


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
    """``(2, D)``: per-dimension min and max of ``calibration`` (float embeddings)."""
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 2 or len(calibration) < 2:
        raise ValueError(f"int8 ranges need a (N >= 2, D) calibration set; got {calibration.shape}")
    return np.stack([calibration.min(0), calibration.max(0)])


def int8_codes(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Codes 0..255 (uint8) of ``x`` in ``ranges`` (sentence-transformers' ``uint8``; its
    ``int8`` is the same minus 128)."""
    start, step = _start_step(ranges)
    return np.clip(np.floor((np.asarray(x, np.float32) - start) / step), 0, 255).astype(np.uint8)


def dequantize(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    start, step = _start_step(ranges)
    return start + step * codes.astype(np.float32)


def _start_step(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranges = np.asarray(ranges, np.float32)
    step = (ranges[1] - ranges[0]) / 255
    return ranges[0], np.where(step == 0, 1, step)


def quantize(x: np.ndarray, mode: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """What an index stores: ``binary``: packed bits (``D / 8`` bytes a vector); ``int8``:
    uint8 codes (``D`` bytes)."""
    if mode == "binary":
        return np.packbits(np.asarray(x) > 0, axis=-1)
    if mode == "int8":
        if ranges is None:
            raise ValueError("int8 quantization needs ranges (int8_ranges of a calibration set)")
        return int8_codes(x, ranges)
    raise ValueError(f"quantization {mode!r}: expected one of {QUANTIZATIONS[1:]}")


def search(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    mode: str,
    *,
    ranges: np.ndarray | None = None,
    rescore_multiplier: int = 4,
    block: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents of float ``queries`` in a quantized index of float ``docs``:
    ``(scores, indices)``, rescored as the module docstring says (``rescore_multiplier`` 0:
    the index's own ranking). Exact, blocked (`search.top_k`); ties: lower index first."""
    if mode == "int8" and ranges is None:
        ranges = int8_ranges(docs)
    found = index_search(queries, docs, k * (rescore_multiplier or 1), mode, ranges, block)
    if not rescore_multiplier:
        return found
    return rescore(queries, docs, found[1], k, mode, ranges)


def index_search(queries, docs, k: int, mode: str, ranges=None, block: int = 16384):
    """The index's own top-``k``: Hamming (binary) or inner products of int8 codes; the
    first ``k'`` of a top-``k`` are the top-``k'``."""
    return top_k(_codes(queries, mode, ranges), _codes(docs, mode, ranges), k, block)


def rescore(queries, docs, candidates: np.ndarray, k: int, mode: str, ranges=None):
    """The best ``k`` of each query's ``candidates``, rescored by the float query against
    the documents as the index stores them (+-1, or dequantized int8)."""
    queries = np.asarray(queries, np.float32)
    if mode == "binary":
        stored = _codes(docs, mode)
    else:
        stored = dequantize(int8_codes(docs, _checked(ranges, docs)), ranges)
    scores = np.einsum("qd,qkd->qk", queries, stored[candidates])
    # Stable sort on -score: equal rescored scores keep the index's order (lower index first).
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


def _codes(x: np.ndarray, mode: str, ranges=None) -> np.ndarray:
    """What the index computes with, as float32: +-1 (binary) or codes 0..255 (int8)."""
    if mode == "binary":
        return np.where(np.asarray(x) > 0, 1.0, -1.0).astype(np.float32)
    if mode == "int8":
        return int8_codes(x, _checked(ranges, x)).astype(np.float32)
    raise ValueError(f"quantization {mode!r}: expected one of {QUANTIZATIONS[1:]}")


def _checked(ranges, x) -> np.ndarray:
    if ranges is None or np.shape(ranges) != (2, np.shape(x)[1]):
        raise ValueError(
            f"int8 ranges of shape {np.shape(ranges)} for {np.shape(x)[1]}-d embeddings"
        )
    return ranges


def save_ranges(folder: str | os.PathLike, ranges: np.ndarray) -> None:
    data = {"min": ranges[0].tolist(), "max": ranges[1].tolist()}
    atomic_write_text(Path(folder) / RANGES_FILE, json.dumps(data) + "\n")


def load_ranges(folder: str | os.PathLike) -> np.ndarray | None:
    path = run_path(folder, "model") / RANGES_FILE  # a local folder or a bucket's
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return np.asarray([data["min"], data["max"]], np.float32)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: not int8 ranges ({e})") from None


# --- training (JAX) -------------------------------------------------------------------------


def straight_through(x: jax.Array, mode: str, ranges: jax.Array | None = None) -> jax.Array:
    """The codes of ``x`` in the forward pass, the identity in the backward pass."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if mode == "binary":
        u = x * jax.lax.rsqrt(jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True), 1e-24))
        codes = jnp.where(u > 0, 1.0, -1.0)
    elif mode == "int8":
        start, stop = ranges[0], ranges[1]
        step = jnp.where(stop > start, (stop - start) / 255, 1.0)
        u = (x - start) / step
        codes = jnp.clip(jnp.floor(u), 0, 255)
    else:
        raise ValueError(f"quantization {mode!r}: expected one of {QUANTIZATIONS[1:]}")
    # codes + (u - u): exactly the codes forward (u + (codes - u) may round), u's gradient.
    return jax.lax.stop_gradient(codes) + (u - jax.lax.stop_gradient(u))


def batch_ranges(q: jax.Array, p: jax.Array, n: jax.Array, neg_mask) -> jax.Array:
    """``(2, D)`` per-dimension min and max over the batch's queries, positives and real
    negatives (padded ones are zeros, not embeddings), fixed for the gradient."""
    big = jnp.float32(jnp.finfo(jnp.float32).max)
    real = jnp.ones(n.shape[:2], bool) if neg_mask is None else neg_mask
    n_lo = jnp.where(real[..., None], n, big).min((0, 1), initial=big)
    n_hi = jnp.where(real[..., None], n, -big).max((0, 1), initial=-big)
    lo = jnp.minimum(jnp.minimum(q.min(0), p.min(0)), n_lo)
    hi = jnp.maximum(jnp.maximum(q.max(0), p.max(0)), n_hi)
    return jax.lax.stop_gradient(jnp.stack([lo, hi]).astype(jnp.float32))


def with_quantization(loss_fn, mode: str, weight: float):
    """``loss_fn`` (shared signature, `jaxembed.losses`) plus ``weight`` times the same loss
    of the straight-through codes of ``q``, ``p`` and ``n``."""
    if mode not in QUANTIZATIONS[1:]:
        raise ValueError(f"quantization {mode!r}: expected one of {QUANTIZATIONS[1:]}")

    def loss(q, p, n, **kwargs):
        ranges = batch_ranges(q, p, n, kwargs.get("neg_mask")) if mode == "int8" else None
        coded = [straight_through(x, mode, ranges) for x in (q, p, n)]
        return loss_fn(q, p, n, **kwargs) + weight * loss_fn(*coded, **kwargs)

    return loss
