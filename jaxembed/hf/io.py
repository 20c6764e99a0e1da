"""Reading and writing Hugging Face weight files without PyTorch.

- ``model.safetensors`` and sharded ``model.safetensors.index.json``: parsed directly (an
  8-byte header length, a JSON header, raw little-endian data) and memory-mapped, so bf16
  tensors load without torch and a large model is never read whole.
- ``pytorch_model.bin`` (and its sharded index): PyTorch's zip format, unpickled with an
  allow-list of the few classes a state dict uses; tensors are rebuilt as NumPy arrays. No
  other pickled class is ever constructed, so a hostile file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxembed.files import atomic_open, atomic_write_text

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelFolderError(ValueError):
    """An HF model folder is missing, incomplete or of an unsupported kind."""


class WeightsError(ModelFolderError):
    """A weight file is missing, malformed, or does not match the model."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file, memory-mapped (read-only)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise WeightsError(
                f"{path}: damaged or not a safetensors file (its header claims {n:,} bytes, "
                f"the file has {size:,})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: damaged safetensors header (not a JSON object)")
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        if size > 8 + n
        else np.zeros(0, np.uint8)
    )
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        want = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        if end > len(data) or end - start != want:
            raise WeightsError(
                f"{path}: tensor {key!r} needs bytes {start:,}..{end:,} of the data section, "
                f"which has {len(data):,}: the file is truncated or damaged"
            )
        out[key] = np.asarray(data[start:end]).view(dtype).reshape(info["shape"])
    return out


TensorSpec = tuple[tuple[int, ...], np.dtype]  # (shape, dtype) of a tensor to be written


def spec_of(array: np.ndarray) -> TensorSpec:
    return tuple(array.shape), np.dtype(array.dtype)


def _nbytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Writes ``tensors`` to ``path`` atomically (temp file, then rename)."""
    keys = sorted(tensors)
    write_safetensors_stream(
        path, {k: spec_of(tensors[k]) for k in keys}, ((k, tensors[k]) for k in keys), metadata
    )


def write_safetensors_stream(
    path: str | os.PathLike,
    specs: dict[str, TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict | None = None,
) -> None:
    """Writes one safetensors file from an iterator, holding one tensor in memory at a time.

    The header (shapes, dtypes, offsets) comes first in the format, so it is built from
    ``specs``; ``tensors`` must then yield exactly those keys, in the same order, with
    those shapes and dtypes. Atomic: a temp file, renamed when complete.
    """
    path = Path(path)
    tensors = iter(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, (shape, dtype) in specs.items():
        if np.dtype(dtype) not in _ST_NAMES:
            raise WeightsError(f"{path}: cannot write tensor {key!r} of dtype {dtype}")
        nbytes = _nbytes((shape, dtype))
        header[key] = {
            "dtype": _ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with atomic_open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for expected in specs:
            key, a = next(tensors, (None, None))
            if key != expected:
                raise WeightsError(f"{path}: expected tensor {expected!r} next, got {key!r}")
            if spec_of(a) != (tuple(specs[key][0]), np.dtype(specs[key][1])):
                raise WeightsError(
                    f"{path}: tensor {key!r} is {spec_of(a)}, the header says {specs[key]}"
                )
            # A byte view, not tobytes(): no second copy of a large tensor.
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


# --- pytorch_model.bin -----------------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *_args):
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset : offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *_args):
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(f)
        self.zf, self.prefix, self.source = zf, prefix, source
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(_TORCH_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise WeightsError(f"{self.source}: refusing to unpickle {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise WeightsError(f"{self.source}: unsupported storage record {pid!r}")
        if key not in self.storages:
            raw = self.zf.read(f"{self.prefix}/data/{key}")
            self.storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self.storages[key]


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch zip-format state dict as NumPy arrays, without importing torch."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise WeightsError(
            f"{path}: not a zip-format PyTorch file (legacy pre-1.6 pickles are not supported;"
            " re-save it as safetensors)"
        )
    with zipfile.ZipFile(path) as zf:
        pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise WeightsError(f"{path}: no data.pkl inside the archive")
        with zf.open(pkl) as f:
            state = _TorchUnpickler(f, zf, pkl[: -len("/data.pkl")], path).load()
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def read_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of an HF model folder, from safetensors if present, else pytorch_model.bin."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            reader = read_safetensors if "safetensors" in name else read_torch_bin
            out: dict[str, np.ndarray] = {}
            for shard in shards:
                out.update(reader(folder / shard))
            return out
        return read_safetensors(path) if name.endswith(".safetensors") else read_torch_bin(path)
    raise WeightsError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def shard_plan(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """The keys of each shard, in ``specs`` order: a new shard starts where one would overflow."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        nbytes = _nbytes(spec)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_weights(
    folder: str | os.PathLike, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 << 30
) -> list[str]:
    """Writes ``model.safetensors``, or shards plus ``model.safetensors.index.json`` when large.

    Returns the file names written.
    """
    keys = sorted(tensors)
    specs = {k: spec_of(tensors[k]) for k in keys}
    return write_weights_stream(folder, specs, ((k, tensors[k]) for k in keys), max_shard_bytes)


def write_weights_stream(
    folder: str | os.PathLike,
    specs: dict[str, TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    max_shard_bytes: int = 5 << 30,
) -> list[str]:
    """`write_weights` from an iterator yielding ``specs``' keys in order, one tensor at a time.

    A model larger than host memory can be written this way: only the tensor being written
    is held. Returns the file names written.
    """
    folder = Path(folder)
    tensors = iter(tensors)  # shared by the shards: each takes its keys from the front
    shards = shard_plan(specs, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors_stream(folder / "model.safetensors", specs, tensors)
        _check_exhausted(tensors, folder)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        write_safetensors_stream(folder / name, {k: specs[k] for k in keys}, tensors)
        weight_map.update(dict.fromkeys(keys, name))
    _check_exhausted(tensors, folder)
    index = {
        "metadata": {"total_size": sum(_nbytes(s) for s in specs.values())},
        "weight_map": weight_map,
    }
    atomic_write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def _check_exhausted(tensors: Iterator, folder: Path) -> None:
    extra = next(tensors, None)
    if extra is not None:
        raise WeightsError(f"{folder}: tensor {extra[0]!r} is not among the tensors to write")
