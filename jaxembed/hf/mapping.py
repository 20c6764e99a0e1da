"""The machinery behind the per-family mapping tables: one table, used in both directions.

A table is a list of `Row`s pairing a Flax parameter path with an HF tensor name, both
with an optional ``{i}`` layer placeholder, and a named transform. Loading walks the rows,
checks each tensor's shape against the parameter it fills and names the key on any
mismatch; export walks the same rows backwards.
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


def _transpose(x):
    return np.swapaxes(x, -1, -2)


# name -> (HF -> Flax, Flax -> HF)
TRANSFORMS = {
    "none": (lambda x: x, lambda x: x),
    # torch Linear stores (out, in); our kernels are (in, out).
    "transpose": (_transpose, _transpose),
}


def expand(table: Iterable[Row], num_layers: int) -> list[Row]:
    """Rows with ``{i}`` repeated once per layer."""
    out = []
    for row in table:
        if "{i}" in row.flax:
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


def param_paths(module: nnx.Module) -> set[str]:
    """Dotted paths of every `nnx.Param` in ``module``."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(str(p) for p in path) for path, _ in flat}


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
    prefix = find_prefix(tensors, rows[0].hf, source)
    used = set()
    for row in rows:
        key = prefix + row.hf
        var = get_variable(module, row.flax)
        if key not in tensors:
            raise WeightsError(f"{source}: missing tensor {key!r} (for parameter {row.flax})")
        value = TRANSFORMS[row.transform][0](np.asarray(tensors[key]))
        if tuple(value.shape) != tuple(var.shape):
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(TRANSFORMS[row.transform][1](np.empty(var.shape)).shape)} "
                f"for parameter {row.flax} {tuple(var.shape)}"
            )
        # Host memory: the caller places parameters (one device, or sharded over a mesh).
        var.set_value(np.asarray(value, dtype=param_dtype))
        used.add(key)
    unused = [k for k in tensors if k.startswith(prefix) and k not in used]
    unused = [k for k in unused if not k.endswith("position_ids")]  # a non-persistent buffer
    if unused:
        log.info(
            "%s: ignoring %d tensors not in the encoder (e.g. %s)", source, len(unused), unused[0]
        )


def export_params(module: nnx.Module, rows: list[Row], dtype=np.float32) -> dict[str, np.ndarray]:
    """The HF state dict of ``module``'s parameters (gathered to host memory)."""
    out = {}
    for row in rows:
        value = np.asarray(get_variable(module, row.flax).get_value())
        out[row.hf] = np.ascontiguousarray(TRANSFORMS[row.transform][1](value)).astype(dtype)
    return out
