"""A training run on disk: what `jaxembed.train` leaves in WORKDIR, and reading it back.

::

    WORKDIR/model/           the backbone's non-weight files (config.json, tokenizer, ST files)
                             and jaxembed.json (source folder, whether it has a pooler)
    WORKDIR/checkpoints/N/   Orbax steps: the train state, the data position and ``meta``
    WORKDIR/metrics.jsonl    the logged scalars, dev evaluations included

``meta`` (`run_meta`) records pooling, prefixes, instruction template, the datasets and
the config: enough for `jaxembed.convert` and `jaxembed.load(WORKDIR)` to rebuild the
trained encoder (`restore_model`, `trained_st_config`) without the training code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed import checkpoint as ckpt_lib
from jaxembed import hf, sharding
from jaxembed.files import atomic_dir, check_local_path
from jaxembed.hf.io import ModelFolderError
from jaxembed.hf.sentence_transformers import STConfig, load_head, read_st_config
from jaxembed.models import lora
from jaxembed.models.head import Head, build_head
from jaxembed.tokenizer import append_eos, load_tokenizer

# --- the run's model folder -------------------------------------------------------------------


def prepare_model_dir(source: str, target: Path, pooling: str = "") -> Path:
    """The run's own copy of the backbone's non-weight files (config, tokenizer, ST files).

    A resumed run, the exporter and `jaxembed.load(workdir)` read this copy, so the original
    folder is only needed for the first initialisation. With last-token pooling (``pooling``,
    else the folder's own) the copied tokenizer is saved appending EOS (`tokenizer.append_eos`),
    so the data pipeline, evaluation and the exported folder all tokenize the same way.
    """
    if (target / "config.json").exists():
        return target
    if not source:
        raise ValueError("config.model.path is empty: name a local Hugging Face model folder")
    src = Path(source)
    hf.read_config(src)  # fails early, naming the folder, if it is not a model folder
    with atomic_dir(target) as tmp:
        _copy_model_files(src, tmp, pooling)
    return target


def _copy_model_files(src: Path, tmp: Path, pooling: str) -> None:
    for item in src.iterdir():
        if item.name in hf.io.WEIGHT_FILES or item.suffix in (".safetensors", ".bin", ".pt"):
            continue
        if item.is_dir():
            if item.name.startswith(".") or not any(item.iterdir()):
                continue
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    tensors = hf.io.read_weights(src)
    fam = hf.family(hf.read_config(src)["model_type"])
    info = {
        "source": str(src.absolute()),
        "has_pooler": hf.has_pooler(fam, tensors),
    }
    (tmp / "jaxembed.json").write_text(json.dumps(info, indent=2))
    if (pooling or read_st_config(tmp).pooling) == "lasttoken":
        tokenizer = load_tokenizer(tmp)
        before = tokenizer("a")["input_ids"]
        if append_eos(tokenizer, "lasttoken")("a")["input_ids"] != before:
            tokenizer.save_pretrained(tmp)


# --- finding and restoring a checkpoint -------------------------------------------------------


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing, or a step that does not exist; the message names it."""


@dataclasses.dataclass
class Checkpoint:
    """One step of a training run: where it is, and its ``meta`` item."""

    workdir: Path
    step: int
    meta: dict

    @property
    def name(self) -> str:
        return f"{self.workdir}/{ckpt_lib.CKPT_DIR}/{self.step}"

    @property
    def config(self) -> dict:
        """The run's config (``meta`` stores it as JSON)."""
        cfg = self.meta.get("config", {})
        return json.loads(cfg) if isinstance(cfg, str) else cfg

    @property
    def model_dir(self) -> Path:
        """The run's copy of the model's non-weight files (config.json, tokenizer, ST files).

        ``WORKDIR/model`` first, so a run directory that was moved still converts; then the
        absolute path recorded at training time.
        """
        local = self.workdir / "model"
        if (local / "config.json").exists():
            return local
        recorded = Path(self.meta.get("model_dir", ""))
        if (recorded / "config.json").exists():
            return recorded
        raise ModelFolderError(
            f"{self.name}: the run's model files (config.json, tokenizer) are missing; "
            f"looked in {local} and {recorded}"
        )


def _split(path: Path) -> tuple[Path, int | None]:
    """``(workdir, step or None)`` from WORKDIR, WORKDIR/STEP or WORKDIR/checkpoints[/STEP]."""
    if path.name == ckpt_lib.CKPT_DIR:
        return path.parent, None
    if path.name.isdigit():
        parent = path.parent
        if parent.name == ckpt_lib.CKPT_DIR:
            return parent.parent, int(path.name)
        if (parent / ckpt_lib.CKPT_DIR).is_dir() and not (path / ckpt_lib.CKPT_DIR).is_dir():
            return parent, int(path.name)
    return path, None


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a training run (or one of its steps) rather than an HF folder."""
    workdir, _ = _split(Path(path))
    return (workdir / ckpt_lib.CKPT_DIR).is_dir() and not (Path(path) / "config.json").exists()


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint ``path`` names: WORKDIR (its latest step), WORKDIR/STEP,
    WORKDIR/checkpoints or WORKDIR/checkpoints/STEP."""
    check_local_path(path, "checkpoint")
    path = Path(path)
    workdir, step = _split(path)
    if not path.exists() and step is None:
        raise CheckpointError(f"{path}: no such directory")
    if not (workdir / ckpt_lib.CKPT_DIR).is_dir():
        hint = (
            " (it is a model folder: load it directly)" if (path / "config.json").exists() else ""
        )
        raise CheckpointError(
            f"{path}: no checkpoint found (no {ckpt_lib.CKPT_DIR}/ directory){hint}"
        )
    try:
        step, meta = ckpt_lib.restore_meta(workdir, step)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    return Checkpoint(workdir, step, meta)


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
    cfg = fam.config_from_hf(hf_cfg, has_pooler=info["has_pooler"])

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

    Only ``params["model"]`` of the train state is restored (`checkpoint.restore_params`),
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
    source folder (recorded in ``WORKDIR/model/jaxembed.json``), adapters from the step."""
    model = checkpoint_model(ckpt, dtype)
    source = Path(json.loads((ckpt.model_dir / "jaxembed.json").read_text())["source"])
    if not (source / "config.json").exists():
        raise ModelFolderError(
            f"{ckpt.name}: a LoRA run's checkpoints hold only the adapters, and its base "
            f"model {source} (the weights they adapt) is gone"
        )
    adapters, base = lora.split(model)
    base_params = nnx.to_pure_dict(nnx.state(hf.load_model(source, dtype=jnp.dtype(dtype))))
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
    return ckpt_lib.restore_params(ckpt.workdir, ckpt.step, name, item)


def load_model_or_run(
    path: Path, dtype: str = "float32"
) -> tuple[nnx.Module, Head | None, STConfig, Path]:
    """``(backbone, Dense head, sentence-transformers settings, tokenizer folder)`` of a
    model folder or of a training run (WORKDIR[/STEP]: as its export would be), host arrays."""
    path = Path(path)
    if (path / "config.json").exists() or not is_checkpoint(path):
        # A model folder (or an error naming what is missing from one).
        model = hf.load_model(path, dtype=jnp.dtype(dtype))
        st = read_st_config(path)
        return model, load_head(path, st, model.config.hidden_size), st, path
    ckpt = find_checkpoint(path)
    model = restore_model(ckpt, dtype=dtype)
    return model, restore_head(ckpt), trained_st_config(ckpt, model.config), ckpt.model_dir


# --- what was trained: prompts, pooling, lengths ----------------------------------------------


def instruction_prompt(template: str, instruction: str) -> str:
    """The query prefix an instruction produced in training (the template up to ``{query}``)."""
    if not template.endswith("{query}"):
        raise ValueError(
            f"config.data.instruction_template={template!r} does not end with '{{query}}': "
            "its instructions cannot be written as sentence-transformers prompts (prefixes)"
        )
    return template[: -len("{query}")].format(instruction=instruction)


def single_instruction(meta: dict) -> str | None:
    """The instruction, if every dataset of the run carried the same single one."""
    datasets = meta.get("datasets", {}).values()
    found = {i for d in datasets for i in d.get("instructions", [])}
    if len(found) == 1 and datasets and all(d.get("instructions") for d in datasets):
        return found.pop()
    return None


def trained_prompts(meta: dict) -> dict[str, str]:
    """The sentence-transformers prompts of a run, by what its queries and passages carried.

    - ``document`` and ``passage`` (the same): the passage prefix.
    - ``query``: the one instruction prompt when every dataset carried the same single
      instruction (F2LLM with one task), else the plain query prefix (what queries without
      an instruction got).
    - otherwise one prompt per instructed dataset, named by the dataset (``name_k`` when a
      dataset carried several instructions).
    """
    template = meta.get("instruction_template", "{query}")
    instructed = {
        n: d["instructions"] for n, d in meta.get("datasets", {}).items() if d.get("instructions")
    }
    prompts: dict[str, str] = {}
    single = single_instruction(meta)
    if single is not None:
        prompts["query"] = instruction_prompt(template, single)
    else:
        prompts["query"] = meta.get("query_prefix", "")
        for name, found in instructed.items():
            for k, instruction in enumerate(found):
                key = name if len(found) == 1 else f"{name}_{k}"
                if key in ("query", "document"):
                    key += "_instruction"
                prompts[key] = instruction_prompt(template, instruction)
    # "document": what sentence-transformers >= 5 encodes documents with (encode_document)
    # and MTEB's prompt type; a "passage" prompt too would make MTEB warn on every load.
    prompts["document"] = meta.get("passage_prefix", "")
    return prompts


def trained_st_config(ckpt: Checkpoint, model_config) -> STConfig:
    """The sentence-transformers settings that reproduce the trained encoder.

    Pooling and ``include_prompt`` as trained, the base model's Dense head (trained with
    the backbone), L2 normalisation (the training losses compare normalised embeddings), the
    prompts of `trained_prompts`, and the base model's ``max_seq_length`` (else the longer
    of the training query / passage lengths).
    """
    source = read_st_config(ckpt.model_dir)
    data = ckpt.config.get("data", {})
    trained_len = max(data.get("max_query_length", 0), data.get("max_passage_length", 0))
    max_len = source.max_seq_length or min(trained_len, model_config.max_tokens) or None
    return STConfig(
        pooling=ckpt.meta["pooling"],
        include_prompt=bool(ckpt.meta.get("include_prompt", True)),
        max_seq_length=max_len,
        do_lower_case=source.do_lower_case,
        prompts=trained_prompts(ckpt.meta),
        default_prompt_name=None,
        head=source.head,
        head_dirs=source.head_dirs,
        normalize=True,
    )


def dev_metrics(ckpt: Checkpoint) -> tuple[int, dict] | None:
    """The last dev evaluation logged in ``WORKDIR/metrics.jsonl`` at or before the step."""
    path = ckpt.workdir / "metrics.jsonl"
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        evals = {k[len("eval/") :]: v for k, v in rec.items() if k.startswith("eval/")}
        if evals and rec.get("step", 0) <= ckpt.step:
            last = (rec["step"], evals)
    return last


# --- what a run records ----------------------------------------------------------------------


INSTRUCTION_SAMPLE = 64  # rows per dataset read to record its instructions


def dataset_instructions(source, sample: int = INSTRUCTION_SAMPLE) -> list[str]:
    """The distinct query instructions of ``sample`` evenly spaced rows of a dataset.

    Instructions are per record, but datasets (F2LLM's, the Debian builder's) use one each;
    a sample finds it without reading a large dataset whole.
    """
    n = len(source)
    rows = np.unique(np.linspace(0, n - 1, min(sample, n)).astype(np.int64)) if n else []
    found = [source[int(i)].get("instruction") or "" for i in rows]
    return sorted({x for x in found if x})


def run_meta(config, model_dir: Path, pooling: str, sources) -> dict:
    """The checkpoint's JSON ``meta`` item: what the exporter and `jaxembed.load` rebuild from."""
    datasets = {}
    for s in sources:
        d = datasets.setdefault(s.name, {"task": s.task, "rows": 0, "instructions": []})
        d["rows"] += len(s)
        d["instructions"] = sorted({*d["instructions"], *dataset_instructions(s)})
    return {
        "model_dir": str(model_dir.absolute()),
        "pooling": pooling,
        # Training pools over every query token, prompt included: batches carry no
        # ``query_pool_mask`` (see `_towers`), so an export must say include_prompt=True.
        "include_prompt": True,
        "query_prefix": config.data.query_prefix,
        "passage_prefix": config.data.passage_prefix,
        "instruction_template": config.data.instruction_template,
        "config": config.to_json_best_effort(),
        "datasets": datasets,
    }
