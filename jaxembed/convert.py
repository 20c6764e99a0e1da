"""``python -m jaxembed.convert``: a checkpoint as a Hugging Face / sentence-transformers folder.

    python -m jaxembed.convert --checkpoint runs/demo --out exported/demo [--dtype bfloat16]

The folder loads with one line in ``transformers`` (``AutoModel.from_pretrained``),
``sentence-transformers`` (``SentenceTransformer``) and so MTEB, and embeds exactly as
``jaxembed.load(checkpoint)`` does: same weights, pooling, prompts and normalisation. It
holds the original family's ``config.json`` (updated), ``model.safetensors`` (or shards and
an index), the tokenizer files, the sentence-transformers files and a model card
(``README.md``) describing the run.

Large and multi-host models: the parameters are restored sharded over every device of
every host (FSDP), then gathered and written one tensor at a time, by process 0 only, so
neither a device nor the host ever holds the whole model beyond its shards. Run the same
command on every host for a multi-host export (``launch/``; `jaxembed.distributed`).

The other direction needs no tool: a Hugging Face / sentence-transformers folder is what
``config.model.path`` names to train from, and what `jaxembed.load` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed import checkpoint as ckpt_lib
from jaxembed import distributed, hf
from jaxembed.hf.io import ModelFolderError
from jaxembed.hf.sentence_transformers import STConfig, read_st_config, write_st_config

DTYPES = ("float32", "bfloat16")
# Copied from the run's model folder: the tokenizer and the base model's licence. Anything
# else there (e.g. an ONNX export of the *base* weights) would not match the new weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt")


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing, or a step that does not exist; the message names it."""


# --- finding and restoring a checkpoint -------------------------------------------------------


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


def abstract_model(ckpt: Checkpoint, dtype: str = "float32") -> nnx.Module:
    """The backbone's shape (no arrays) from the run's ``config.json`` and its family table."""
    import ml_collections

    from jaxembed.train import build_abstract_model

    model_dir = ckpt.model_dir
    config = ml_collections.ConfigDict({"model": {"dtype": dtype, "remat": False}})
    try:
        return build_abstract_model(model_dir, config)
    except (ValueError, KeyError, TypeError) as e:
        # ModelFolderError (unknown model_type) is a ValueError, as are config_from_hf's.
        raise ModelFolderError(
            f"{ckpt.name}: its model ({model_dir / 'config.json'}) cannot be mapped back to a "
            f"Hugging Face family: {e}"
        ) from None


def restore_model(ckpt: Checkpoint, *, dtype: str = "float32", mesh=None) -> nnx.Module:
    """The backbone with the checkpoint's parameters; nothing else is read.

    Only ``params["model"]`` of the train state is restored (an Orbax partial restore), so
    neither the optimizer state nor the original model folder is needed. Without ``mesh``
    the parameters come back as host (NumPy) arrays; with one, as global arrays sharded per
    `jaxembed.sharding`, which is how a model larger than one device is held.
    """
    import orbax.checkpoint as ocp

    from jaxembed import sharding

    model = abstract_model(ckpt, dtype)
    state = nnx.state(model)
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shapes)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    else:
        shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
        item = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
        )
        args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
    path = (ckpt.workdir / ckpt_lib.CKPT_DIR / str(ckpt.step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item={"params": {"model": item}},
                restore_args={"params": {"model": args}},
                partial_restore=True,
            ),
        )
    return nnx.merge(nnx.graphdef(model), restored["params"]["model"])


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
                if key in ("query", "document", "passage"):
                    key += "_instruction"
                prompts[key] = instruction_prompt(template, instruction)
    # sentence-transformers >= 5 encodes documents with "document" (encode_document), MTEB
    # and E5-style code name them "passage": both carry the passage prefix.
    prompts["document"] = prompts["passage"] = meta.get("passage_prefix", "")
    return prompts


