"""The model a run trained, rebuilt from one checkpoint step.

The backbone's shape comes from the run's copy of the model folder (`abstract_model`), its
parameters from the step (`checkpoint.read_params`: ``params["model"]``, a LoRA run's
adapters over its base folder's weights, the Dense head), and its sentence-transformers
settings from the step's meta (`export_meta.trained_st_config`). `jaxembed.load`,
`jaxembed.convert`, `jaxembed.merge` and mining with a checkpoint as teacher all read a run
through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed import checkpoint, hf, sharding
from jaxembed.export_meta import trained_st_config
from jaxembed.files import is_url, local_copy, run_path
from jaxembed.hf.io import ModelFolderError
from jaxembed.hf.sentence_transformers import STConfig, load_head, read_st_config
from jaxembed.models import lora
from jaxembed.models.head import Head, build_head
from jaxembed.models.pooling import SPLADE
from jaxembed.workdir import Checkpoint, base_folder, find_checkpoint, is_checkpoint


def lora_spec(config) -> lora.LoRASpec | None:
    """The run's LoRA settings (``model.lora``; a config or its dict form), None when off."""
    cfg = config["model"].get("lora") or {}
    if not cfg.get("rank"):
        return None
    return lora.LoRASpec(
        int(cfg["rank"]), float(cfg["alpha"]), float(cfg["dropout"]), tuple(cfg["targets"])
    )


def with_adapters(model: nnx.Module, spec: lora.LoRASpec | None, seed: int = 0) -> nnx.Module:
    """``model`` with LoRA adapters on the linear layers ``spec`` targets (unchanged if None)."""
    if spec is not None:
        lora.add_adapters(
            model, [row.flax for row in hf.lora_rows(model, spec.targets)], spec, seed
        )
    return model


def abstract_model(
    model_dir: Path,
    dtype: str = "float32",
    remat: bool = False,
    adapters=None,
    attention: str = "auto",
) -> nnx.Module:
    """The backbone's shape (no arrays) from a run's model folder and its family table,
    with the LoRA adapters of ``adapters`` (a `lora.LoRASpec`) if given, running
    ``attention`` (`jaxembed.models.attention`)."""
    hf_cfg = hf.read_config(model_dir)
    fam = hf.family(hf_cfg["model_type"])
    info = json.loads((model_dir / "jaxembed.json").read_text())
    mlm_head = info.get("mlm_head", False)  # SPLADE's
    cfg = hf.model_config(hf_cfg, has_pooler=info["has_pooler"], mlm_head=mlm_head)

    def build():
        model = fam.build(cfg, dtype=jnp.dtype(dtype), remat=remat, rngs=nnx.Rngs(0))
        model.attention = attention
        return with_adapters(model, adapters)

    return nnx.eval_shape(build)


def abstract_head(model_dir: Path, pooled: int | None = None) -> Head | None:
    """The shape of the folder's Dense head (`jaxembed.models.head`), None if it has none.

    ``pooled``: the backbone's output size, which the first Dense layer must take.
    """
    return nnx.eval_shape(lambda: build_head(read_st_config(model_dir).head, pooled))


def initial_head(model_dir: Path, st: STConfig, pooled: int, seed: int = 0) -> Head | None:
    """The head a run starts from: the folder it started from's, with its weights; layers
    the run appended start from a random draw (``seed``), as sentence-transformers'
    conversions do: a sparse autoencoder (``model.sparse="csr"``, after the folder's own
    Dense layers, loaded) or a multi-vector projection (``model.multi_vector_dim``)."""
    base = base_folder(model_dir)
    base_st = read_st_config(base)
    if st.head == base_st.head:
        return load_head(base, st, pooled)
    head = build_head(st.head, pooled, seed)
    if st.csr:
        loaded = load_head(base, base_st, pooled)
        for new, old in zip(head.dense, loaded.dense if loaded is not None else (), strict=True):
            nnx.update(new, nnx.state(old))
    return head


