"""Device mesh, logical-axis rules and the shardings of parameters and batches.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``norm``; see
`jaxembed.models.layers`). A small rules table maps each name to mesh axes:

    embed -> fsdp          (FSDP: every weight matrix is split along its model dimension)
    layers, norm -> replicated  (``layers``: the stacked dimension of scanned decoders)
    heads, mlp, vocab -> tensor   (Megatron-style tensor parallelism, if the mesh has it)
    batch -> (data, fsdp)  (the global batch is split over every data-parallel device)

A dimension that the mesh axes do not divide evenly is replicated instead (logged in the
start-up table), so any device count works with any model. The mesh uses Auto axes: the
losses multiply globally sharded embeddings and GSPMD inserts the cross-device gathers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    # The stacked-layer dimension of scanned decoders stays whole: the scan slices it.
    ("layers", None),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all, across every host).

    One size may be -1: it takes whatever the others leave. The product must equal the
    device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    for k, v in sizes.items():
        if v != -1 and v < 1:
            raise ValueError(f"mesh.{k}={v} must be >= 1 or -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices cannot be split as {sizes} "
                f"({len(devices)} is not divisible by {fixed})"
            )
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are "
            f"{len(devices)} devices"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    whole = len(devices) == len(jax.devices()) and devices == list(jax.devices())
    grid = device_grid(shape, devices) if whole else np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: tuple[int, ...], devices: Sequence) -> np.ndarray:
    """``devices`` (a whole platform's) as an array of ``shape``, ordered so that neighbouring
    mesh coordinates are fast links (`mesh_utils.create_device_mesh`: on a TPU slice a
    physical ring, which interleaves the hosts along the data axis, see `local_rows`).
    Splitting a physical axis is allowed: a v5e-16 has no 2 x 8 layout otherwise."""
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(global_batch: int, mesh: Mesh, what: str = "global batch size") -> None:
    """The global batch must split evenly over the data-parallel devices."""
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ValueError(
            f"{what} {global_batch} is not divisible by the data-parallel size {n} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )


def rows_per_device(mesh: Mesh, global_batch: int, chunk: int = 0) -> str:
    """A line for the start of a run: one data-parallel device's rows of the global batch
    and, with GradCache, of a chunk (which bounds the device's activations)."""
    n = data_parallel_size(mesh)
    line = f"each data-parallel device ({n}) holds {global_batch // n} rows of the global batch"
    line += f" of {global_batch}"
    if chunk:
        line += f", {chunk // n} rows of each GradCache chunk of {chunk}"
    return line


def _mesh_axes_for(name, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    table = dict(rules)
    if name not in table:
        raise KeyError(f"logical axis {name!r} has no sharding rule; rules: {sorted(table)}")
    axes = table[name]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> P:
    """The PartitionSpec for a tensor of ``shape`` with logical ``axes``.

    Mesh axes of size 1 are dropped, a mesh axis is used at most once per tensor, and a
    dimension not divisible by its mesh axes' total size stays replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(
            a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape.get(a, 1) > 1
        )
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """NamedShardings for an (abstract) state of `nnx.Variable`s, from their ``axes`` metadata.

    Variables without axes metadata are replicated.
    """

    def one(var):
        axes = var.get_metadata("axes", None) if isinstance(var, nnx.Variable) else None
        if axes is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, rows: int) -> np.ndarray:
    """The global row of each of this process's rows of a batch-sharded ``rows``-row array,
    in the order `jax.make_array_from_process_local_data` places a
    host's local rows: its blocks of the batch in increasing global order.

    A host's blocks need not be contiguous: on a TPU slice the mesh follows the physical
    ring, and a v4-32's data axis holds processes 0, 1, 2, 3, 0, 1, ... Packed batches
    address their rows globally (slots), so each host needs this map.
    """
    return rows_of_process(mesh.devices, jax.process_index(), rows)


def rows_of_process(grid: np.ndarray, process: int, rows: int) -> np.ndarray:
    """`local_rows` on a (data, fsdp, tensor) array of devices (anything with a
    ``process_index``): batch block b = data index * fsdp + fsdp index holds rows
    b * rows / (data * fsdp) onwards; a block on several of a host's devices (over
    ``tensor``) counts once."""
    data, fsdp, tensor = grid.shape
    blocks = data * fsdp
    if rows % blocks:
        raise ValueError(f"{rows} rows do not split over {blocks} data-parallel devices")
    owners = np.vectorize(lambda d: d.process_index, otypes=[np.int64])(
        grid.reshape(blocks, tensor)
    )
    mine = np.flatnonzero((owners == process).any(axis=1))
    per = rows // blocks
    return (mine[:, None] * per + np.arange(per)[None, :]).reshape(-1)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places a host-complete batch on the mesh, every array split on its leading dimension.

    (Multi-host input, where each host holds only its slice, uses `from_process_local`.)
    """
    return {k: jax.device_put(v, batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}


def from_process_local(arrays: dict[str, np.ndarray], mesh: Mesh) -> dict:
    """Global arrays assembled from every host's local rows (the train step's input).

    Each process passes its own slice of the global batch; the arrays are split on their
    leading dimension over the data-parallel axes.
    """
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x)
        for key, x in arrays.items()
    }


def describe(state: nnx.State, shardings) -> str:
    """A table of every parameter: path, shape, dtype, logical axes, PartitionSpec."""
    rows = [("parameter", "shape", "dtype", "logical axes", "sharding")]
    flat_state = nnx.to_flat_state(state)
    flat_sh = dict(nnx.to_flat_state(shardings)) if isinstance(shardings, nnx.State) else None
    total = 0
    for path, var in flat_state:
        name = ".".join(str(p) for p in path)
        sh = flat_sh[path] if flat_sh is not None else None
        spec = getattr(sh, "spec", None) if sh is not None else None
        axes = var.get_metadata("axes", None) if isinstance(var, nnx.Variable) else None
        rows.append(
            (name, str(tuple(var.shape)), str(var.dtype), str(axes), str(spec) if spec else "-")
        )
        total += math.prod(var.shape)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{total:,} parameters")
    return "\n".join(lines)
