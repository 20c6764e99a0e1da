"""The ``README.md`` of an export: usage, prompts, pooling, data, loss, optimizer, dev metrics.

Written from the run's ``meta`` and config alone (`jaxembed.export_meta`), so it describes the
training that produced the weights, not the settings of the machine that exports them.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxembed.export_meta import single_instruction
from jaxembed.hf.sentence_transformers import STConfig
from jaxembed.workdir import Checkpoint, dev_metrics


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
    info_file = ckpt.model_dir / "jaxembed.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    base = info.get("source") or ckpt.config.get("model", {}).get("path", "?")
    sections = (
        _usage(ckpt, model.config, st, dtype, base),
        _prompts(ckpt.meta, st),
        _embedding(ckpt.config.get("data", {}), st, files),
        _training(ckpt, base),
        _dev_metrics(ckpt),
    )
    return "\n".join(line for section in sections for line in section) + "\n"


FRONT_MATTER = [
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
]


def _usage(ckpt: Checkpoint, mc, st: STConfig, dtype: str, base: str) -> list[str]:
    dim = st.output_dim(mc.hidden_size, mc.vocab_size)
    return [
        *FRONT_MATTER,
        f"# {_base_title(ckpt.model_dir, base)} fine-tuned with jaxembed (step {ckpt.step})",
        "",
        f"A text-embedding model trained with jaxembed from `{base}` (`{mc.model_type}`, "
        f"{dim}-dimensional embeddings), exported from `{ckpt.name}` with "
        f"`python -m jaxembed.convert` as {dtype} weights.",
        "",
        "## Usage",
        "",
        "```python",
        f"from sentence_transformers import {st.model_class}",
        "",
        f'model = {st.model_class}("path/to/this/folder")',
        'queries = model.encode(["how do I ...?"], prompt_name="query")',
        'passages = model.encode(["A package that ..."], prompt_name="document")',
        "scores = model.similarity(queries, passages)",
        "```",
        "",
        "`jaxembed.load(folder)` gives the same embeddings in JAX, and so does "
        f"`jaxembed.load({str(ckpt.workdir)!r})` on the training run itself.",
        "",
    ]


def _prompts(meta: dict, st: STConfig) -> list[str]:
    out = [
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
        "- `document`: for documents (`encode_document` and MTEB pick it), the passage "
        "prefix of training.",
    ]
    if any(k not in ("query", "document") for k in st.prompts):
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
    return [*out, ""]


def _embedding(data: dict, st: STConfig, files: list[str]) -> list[str]:
    if st.pooling == "splade":
        pooling = ("- pooling: SPLADE, the max over the text's tokens of log(1 + ReLU) of the "
                   "MLM head's logits: a sparse vector of the vocabulary's size, ")  # fmt: skip
    else:
        pooling = (
            f"- pooling: `{st.pooling}` over the transformer's last hidden states, "
            f"`include_prompt={st.include_prompt}` (prompt tokens are "
            f"{'' if st.include_prompt else 'not '}pooled, as in training), "
        )
    head = f"then {st.describe_head()} (trained with the transformer), " if st.head else ""
    if st.sparse:
        last = "scored by dot product (sentence-transformers' SparseEncoder), not normalised."
    else:
        last = "then L2 normalisation (compare with cosine or dot product)."
    return [
        "## Embedding",
        "",
        pooling + head + last,
        f"- max_seq_length: {st.max_seq_length} tokens "
        f"(training truncated queries at {data.get('max_query_length')} and passages at "
        f"{data.get('max_passage_length')}).",
        f"- files: {', '.join(files)}",
        "",
    ]


def _training(ckpt: Checkpoint, base: str) -> list[str]:
    meta, cfg = ckpt.meta, ckpt.config
    train, data, loss, optim = (cfg.get(k, {}) for k in ("train", "data", "loss", "optim"))
    tasks = {d.get("task") for d in meta.get("datasets", {}).values()}
    negatives = {t: n for t, n in data.get("num_negatives", {}).items() if t in tasks}
    total = train.get("steps", ckpt.step)
    gradcache = f" (GradCache, chunks of {train.get('gradcache_chunk')})"
    datasets = [
        (
            name,
            d.get("task", "?"),
            f"{d.get('rows', 0):,}",
            "; ".join(_code(i) for i in d.get("instructions", [])) or "-",
        )
        for name, d in meta.get("datasets", {}).items()
    ]
    matryoshka = loss.get("matryoshka_dims")
    return [
        "## Training",
        "",
        f"- base model: `{base}`",
        f"- steps: {ckpt.step} (of {total} planned), global batch {train.get('global_batch')}"
        + (gradcache if train.get("gradcache") else "")
        + f", dropout {'on' if train.get('dropout', True) else 'off'}, seed {train.get('seed')}",
        f"- compute dtype: {cfg.get('model', {}).get('dtype', 'float32')} (parameters float32)",
        "",
        "Data (each global batch comes from one dataset, mixing "
        f"`{data.get('mixing', 'remaining')}`; hard negatives per row and step: "
        f"{negatives}):",
        "",
        _table(("dataset", "task", "rows", "instruction"), datasets),
        "",
        f"- query prefix {_code(meta.get('query_prefix', ''))}, passage prefix "
        f"{_code(meta.get('passage_prefix', ''))}, instruction template "
        f"{_code(meta.get('instruction_template', ''))}",
        f"- loss: `{loss.get('style', 'joint')}` contrastive loss, temperature "
        f"{loss.get('temperature')}"
        + (" (learnable)" if loss.get("learnable_temperature") else "")
        + f", symmetric {loss.get('symmetric', False)}, false-negative masking "
        f"{loss.get('false_negative_masking', True)}"
        + (f", Matryoshka dims {list(matryoshka)}" if matryoshka else ""),
        f"- optimizer: AdamW (b1 {optim.get('b1')}, b2 {optim.get('b2')}, eps "
        f"{optim.get('eps')}), weight decay {optim.get('weight_decay')} (not on norms, biases), "
        f"gradient clipping at global norm {optim.get('clip_norm')}",
        f"- learning rate: {_schedule(optim, total)}",
        "",
    ]


def _dev_metrics(ckpt: Checkpoint) -> list[str]:
    out = ["## Dev metrics", ""]
    dev = dev_metrics(ckpt)
    if dev is None:
        return [*out, "No dev evaluation was logged by this run."]
    step, values = dev
    evaluation = ckpt.config.get("eval", {})
    sets = ", ".join(Path(p).name for p in evaluation.get("data", [])) or "dev"
    return [
        *out,
        f"Last evaluation, at step {step}"
        + (" (before training)" if step == 0 else "")
        + f", split `{evaluation.get('split', 'dev')}` of {sets}:",
        "",
        _table(("metric", "value"), [(k, f"{v:.4f}") for k, v in values.items()]),
    ]


def merge_card(recipe: dict, mc, st: STConfig, dtype: str, files: list[str]) -> str:
    """``README.md`` of a merged model (`jaxembed.merge`): the recipe, usage, embedding."""
    method = recipe["method"]
    if method == "slerp":
        how = f"spherical interpolation (slerp) at t = {recipe['t']:g} from the first to the second"
        rows = [(p, "-") for p in recipe["inputs"]]
    else:
        how = "weighted average (weights normalised to sum to 1)"
        rows = [(p, f"{w:.4g}") for p, w in zip(recipe["inputs"], recipe["weights"], strict=True)]
    only = recipe["only"]
    scope = (
        f"parameters matching {', '.join(_code(p) for p in only)} "
        f"({recipe['merged_tensors']} of {recipe['tensors']} tensors; the others are the "
        "first input's)"
        if only
        else f"every parameter ({recipe['tensors']} tensors)"
    )
    return (
        "\n".join(
            [
                *FRONT_MATTER,
                f"# A merge of {len(rows)} `{mc.model_type}` models (jaxembed.merge)",
                "",
                f"{st.output_dim(mc.hidden_size, mc.vocab_size)}-dimensional embeddings, {dtype} "
                "weights, made "
                f"with `python -m jaxembed.merge` by {how} of {scope}.",
                "",
                "## Recipe",
                "",
                _table(("input", "weight"), rows),
                "",
                "Pooling, prompts and the sentence-transformers modules are the first input's.",
                "",
                "## Usage",
                "",
                "```python",
                f"from sentence_transformers import {st.model_class}",
                "",
                f'model = {st.model_class}("path/to/this/folder")',
                "```",
                "",
                *_embedding({}, st, files),
            ]
        )
        + "\n"
    )
