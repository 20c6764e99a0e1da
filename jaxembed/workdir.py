"""A training run's folder: its layout, its copy of the model's files, finding its steps.

::

    WORKDIR/model/           the backbone's non-weight files (config.json, tokenizer, ST
                             files) and jaxembed.json (the source folder, whether it has a
                             pooler): `prepare_model_dir`
    WORKDIR/checkpoints/N/   Orbax steps: the train state, the data position and ``meta``
                             (`jaxembed.checkpoint`; meta: `jaxembed.export_meta`)
    WORKDIR/metrics.jsonl    the logged scalars, dev evaluations included (`jaxembed.run_log`)
    WORKDIR/remine/N.npz     negatives re-mined at step N (`jaxembed.remine`)
    WORKDIR/parameters.txt   every tensor's shape and sharding

`find_checkpoint` turns any of WORKDIR, WORKDIR/N, WORKDIR/checkpoints[/N] into a
`Checkpoint` (its folder, step and meta); `jaxembed.trained_model` rebuilds the model
from one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from jaxembed import checkpoint, hf
from jaxembed.files import atomic_dir, is_url, local_copy, run_path, upload_dir
from jaxembed.hf.io import ModelFolderError
from jaxembed.hf.sentence_transformers import output_settings, read_st_config, write_st_config
from jaxembed.models.pooling import SPLADE
from jaxembed.run_log import METRICS
from jaxembed.tokenizer import append_eos, load_tokenizer

MODEL_DIR = "model"
PARAMETERS = "parameters.txt"

# --- the run's model folder -------------------------------------------------------------------


def prepare_model_dir(source: str, target, pooling: str = "", **output) -> Path:
    """The run's own copy of the backbone's non-weight files (config, tokenizer, ST files).

    A resumed run, the exporter and `jaxembed.load(workdir)` read this copy, so the original
    folder is only needed for the first initialisation. With last-token pooling (``pooling``,
    else the folder's own) the copied tokenizer is saved appending EOS (`tokenizer.append_eos`),
    so the data pipeline, evaluation and the exported folder all tokenize the same way.
    ``target`` may be a bucket folder: built locally, then uploaded, config.json last.
    ``output`` (`config.output_type`) makes the run another model type (`hf.
    sentence_transformers.output_settings`): ``sparse="csr"`` appends an autoencoder to a
    dense model, ``"splade"`` pools the MLM head's logits, ``multi_vector=(dim, expansion,
    attended)`` keeps every token (a folder already of the type keeps its own).
    """
    if (target / "config.json").exists():
        return target
    if not source:
        raise ValueError("config.model.path is empty: name a local Hugging Face model folder")
    src = Path(source)
    hf.read_config(src)  # fails early, naming the folder, if it is not a model folder
    if is_url(target):
        with tempfile.TemporaryDirectory() as tmp:
            _copy_model_files(src, Path(tmp), pooling, output)
            upload_dir(Path(tmp), target, last="config.json")
        return target
    with atomic_dir(target) as tmp:
        _copy_model_files(src, tmp, pooling, output)
    return target


def _copy_model_files(src: Path, tmp: Path, pooling: str, output: dict) -> None:
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
    hf_cfg, source_st = hf.read_config(src), read_st_config(tmp)
    st = output_settings(source_st, hf_cfg["hidden_size"], **output)
    if st.pooling == SPLADE:
        if not hf.has_mlm_head(hf_cfg, tensors):
            raise ModelFolderError(
                f"{src}: model.sparse=splade needs a masked-language-model head, and this "
                f"{hf_cfg['model_type']} checkpoint has none (a *ForMaskedLM checkpoint of "
                "BERT, RoBERTa or XLM-R has one; for a dense model use model.sparse=csr)"
            )
        info["mlm_head"] = True
    if st != source_st:  # the run's own model type (configurations: weights are the run's)
        write_st_config(tmp, st, hf_cfg["hidden_size"], weights=False)
    (tmp / "jaxembed.json").write_text(json.dumps(info, indent=2))
    if (pooling or read_st_config(tmp).pooling) == "lasttoken":
        tokenizer = load_tokenizer(tmp)
        before = tokenizer("a")["input_ids"]
        if append_eos(tokenizer, "lasttoken")("a")["input_ids"] != before:
            tokenizer.save_pretrained(tmp)


def base_folder(model_dir: Path) -> Path:
    """The folder the run started from (``jaxembed.json``'s ``source``): its weights
    initialise the run, and a LoRA run's frozen base is read from it on every start and
    every restore (its checkpoints hold only the adapters)."""
    source = Path(json.loads((model_dir / "jaxembed.json").read_text())["source"])
    if not (source / "config.json").exists():
        raise ModelFolderError(
            f"{model_dir.parent}: the model the run started from, {source}, is gone (a LoRA "
            "run's checkpoints hold only the adapters: they need the weights they adapt)"
        )
    return source


# --- finding a checkpoint ---------------------------------------------------------------------


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
        return f"{self.workdir}/{checkpoint.CKPT_DIR}/{self.step}"

    @property
    def config(self) -> dict:
        """The run's config (``meta`` stores it as JSON)."""
        cfg = self.meta.get("config", {})
        return json.loads(cfg) if isinstance(cfg, str) else cfg

    @property
    def model_dir(self) -> Path:
        """The run's copy of the model's non-weight files (config.json, tokenizer, ST files).

        ``WORKDIR/model`` first, so a run directory that was moved still converts (a local
        copy of it for a run on a bucket); then the absolute path recorded at training time.
        """
        local = self.workdir / MODEL_DIR
        if (local / "config.json").exists():
            return local_copy(local)
        recorded = Path(self.meta.get("model_dir", ""))
        if (recorded / "config.json").exists():
            return recorded
        raise ModelFolderError(
            f"{self.name}: the run's model files (config.json, tokenizer) are missing; "
            f"looked in {local} and {recorded}"
        )


def _split(path):
    """``(workdir, step or None)`` from WORKDIR, WORKDIR/STEP or WORKDIR/checkpoints[/STEP]."""
    if path.name == checkpoint.CKPT_DIR:
        return path.parent, None
    if path.name.isdigit():
        parent = path.parent
        if parent.name == checkpoint.CKPT_DIR:
            return parent.parent, int(path.name)
        if (parent / checkpoint.CKPT_DIR).is_dir() and not (path / checkpoint.CKPT_DIR).is_dir():
            return parent, int(path.name)
    return path, None


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a training run (or one of its steps) rather than an HF folder."""
    path = run_path(path, "checkpoint")
    workdir, _ = _split(path)
    return (workdir / checkpoint.CKPT_DIR).is_dir() and not (path / "config.json").exists()


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint ``path`` names: WORKDIR (its latest step), WORKDIR/STEP,
    WORKDIR/checkpoints or WORKDIR/checkpoints/STEP."""
    path = run_path(path, "checkpoint")
    workdir, step = _split(path)
    if not path.exists() and step is None:
        raise CheckpointError(f"{path}: no such directory")
    if not (workdir / checkpoint.CKPT_DIR).is_dir():
        hint = (
            " (it is a model folder: load it directly)" if (path / "config.json").exists() else ""
        )
        raise CheckpointError(
            f"{path}: no checkpoint found (no {checkpoint.CKPT_DIR}/ directory){hint}"
        )
    try:
        step, meta = checkpoint.read_meta(workdir, step)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    return Checkpoint(workdir, step, meta)


def dev_metrics(ckpt: Checkpoint) -> tuple[int, dict] | None:
    """The last dev evaluation logged in ``WORKDIR/metrics.jsonl`` at or before the step."""
    path = ckpt.workdir / METRICS
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
