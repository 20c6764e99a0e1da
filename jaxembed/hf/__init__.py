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
import numpy as np
from flax import nnx

from jaxembed.files import atomic_write_text
from jaxembed.hf import bert, gemma3, mapping, modernbert, qwen3
from jaxembed.hf.io import ModelFolderError, read_weights, write_weights_stream
from jaxembed.hf.mapping import Row, expand, load_params
from jaxembed.progress import Progress

FAMILIES: dict[str, ModuleType] = {
    **dict.fromkeys(bert.MODEL_TYPES, bert),
    **dict.fromkeys(gemma3.MODEL_TYPES, gemma3),
    **dict.fromkeys(modernbert.MODEL_TYPES, modernbert),
    **dict.fromkeys(qwen3.MODEL_TYPES, qwen3),
}
__all__ = [
    "FAMILIES",
    "ModelFolderError",
    "hf_config",
    "iter_export",
    "linear_layers",
    "load_model",
    "lora_rows",
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


def has_pooler(fam: ModuleType, keys) -> bool:
    """Whether a family's optional pooler tensors are among ``keys`` (BERT's tanh pooler)."""
    return fam.POOLER_KEY is not None and any(k.endswith(fam.POOLER_KEY) for k in keys)


def has_mlm_head(hf_cfg: dict, keys) -> bool:
    """Whether a checkpoint's tensors (``keys``) hold its family's MLM head (SPLADE's)."""
    fam = family(hf_cfg["model_type"])
    return hasattr(fam, "has_mlm_head") and fam.has_mlm_head(hf_cfg, keys)


def model_config(hf_cfg: dict, *, has_pooler=None, mlm_head: bool = False, source=""):
    """The family's model config of an HF ``config.json`` dict (``has_pooler`` None: the
    family's default), with the MLM head if asked (a family without one here: one line
    naming the folder ``source``)."""
    fam = family(hf_cfg["model_type"])
    pooler = {} if has_pooler is None else {"has_pooler": has_pooler}
    if not mlm_head:
        return fam.config_from_hf(hf_cfg, **pooler)
    if not hasattr(fam, "has_mlm_head"):
        raise ModelFolderError(
            f"{source}: model_type {hf_cfg['model_type']!r} has no masked-language-model head "
            "here (SPLADE needs one: BERT, RoBERTa, XLM-R, CamemBERT)"
        )
    return fam.config_from_hf(hf_cfg, **pooler, mlm_head=True)


def load_model(
    path: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False, mlm_head: bool = False
) -> nnx.Module:
    """Builds the NNX backbone of an HF folder and fills it with the folder's weights
    (``mlm_head``: with its masked-language-model head, which SPLADE needs).

    Parameters are fp32 whatever the file's dtype; ``dtype`` is the compute dtype. The model
    is first built abstractly (`nnx.eval_shape`), so no random initialisation is computed
    for weights that are about to be overwritten.
    """
    path = Path(path)
    hf_cfg = read_config(path)
    fam = family(hf_cfg["model_type"])
    tensors = read_weights(path)
    if mlm_head and not has_mlm_head(hf_cfg, tensors):
        raise ModelFolderError(
            f"{path}: no masked-language-model head among its weights (SPLADE needs a "
            "*ForMaskedLM checkpoint; a sentence-transformers model has none: use CSR)"
        )
    cfg = model_config(hf_cfg, has_pooler=has_pooler(fam, tensors), mlm_head=mlm_head, source=path)
    model = nnx.eval_shape(lambda: fam.build(cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    rows = expand(fam.table(cfg), fam.num_layers(cfg))
    load_params(model, rows, tensors, source=str(path))
    return model


def export_rows(model: nnx.Module) -> list[Row]:
    """The expanded mapping table of a backbone: what export walks, in order."""
    cfg = model.config
    fam = family(cfg.model_type)
    return expand(fam.table(cfg), fam.num_layers(cfg))


def linear_layers(model: nnx.Module) -> dict[str, Row]:
    """The backbone's linear layers by HF module name (``{i}`` for stacked layers' index),
    each with its table row (a ``*.kernel`` stored as a transposed torch ``Linear``)."""
    return {
        row.hf.removesuffix(".weight"): row
        for row in export_rows(model)
        if row.transform == "transpose" and row.flax.endswith(".kernel")
    }


def lora_rows(model: nnx.Module, targets) -> list[Row]:
    """The rows of the linear layers that LoRA ``targets`` name, matched as PEFT matches
    ``target_modules``: a target equals the HF module name or ends it after a dot
    ("q_proj", "self_attn.q_proj", "attention.self.query"). A target that matches nothing
    is an error listing the names it could have been."""
    layers = linear_layers(model)

    def hit(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    for target in targets:
        if not any(hit(name, target) for name in layers):
            names = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ValueError(
                f"model.lora.targets: {target!r} names no linear layer of this "
                f"{model.config.model_type} model; its linear layers: {names}"
            )
    return [row for name, row in layers.items() if any(hit(name, t) for t in targets)]


def iter_export(model: nnx.Module, dtype=jnp.float32, fetch=np.asarray):
    """``(hf_key, array)`` pairs of a backbone, one at a time (see `mapping.iter_export`)."""
    return mapping.iter_export(model, export_rows(model), dtype, fetch)


def hf_config(model: nnx.Module, dtype=jnp.float32) -> dict:
    """The ``config.json`` dict of a backbone: its family's HF config, updated."""
    cfg = model.config
    out = family(cfg.model_type).config_to_hf(cfg)
    out["torch_dtype"] = jnp.dtype(dtype).name
    return out


def save_model(
    model: nnx.Module,
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    fetch=np.asarray,
    max_shard_bytes: int = 5 << 30,
) -> list[str]:
    """Writes ``config.json`` and the safetensors weights of ``model`` into ``path``.

    Tensors are converted and written one at a time (`iter_export`), so host memory holds
    one tensor beyond the model, whatever the model's size. ``fetch`` brings a parameter
    to host memory (default: `numpy.asarray`; multi-host callers gather). Returns the
    file names written.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = export_rows(model)
    specs = mapping.export_specs(model, rows, dtype)
    # Large models take minutes to gather and write: report (a bar on a terminal).
    with Progress(len(specs), "writing weights", "tensors", enabled=len(specs) >= 200) as p:

        def counted():
            for item in mapping.iter_export(model, rows, dtype, fetch):
                yield item
                p.update(1)

        files = write_weights_stream(path, specs, counted(), max_shard_bytes)
    config = json.dumps(hf_config(model, dtype), indent=2, sort_keys=True) + "\n"
    atomic_write_text(path / "config.json", config)
    return ["config.json", *files]
