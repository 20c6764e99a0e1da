"""What a run records for its export: the checkpoint's ``meta`` item and what it implies.

`run_meta` writes, at every start, what an export needs beyond the weights: pooling,
prefixes, the instruction template, the datasets (task, rows, instructions) and the
config. `trained_prompts` and `trained_st_config` turn it into the sentence-transformers
settings (prompts, pooling, normalisation, lengths) that reproduce the trained encoder in
`jaxembed.convert`'s folder, `jaxembed.load(WORKDIR)` and the training loop's evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxembed.hf.sentence_transformers import STConfig, read_st_config
from jaxembed.workdir import Checkpoint

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

    Pooling and ``include_prompt`` as trained, the run's head (the base model's Dense
    layers, trained with the backbone; a sparse autoencoder, last), L2 normalisation (the
    training losses compare normalised embeddings; never after a sparse model's top-k), the
    prompts of `trained_prompts`, and the base model's ``max_seq_length`` (else the longer
    of the training query / passage lengths).
    """
    source = read_st_config(ckpt.model_dir)
    data = ckpt.config.get("data", {})
    trained_len = max(data.get("max_query_length", 0), data.get("max_passage_length", 0))
    max_len = source.max_seq_length or min(trained_len, model_config.max_tokens) or None
    return dataclasses.replace(  # the rest (head, lower case, query expansion) as the run's
        source,
        pooling=ckpt.meta["pooling"],
        include_prompt=bool(ckpt.meta.get("include_prompt", True)),
        max_seq_length=max_len,
        prompts=trained_prompts(ckpt.meta),
        default_prompt_name=None,
        normalize=not source.sparse,
    )
