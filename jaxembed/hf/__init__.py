"""Loading and saving Hugging Face model folders (local paths only; there is no hub access).

Each supported family has a module with a mapping table (`jaxembed.hf.mapping.Row`s),
``config_from_hf`` / ``config_to_hf`` and ``build``; this file dispatches on the
``model_type`` in ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import jax.numpy as jnp
from flax import nnx

from jaxembed.hf import bert
from jaxembed.hf.io import ModelFolderError, read_weights, write_weights
from jaxembed.hf.mapping import expand, export_params, load_params

FAMILIES: dict[str, ModuleType] = dict.fromkeys(bert.MODEL_TYPES, bert)
__all__ = [
    "FAMILIES",
    "ModelFolderError",
    "export_state_dict",
    "load_model",
    "read_config",
    "save_model",
]


def read_config(path: str | os.PathLike) -> dict:
    """``config.json`` of an HF model folder, with errors that name the folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(
            f"{path}: not a directory (expected a local Hugging Face model folder)"
        )
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelFolderError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_file}: invalid JSON ({e})") from None
    if "model_type" not in cfg:
        raise ModelFolderError(f"{cfg_file}: no 'model_type' key")
    return cfg


def family(model_type: str) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ModelFolderError(
            f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        ) from None


def load_model(path: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False) -> nnx.Module:
    """Builds the NNX backbone of an HF folder and fills it with the folder's weights.

    Parameters are fp32 whatever the file's dtype; ``dtype`` is the compute dtype. The model
    is first built abstractly (`nnx.eval_shape`), so no random initialisation is computed
    for weights that are about to be overwritten.
    """
    path = Path(path)
    hf_cfg = read_config(path)
    fam = family(hf_cfg["model_type"])
    tensors = read_weights(path)
    cfg = fam.config_from_hf(hf_cfg, has_pooler=any(k.endswith(fam.POOLER_KEY) for k in tensors))
    model = nnx.eval_shape(lambda: fam.build(cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    rows = expand(fam.table(cfg), fam.num_layers(cfg))
    load_params(model, rows, tensors, source=str(path))
    return model


def export_state_dict(model: nnx.Module, dtype=jnp.float32) -> dict:
    """The HF state dict (NumPy) of a backbone, through the same table that loaded it."""
    cfg = model.config
    fam = family(cfg.model_type)
    return export_params(model, expand(fam.table(cfg), fam.num_layers(cfg)), dtype=dtype)


def save_model(model: nnx.Module, path: str | os.PathLike, dtype=jnp.float32) -> list[str]:
    """Writes ``config.json`` and the safetensors weights of ``model`` into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf_cfg = family(cfg.model_type).config_to_hf(cfg)
    hf_cfg["torch_dtype"] = jnp.dtype(dtype).name
    files = write_weights(path, export_state_dict(model, dtype=dtype))
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / "config.json")
    return ["config.json", *files]