def checkpoint_model(ckpt: Checkpoint, dtype: str = "float32") -> nnx.Module:
    """`abstract_model` of a checkpoint's run (adapters included for a LoRA run); an error
    naming the run if it cannot be built."""
    try:
        return abstract_model(ckpt.model_dir, dtype, adapters=lora_spec(ckpt.config))
    except (ValueError, KeyError, TypeError) as e:
        # ModelFolderError (unknown model_type) is a ValueError, as are config_from_hf's.
        raise ModelFolderError(
            f"{ckpt.name}: its model ({ckpt.model_dir / 'config.json'}) cannot be mapped back "
            f"to a Hugging Face family: {e}"
        ) from None


def restore_model(ckpt: Checkpoint, *, dtype: str = "float32", mesh=None) -> nnx.Module:
    """The backbone with the checkpoint's parameters (a LoRA run's adapters merged in).

    Only ``params["model"]`` of the train state is restored (`checkpoint.read_params`),
    so neither the optimizer state nor the original model folder is needed. Without
    ``mesh`` the parameters come back as host (NumPy) arrays; with one, as global arrays
    sharded per `jaxembed.sharding`, which is how a model larger than one device is held.
    A LoRA run's checkpoints hold only the adapters: the base weights are read from the
    folder it was trained from (`restore_adapted`), and the result is merged.
    """
    if lora_spec(ckpt.config) is not None:
        return lora.merged(restore_adapted(ckpt, dtype=dtype, mesh=mesh))
    return _restore(ckpt, "model", checkpoint_model(ckpt, dtype), mesh)


def restore_adapted(ckpt: Checkpoint, *, dtype: str = "float32", mesh=None) -> nnx.Module:
    """A LoRA run's backbone with its adapters unmerged: frozen base weights from the
    folder the run started from (`workdir.base_folder`, as in training), adapters from the
    step."""
    model = checkpoint_model(ckpt, dtype)
    source = base_folder(ckpt.model_dir)
    adapters, base = lora.split(model)
    mlm_head = getattr(model.config, "add_mlm_head", False)  # SPLADE's, as in training
    loaded = hf.load_model(source, dtype=jnp.dtype(dtype), mlm_head=mlm_head)
    base_params = nnx.to_pure_dict(nnx.state(loaded))
    if mesh is not None:
        shardings = nnx.to_pure_dict(sharding.state_shardings(base, mesh))
        base_params = jax.device_put(base_params, shardings)
    params = lora.join(base_params, _restore_params(ckpt, "lora", adapters, mesh))
    return nnx.merge(nnx.graphdef(model), params)


def restore_head(ckpt: Checkpoint, mesh=None) -> Head | None:
    """The trained Dense head (``params["head"]``) as host arrays; None if the run has none."""
    head = abstract_head(ckpt.model_dir)
    return None if head is None else _restore(ckpt, "head", head, mesh)


def _restore(ckpt: Checkpoint, name: str, module: nnx.Module, mesh) -> nnx.Module:
    params = _restore_params(ckpt, name, nnx.state(module), mesh)
    return nnx.merge(nnx.graphdef(module), params)


def _restore_params(ckpt: Checkpoint, name: str, state: nnx.State, mesh) -> dict:
    """``params[name]`` of the step, shaped as the (abstract) ``state``, as pure dicts."""
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes)
    else:
        shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
        item = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
        )
    return checkpoint.read_params(ckpt.workdir, ckpt.step, name, item)


def load_model_or_run(
    path: Path, dtype: str = "float32"
) -> tuple[nnx.Module, Head | None, STConfig, Path]:
    """``(backbone, Dense head, sentence-transformers settings, tokenizer folder)`` of a
    model folder or of a training run (WORKDIR[/STEP]: as its export would be), host arrays;
    either may be on a bucket (gs://BUCKET/PATH)."""
    path = run_path(path, "model")
    if (path / "config.json").exists() or not is_checkpoint(path):
        # A model folder (or an error naming what is missing from one).
        if is_url(path) and not path.exists():
            raise ModelFolderError(f"{path}: no such folder")
        path = local_copy(path)  # a bucket's: a local copy, for transformers
        st = read_st_config(path)
        model = hf.load_model(path, dtype=jnp.dtype(dtype), mlm_head=st.pooling == SPLADE)
        return model, load_head(path, st, model.config.hidden_size), st, path
    ckpt = find_checkpoint(path)
    model = restore_model(ckpt, dtype=dtype)
    return model, restore_head(ckpt), trained_st_config(ckpt, model.config), ckpt.model_dir
