"""The machinery behind the per-family mapping tables: one table, used in both directions.

A table is a list of `Row`s pairing a Flax parameter path with an HF tensor name, both
with an optional ``{i}`` layer placeholder, and a named transform. A row whose HF name has
``{i}`` but whose Flax path has none is *stacked*: one Flax parameter with a leading layer
dimension holds every layer's tensor (scanned layers, as in `jaxembed.models.qwen3`).
Loading walks the rows, checks each tensor's shape against the parameter it fills and
names the key on any mismatch; export walks the same rows backwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed.hf.io import WeightsError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Row:
    flax: str  # dotted path into the NNX module; integers index lists
    hf: str  # HF state-dict key, without the model-class prefix ("bert.", "roberta.")
    transform: str = "none"
    stacked: int = 0  # > 0: the Flax parameter stacks this many per-layer HF tensors
    prefixed: bool = True  # False: a task head's key, beside the base model ("cls.", "lm_head.")


def _transpose(x):
    return np.swapaxes(x, -1, -2)


# name -> (HF -> Flax, Flax -> HF)
TRANSFORMS = {
    "none": (lambda x: x, lambda x: x),
    # torch Linear stores (out, in); our kernels are (in, out).
    "transpose": (_transpose, _transpose),
}


def expand(table: Iterable[Row], num_layers: int) -> list[Row]:
    """Rows with ``{i}`` repeated once per layer (stacked rows record the layer count)."""
    out = []
    for row in table:
        if "{i}" in row.hf and "{i}" not in row.flax:
            out.append(dataclasses.replace(row, stacked=num_layers))
        elif "{i}" in row.flax:
            out += [
                dataclasses.replace(row, flax=row.flax.format(i=i), hf=row.hf.format(i=i))
                for i in range(num_layers)
            ]
        else:
            out.append(row)
    return out


def get_variable(module: nnx.Module, path: str) -> nnx.Variable:
    node = module
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"{path} is not a variable of {type(module).__name__}")
    return node


def _normalize_legacy(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # TF-era checkpoints name LayerNorm parameters gamma/beta; transformers renames on load.
    out = {}
    for key, value in tensors.items():
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
    return out


def find_prefix(tensors: dict[str, np.ndarray], anchor: str, source: str) -> str:
    """The model-class prefix ("", "bert.", "roberta.", ...) in front of ``anchor``."""
    if anchor in tensors:
        return ""
    for key in tensors:
        if key.endswith("." + anchor):
            return key[: -len(anchor)]
    raise WeightsError(f"{source}: tensor {anchor!r} not found (keys: {sorted(tensors)[:8]}...)")


def load_params(
    module: nnx.Module,
    rows: list[Row],
    tensors: dict[str, np.ndarray],
    *,
    source: str,
    param_dtype=jnp.float32,
) -> None:
    """Fills ``module``'s parameters in place from an HF state dict."""
    tensors = _normalize_legacy(tensors)
    prefix = find_prefix(tensors, rows[0].hf.format(i=0), source)
    used = set()

    def fetch(key: str, row: Row, expected: tuple) -> np.ndarray:
        if key not in tensors:
            raise WeightsError(f"{source}: missing tensor {key!r} (for parameter {row.flax})")
        value = TRANSFORMS[row.transform][0](np.asarray(tensors[key]))
        if tuple(value.shape) != expected:
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(TRANSFORMS[row.transform][1](np.empty(expected)).shape)} "
                f"for parameter {row.flax} {tuple(expected)}"
            )
        used.add(key)
        return np.asarray(value, dtype=param_dtype)

    for row in rows:
        var = get_variable(module, row.flax)
        shape = tuple(var.shape)
        if row.stacked:
            if shape[0] != row.stacked:
                raise WeightsError(
                    f"{source}: parameter {row.flax} stacks {shape[0]} layers, "
                    f"the table expects {row.stacked}"
                )
            value = np.stack(
                [fetch(prefix + row.hf.format(i=i), row, shape[1:]) for i in range(row.stacked)]
            )
        else:
            value = fetch((prefix if row.prefixed else "") + row.hf, row, shape)
        # Host memory: the caller places parameters (one device, or sharded over a mesh).
        var.set_value(value)
    unused = [k for k in tensors if k.startswith(prefix) and k not in used]
    unused = [k for k in unused if not k.endswith("position_ids")]  # a non-persistent buffer
    if unused:
        log.info(
            "%s: ignoring %d tensors not in the encoder (e.g. %s)", source, len(unused), unused[0]
        )


def _hf_views(row: Row, value: np.ndarray):
    """``(hf_key, view)`` of each HF tensor a parameter's value holds (views, no copies)."""
    to_hf = TRANSFORMS[row.transform][1]
    if row.stacked:
        for i in range(row.stacked):
            yield row.hf.format(i=i), to_hf(value[i])
    else:
        yield row.hf, to_hf(value)


def iter_export(module: nnx.Module, rows: list[Row], dtype=np.float32, fetch=np.asarray):
    """Yields ``(hf_key, array)`` one tensor at a time, in table order.

    Each parameter is fetched to host memory only when its turn comes (a stacked parameter
    is fetched once and split per layer), so a caller that writes as it goes never holds
    the whole model twice. ``fetch`` turns a parameter's value into a host array; a
    multi-host caller passes one that gathers the shards (a collective: every process
    must iterate).
    """
    for row in rows:
        value = fetch(get_variable(module, row.flax).get_value())
        for key, view in _hf_views(row, value):
            yield key, np.ascontiguousarray(view, dtype=dtype)


def export_specs(module: nnx.Module, rows: list[Row], dtype=np.float32) -> dict[str, tuple]:
    """``{hf_key: (shape, dtype)}`` of what `iter_export` yields, in its order, fetching nothing.

    ``module`` may be abstract. Safetensors headers are written before the data, so a
    streaming writer needs the shapes first.
    """
    out = {}
    for row in rows:
        shape = get_variable(module, row.flax).shape
        # A zero-stride array of the parameter's shape takes no memory; transforms are views.
        for key, view in _hf_views(row, np.broadcast_to(np.zeros((), np.float32), shape)):
            out[key] = (tuple(view.shape), np.dtype(dtype))
    return out