def trained_st_config(ckpt: Checkpoint, model_config) -> STConfig:
    """The sentence-transformers settings that reproduce the trained encoder.

    Pooling and ``include_prompt`` as trained, L2 normalisation (the training losses compare
    normalised embeddings), the prompts of `trained_prompts`, and the base model's
    ``max_seq_length`` (else the longer of the training query / passage lengths).
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


# --- the model card ---------------------------------------------------------------------------


def _table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(text: str) -> str:
    return "`" + json.dumps(text, ensure_ascii=False)[1:-1] + "`" if text else "(none)"


def _schedule(optim: dict, steps: int) -> str:
    warmup = optim.get("warmup_steps", 0)
    kind = optim.get("schedule", "cosine")
    after = (
        f"constant {optim['lr']:g}"
        if kind == "constant"
        else f"{kind} decay to {optim.get('min_lr', 0):g} at step {steps}"
    )
    start = f"linear warmup from 0 to {optim['lr']:g} over {warmup} steps, then " if warmup else ""
    return start + after


def _base_title(model_dir: Path, source: str) -> str:
    """The base model's name: its card's first heading (the run copied it), else its folder."""
    card = model_dir / "README.md"
    if card.exists():
        for line in card.read_text(errors="replace").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return Path(source).name


def model_card(ckpt: Checkpoint, model, st: STConfig, dtype: str, files: list[str]) -> str:
    """``README.md``: usage, prompts, pooling, data, loss, optimisation and dev metrics."""
    meta, cfg = ckpt.meta, ckpt.config
    mc = model.config
    train, data, loss, optim = (cfg.get(k, {}) for k in ("train", "data", "loss", "optim"))
    info_file = ckpt.model_dir / "jaxembed.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    base = info.get("source") or cfg.get("model", {}).get("path", "?")
    title = _base_title(ckpt.model_dir, base)
    tasks = {d.get("task") for d in meta.get("datasets", {}).values()}
    negatives = {t: n for t, n in data.get("num_negatives", {}).items() if t in tasks}
    total = train.get("steps", ckpt.step)
    out = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags:",
        "- sentence-transformers",
        "- feature-extraction",
        "- sentence-similarity",
        "- jaxembed",
        "---",
        "",
        f"# {title} fine-tuned with jaxembed (step {ckpt.step})",
        "",
        f"A text-embedding model trained with jaxembed from `{base}` (`{mc.model_type}`, "
        f"{mc.hidden_size}-dimensional embeddings), exported from `{ckpt.name}` with "
        f"`python -m jaxembed.convert` as {dtype} weights.",
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")',
        'queries = model.encode(["how do I ...?"], prompt_name="query")',
        'passages = model.encode(["A package that ..."], prompt_name="document")',
        "scores = model.similarity(queries, passages)",
        "```",
        "",
        "`jaxembed.load(folder)` gives the same embeddings in JAX, and so does "
        f"`jaxembed.load({str(ckpt.workdir)!r})` on the training run itself.",
        "",
        "## Prompts",
        "",
        "Each prompt is prepended to the text, exactly as in training. There is no default "
        "prompt: name one with `prompt_name=`.",
        "",
        _table(("name", "text"), [(name, _code(text)) for name, text in st.prompts.items()]),
        "",
        "- `query`: for queries: "
        + (
            "the instruction that every training dataset carried, in the template."
            if single_instruction(meta) is not None
            else "the query prefix that training queries without an instruction carried."
        ),
        "- `document` / `passage` (the same text): for documents, the passage prefix of "
        "training (`encode_document` picks `document`).",
    ]
    per_dataset = [k for k in st.prompts if k not in ("query", "document", "passage")]
    if per_dataset:
        out.append(
            "- the other prompts are the instructions that training datasets carried, one per "
            f"dataset (named by it): use one for queries of that kind of task. Template: "
            f"{_code(meta.get('instruction_template', ''))}."
        )
    if any("instructions" not in d for d in meta.get("datasets", {}).values()):
        out.append(
            "- this checkpoint did not record its datasets' instructions (it predates that): "
            "queries that carried an instruction in training have no prompt here."
        )
    out += [
        "",
        "## Embedding",
        "",
        f"- pooling: `{st.pooling}` over the transformer's last hidden states, "
        f"`include_prompt={st.include_prompt}` (prompt tokens are "
        f"{'' if st.include_prompt else 'not '}pooled, as in training), "
        "then L2 normalisation (compare with cosine or dot product).",
        f"- max_seq_length: {st.max_seq_length} tokens "
        f"(training truncated queries at {data.get('max_query_length')} and passages at "
        f"{data.get('max_passage_length')}).",
        f"- files: {', '.join(files)}",
        "",
        "## Training",
        "",
        f"- base model: `{base}`",
        f"- steps: {ckpt.step} (of {total} planned), global batch {train.get('global_batch')}"
        + (
            f" (GradCache, chunks of {train.get('gradcache_chunk')})"
            if train.get("gradcache")
            else ""
        )
        + f", dropout {'on' if train.get('dropout', True) else 'off'}, seed {train.get('seed')}",
        f"- compute dtype: {cfg.get('model', {}).get('dtype', 'float32')} (parameters float32)",
        "",
        "Data (each global batch comes from one dataset, mixing "
        f"`{data.get('mixing', 'remaining')}`; hard negatives per row and step: "
        f"{negatives}):",
        "",
        _table(
            ("dataset", "task", "rows", "instruction"),
            [
                (
                    name,
                    d.get("task", "?"),
                    f"{d.get('rows', 0):,}",
                    "; ".join(_code(i) for i in d.get("instructions", [])) or "-",
                )
                for name, d in meta.get("datasets", {}).items()
            ],
        ),
        "",
        f"- query prefix {_code(meta.get('query_prefix', ''))}, passage prefix "
        f"{_code(meta.get('passage_prefix', ''))}, instruction template "
        f"{_code(meta.get('instruction_template', ''))}",
        f"- loss: `{loss.get('style', 'joint')}` contrastive loss, temperature "
        f"{loss.get('temperature')}"
        + (" (learnable)" if loss.get("learnable_temperature") else "")
        + f", symmetric {loss.get('symmetric', False)}, false-negative masking "
        f"{loss.get('false_negative_masking', True)}"
        + (
            f", Matryoshka dims {list(loss['matryoshka_dims'])}"
            if loss.get("matryoshka_dims")
            else ""
        ),
        f"- optimizer: AdamW (b1 {optim.get('b1')}, b2 {optim.get('b2')}, eps "
        f"{optim.get('eps')}), weight decay {optim.get('weight_decay')} (not on norms, biases), "
        f"gradient clipping at global norm {optim.get('clip_norm')}",
        f"- learning rate: {_schedule(optim, total)}",
        "",
        "## Dev metrics",
        "",
    ]
    dev = dev_metrics(ckpt)
    if dev is None:
        out.append("No dev evaluation was logged by this run.")
    else:
        step, values = dev
        sets = ", ".join(Path(p).name for p in cfg.get("eval", {}).get("data", [])) or "dev"
        out += [
            f"Last evaluation, at step {step}"
            + (" (before training)" if step == 0 else "")
            + f", split `{cfg.get('eval', {}).get('split', 'dev')}` of {sets}:",
            "",
            _table(("metric", "value"), [(k, f"{v:.4f}") for k, v in values.items()]),
        ]
    return "\n".join(out) + "\n"


# --- export -----------------------------------------------------------------------------------


def _to_host(x) -> np.ndarray:
    """A parameter on the host: shards of other hosts are gathered (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _check_out(out: Path, overwrite: bool, ckpt: Checkpoint) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: output directory is not empty (pass --overwrite)")
    if ckpt.workdir.absolute().is_relative_to(out.absolute()):
        raise FileExistsError(f"{out}: refusing to overwrite: it contains the run {ckpt.workdir}")
    if not (out / "config.json").exists():
        raise FileExistsError(
            f"{out}: refusing to overwrite a directory that is not a model folder "
            "(no config.json); remove it yourself if that is what you want"
        )


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Writes the checkpoint as a Hugging Face / sentence-transformers folder ``out``.

    Every process must call this (parameters are gathered collectively); process 0 writes.
    The folder is assembled next to ``out`` and renamed into place when complete, so a
    failed export leaves no partial folder.

    Args:
      checkpoint: WORKDIR (its latest step), WORKDIR/STEP or WORKDIR/checkpoints/STEP.
      out: the folder to create; it must not exist, or be empty, unless ``overwrite``.
      dtype: "float32" or "bfloat16" weights.
      overwrite: replace an existing model folder at ``out``.
      max_shard_bytes: safetensors files beyond this size are split, with an index.
    """
    from jaxembed import sharding

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    ckpt = find_checkpoint(checkpoint)
    out = Path(out)
    _check_out(out, overwrite, ckpt)
    # Every parameter split over all devices (FSDP), so no device needs the whole model.
    model = restore_model(ckpt, mesh=sharding.make_mesh(data=1, fsdp=-1))
    st = trained_st_config(ckpt, model.config)  # before writing: errors stop every process
    if jax.process_index() != 0:
        for _ in hf.iter_export(model, jnp.dtype(dtype), fetch=_to_host):
            pass  # take part in the gathers; process 0 writes
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = hf.save_model(
            model, tmp, jnp.dtype(dtype), fetch=_to_host, max_shard_bytes=max_shard_bytes
        )
        model_dir = ckpt.model_dir
        for name in TOKENIZER_FILES + LICENSE_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
                files.append(name)
        files += write_st_config(tmp, st, model.config.hidden_size)
        (tmp / "README.md").write_text(model_card(ckpt, model, st, dtype, files))
        if out.exists():
            # Empty, or a model folder that overwrite=True replaces (checked above).
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"123"`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).rstrip("B") or ""]
    return int(float(m.group(1)) * unit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxembed.convert",
        description=(
            "Export a jaxembed training checkpoint as a Hugging Face / sentence-transformers "
            "folder: config.json, safetensors weights, tokenizer, modules.json, 1_Pooling "
            "(pooling as trained), Normalize, config_sentence_transformers.json (the prompts "
            "used in training) and a README.md model card. It loads with "
            "SentenceTransformer(DIR) or transformers.AutoModel.from_pretrained(DIR) and "
            "embeds as jaxembed.load(WORKDIR) does."
        ),
        epilog=(
            "The other direction needs no conversion: a Hugging Face / sentence-transformers "
            "folder is trained from with --config.model.path=DIR (python -m jaxembed.train) "
            "and loaded with jaxembed.load(DIR). Multi-host: run the same command on every "
            "host (launch/*.sh, or the flags below); process 0 writes."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="WORKDIR[/STEP]",
        help="training run directory (its latest checkpoint), or WORKDIR/STEP "
        "(also WORKDIR/checkpoints/STEP) for a given step",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing model folder at --out"
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=5 << 30,
        metavar="SIZE",
        help="split model.safetensors into shards of at most this size, with an index "
        "(default 5GiB; e.g. 2GB, 500MB)",
    )
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    distributed.initialize_from_args(args)
    return distributed.run(lambda: _main(args))


def _main(args) -> int:
    try:
        out = export(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # The same on every host (the checkpoint is on shared storage): all stop here.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
