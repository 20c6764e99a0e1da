"""The shared config schema: defaults, grouped as model / loss / optim / mesh / train.

Configs are Python files whose ``get_config()`` starts from `default_config()` and overrides
what the recipe needs (`load`); the command line overrides further with
``--config.optim.lr=...`` (`override`). `validate` checks every value and names the key and
the allowed values on error. These are the only defaults: the data pipeline's settings
(`jaxembed.data.pipeline.PipelineConfig`) read theirs from here.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from jaxembed.choices import (
    ATTENTION,
    DTYPES,
    LOSS_STYLES,
    MIXING,
    NEGATIVES,
    PACKING_SHAPES,
    SCHEDULES,
    TASKS,
)
from jaxembed.mining import MiningError, Rules

RULES = Rules()  # the mining rules' defaults (jaxembed.mining): the `mine` group's

# The fields that take one of a closed set of names (`validate` checks them, --help lists them).
CHOICES = {
    "model.dtype": DTYPES,
    "model.attention": ATTENTION,
    "loss.style": LOSS_STYLES,
    "optim.schedule": SCHEDULES,
    "data.mixing": MIXING,
    "data.negatives": NEGATIVES,
    "train.packing_shapes": PACKING_SHAPES,
}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local HF / sentence-transformers folder
    c.model.dtype = "float32"  # compute dtype; parameters are always float32
    c.model.remat = False  # recompute each layer in the backward pass (less memory)
    # xla everywhere; cudnn (GPU) and splash (TPU) fused kernels; auto: the platform's best
    c.model.attention = "auto"
    c.model.pooling = ""  # "" = the folder's pooling (sentence-transformers), else mean
    # LoRA (rank > 0): low-rank adapters on the linear layers named in targets (HF module
    # names, matched as PEFT's target_modules: "query", "q_proj", "self_attn.o_proj"); only
    # the adapters (and a Dense head, if any) train, the backbone's weights stay frozen.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.model.lora.dropout = 0.0  # on the adapters' input, in training
    c.model.lora.targets = ()

    c.loss = ml_collections.ConfigDict()
    c.loss.style = "joint"  # retrieval: "joint" one softmax, "f2llm" in-batch + hard, summed
    c.loss.temperature = 0.05
    c.loss.learnable_temperature = False
    c.loss.symmetric = False  # add the passage -> query direction to the in-batch term
    c.loss.false_negative_masking = True  # mask candidates whose text equals the positive
    c.loss.matryoshka_dims = ()  # e.g. (768, 512, 256, 128); () = off
    c.loss.matryoshka_weights = ()  # one per dim; () = all 1
    # Distillation from the teacher scores records carry ("scores", `jaxembed.score`), per
    # task, added to InfoNCE: KL between the teacher's and the student's softmax over each
    # row's positive and hard negatives, and Margin-MSE on positive-minus-negative margins.
    # Student logits are cos / temperature; teacher scores are divided by teacher_temperature.
    c.loss.infonce_weight = ml_collections.ConfigDict(dict.fromkeys(TASKS, 1.0))
    c.loss.kl_weight = ml_collections.ConfigDict(dict.fromkeys(TASKS, 0.0))
    c.loss.margin_mse_weight = ml_collections.ConfigDict(dict.fromkeys(TASKS, 0.0))
    c.loss.teacher_temperature = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01  # not applied to LayerNorm scales, biases or the temperature
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # after warmup: cosine / linear decay to min_lr, or constant
    c.optim.min_lr = 0.0
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 = off

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.global_batch = 64
    c.train.seed = 0
    c.train.dropout = True  # the backbone's dropout during training
    c.train.gradcache = False
    c.train.gradcache_chunk = 16  # rows per GradCache chunk (a multiple of data parallelism)
    # Several texts per row of data.max_*_length tokens (attention and pooling per text):
    # no padding to compute.
    c.train.packing = False
    c.train.packing_rows = 0  # the granule: rows per tower come in its multiples (0: batch / 16)
    # "few": each tower's row count rounded up further, to 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    # granules, so a run meets a few shapes (one compile each) instead of one per granule:
    # ~15% more (empty) rows per step on average. "exact": the next multiple of the
    # granule (long runs, where compiles are paid once and every step's rows count).
    c.train.packing_shapes = "few"
    # Wall-clock budget of one invocation, start-up and compiles included (0 = none): when
    # spent, training ends after the current step (checkpoint, eval after) even if the
    # schedule has steps left; rerunning the same command resumes and continues.
    c.train.time_limit_minutes = 0.0
    # Resume even when the config changes the model or the data of the run (train.RESUME_KEYS)
    c.train.allow_config_change = False

    # Hard-negative mining during training (jaxembed.remine): every `every` steps (0: never)
    # the retrieval datasets' negatives are re-mined with the live parameters, against
    # `corpus` (corpus files as jaxembed.mine reads them; (): the distinct positives), by
    # jaxembed.mining's rules, whose defaults (F2LLM's) the rest of the group takes.
    c.mine = ml_collections.ConfigDict()
    c.mine.every = 0
    c.mine.corpus = ()
    c.mine.top_k = RULES.top_k  # candidates retrieved per query
    c.mine.skip_top = RULES.skip_top  # best candidates skipped (likely unlabelled positives)
    c.mine.max_score = RULES.max_score  # candidates scoring at or above dropped; None: no cap
    # candidates within this fraction of the positive's score dropped (NV-Retriever's 0.05)
    c.mine.relative_margin = RULES.relative_margin
    c.mine.num_negatives = RULES.num_negatives  # negatives kept per row
    c.mine.sampling = RULES.sampling  # "top": the best survivors; "random": a seeded sample

    c.data = ml_collections.ConfigDict()
    # JSONL / Parquet files, directories of them, HF datasets or prepared TFDS folders, or
    # hf://OWNER/NAME[/CONFIG][:SPLIT] (a dataset in the local hub cache)
    c.data.train = ()
    c.data.skip_bad = False  # skip (and count) malformed records instead of stopping
    # Renames of your columns to the record fields, e.g. {"question": "query", "answer":
    # "positive"}; sentence-transformers' anchor / positive / negative(_N) need none.
    c.data.columns = ml_collections.ConfigDict()
    c.data.mixing = "remaining"  # F2LLM: proportional to remaining batches; or "temperature"
    c.data.mixing_temperature = 1.0
    c.data.num_negatives = ml_collections.ConfigDict(
        {"retrieval": 7, "classification": 1, "clustering": 7}
    )
    # "mined": each row's stored negatives; "random": other rows' positives drawn uniformly
    # from the same dataset (the control that shows what mining adds)
    c.data.negatives = "mined"
    # > 0: batches made of groups of this many rows linked by their mined negatives (a
    # row's negative is another row's positive), so in-batch negatives are hard ones
    # without encoding extra passages; 0: rows shuffled uniformly
    c.data.group_size = 0
    # A function rewriting training queries, "MODULE:FUNCTION" (f(record, rng) -> the query
    # text; "" = none), applied to a query_transform_rate fraction of them, drawn per row:
    # e.g. examples.debian_retrofit.script:cyrillic (queries in Cyrillic letters)
    c.data.query_transform = ""
    c.data.query_transform_rate = 0.0
    c.data.max_query_length = 64
    c.data.max_passage_length = 256
    c.data.query_buckets = ()  # padded lengths; () = a quarter, half and all of the maximum
    c.data.passage_buckets = ()
    c.data.query_prefix = ""  # e.g. "query: " (E5)
    c.data.passage_prefix = ""  # e.g. "passage: "
    c.data.instruction_template = "Instruct: {instruction}\nQuery: {query}"
    c.data.workers = 0  # Grain worker processes building batches ahead of the step
    c.data.prefetch = 2

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every = 500  # steps between checkpoints (and one at the end)
    c.ckpt.keep = 3
    c.ckpt.keep_best = 0  # also keep this many best by eval.best_metric
    c.ckpt.async_save = True
    # Resume from the newest intact step when the latest cannot be restored (the damaged
    # steps are moved to WORKDIR/damaged_checkpoints); False: stop and say so
    c.ckpt.fallback = False

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps between evaluations; 0 = only before and after training
    c.eval.data = ()  # BEIR-layout folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)
    c.eval.split = "dev"
    c.eval.batch_size = 64
    c.eval.best_metric = "ndcg@10"  # averaged over eval.data; used by ckpt.keep_best
    # Named groups of eval.data sets (by folder name), each also reported as its own mean,
    # e.g. {"zero-shot": ("xling-ja", "xling-ko"), "trained": ("xling-de",)}.
    c.eval.groups = ml_collections.ConfigDict()

    c.log = ml_collections.ConfigDict()
    c.log.every = 10
    c.log.tensorboard = True
    return c


# What a resumed run must share with the run that wrote the checkpoint: the model, and what
# decides which rows, texts and negatives each step sees. Anything else (steps, learning
# rate, mesh, packing, GradCache, evaluation) may change between invocations.
RESUME_KEYS = (
    "model.path",
    "model.pooling",
    "model.lora",
    "data.train",
    "data.num_negatives",
    "data.negatives",
    "data.group_size",
    "data.mixing",
    "data.max_query_length",
    "data.max_passage_length",
    "data.query_prefix",
    "data.passage_prefix",
    "data.instruction_template",
    "data.query_transform",
    "data.query_transform_rate",
    "train.global_batch",
    "train.seed",
    "mine.every",
)


def _choice(c, key: str, allowed) -> None:
    value = c
    for part in key.split("."):
        value = value[part]
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(c, key: str, allow_zero: bool = False) -> None:
    value = c
    for part in key.split("."):
        value = value[part]
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the values `default_config` defines; returns the config."""
    for key, allowed in CHOICES.items():
        _choice(c, key, allowed)
    for key in ("loss.temperature", "optim.lr", "train.steps", "train.global_batch"):
        _positive(c, key)
    for key in ("optim.weight_decay", "optim.warmup_steps", "optim.min_lr", "optim.clip_norm"):
        _positive(c, key, allow_zero=True)
    if c.train.gradcache:
        _positive(c, "train.gradcache_chunk")
        if c.train.global_batch % c.train.gradcache_chunk:
            raise ValueError(
                f"config.train.gradcache_chunk={c.train.gradcache_chunk} must divide "
                f"config.train.global_batch={c.train.global_batch}"
            )
    _positive(c, "model.lora.rank", allow_zero=True)
    if c.model.lora.rank:
        _positive(c, "model.lora.alpha")
        if not c.model.lora.targets:
            raise ValueError(
                "config.model.lora.targets is empty: name the linear layers to adapt, "
                "e.g. ('query', 'key', 'value') for BERT or ('q_proj', 'v_proj') for Qwen3"
            )
        if not 0.0 <= c.model.lora.dropout < 1.0:
            raise ValueError(f"config.model.lora.dropout={c.model.lora.dropout} must be in [0, 1)")
    _positive(c, "mine.every", allow_zero=True)
    fields = {f.name for f in dataclasses.fields(Rules)}
    try:
        Rules(**{k: v for k, v in c.mine.items() if k in fields})
    except MiningError as e:
        raise ValueError(f"config.mine: {e}") from None
    _positive(c, "train.packing_rows", allow_zero=True)
    _positive(c, "train.time_limit_minutes", allow_zero=True)
    if c.optim.min_lr > c.optim.lr:
        raise ValueError(
            f"config.optim.min_lr={c.optim.min_lr} exceeds config.optim.lr={c.optim.lr}"
        )
    # data.group_size and the query transform: `PipelineConfig` checks them.
    for group in ("infonce_weight", "kl_weight", "margin_mse_weight"):
        for task, weight in c.loss[group].items():
            if task not in TASKS:
                raise ValueError(f"config.loss.{group}.{task}: unknown task; allowed: {TASKS}")
            if weight < 0:
                raise ValueError(f"config.loss.{group}.{task}={weight} must be >= 0")
    _positive(c, "loss.teacher_temperature")
    for task in c.data.num_negatives:
        if task not in TASKS:
            raise ValueError(
                f"config.data.num_negatives.{task}: unknown task; allowed: {', '.join(TASKS)}"
            )
    for key in ("data.max_query_length", "data.max_passage_length", "log.every", "ckpt.every"):
        _positive(c, key)
    _positive(c, "eval.every", allow_zero=True)
    names = {Path(p).name for p in c.eval.data}
    # Without eval sets there is nothing to group (a recipe's groups, evaluation turned off).
    for group, members in c.eval.groups.items() if c.eval.data else ():
        unknown = [m for m in members if m not in names] if members else ["(empty)"]
        if unknown:
            raise ValueError(
                f"config.eval.groups.{group}: {unknown} not among the eval.data folders "
                f"{sorted(names)}"
            )
    dims, weights = tuple(c.loss.matryoshka_dims), tuple(c.loss.matryoshka_weights)
    if weights and len(weights) != len(dims):
        raise ValueError(
            f"config.loss.matryoshka_weights has {len(weights)} entries for "
            f"{len(dims)} config.loss.matryoshka_dims"
        )
    return c


# --- config files and command-line overrides ------------------------------------------------


def load(spec: str) -> ml_collections.ConfigDict:
    """The config a file defines: ``FILE.py`` (``get_config()``) or ``FILE.py:ARG``."""
    path, _, arg = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {spec}: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"_jaxembed_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {spec}: {file} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"--config {spec}: get_config() returned {type(config).__name__}")
    return config


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``(key, value)`` of ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` arguments."""
    out, i = [], 0
    while i < len(args):
        if not args[i].startswith("--config."):
            raise ValueError(f"unrecognized argument: {args[i]}")
        key, eq, value = args[i][len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{args[i]}: expected a value")
            i += 1
            value = args[i]
        out.append((key, value))
        i += 1
    return out


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` from command-line ``text``, parsed as the field's current type.

    Booleans take true/false (or 1/0, yes/no); tuples take a Python literal ("(1, 2)") or
    comma-separated values ("a.jsonl,b.jsonl"); a group that has no fields by default (e.g.
    ``eval.groups``) takes new keys. Unknown keys and unparsable values are errors naming
    the key.
    """
    *parents, name = key.split(".")
    group = config
    for i, part in enumerate(parents):
        if part not in group or not isinstance(group[part], ml_collections.ConfigDict):
            raise ValueError(f"--config.{key}: config.{'.'.join(parents[: i + 1])} is not a group")
        group = group[part]
    where = f"config.{'.'.join(parents)}" if parents else "config"
    if name not in group:
        if len(group) or not parents:
            raise ValueError(f"--config.{key}: no such field; {where} has {sorted(group)}")
        group[name] = _parse(text, None, key)
        return
    current = group[name]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"--config.{key}: a group; set its fields ({sorted(current)})")
    group[name] = _parse(text, current, key)


def _parse(text: str, current, key: str):
    """``text`` as a value of ``current``'s type (any Python literal when it is None)."""
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)) or current is None:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if current is None:
                return value
            if isinstance(value, str):  # a,b,c
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(current)(value)
    except ValueError as e:
        raise ValueError(f"--config.{key}={text!r}: {e}") from None
    raise ValueError(f"--config.{key}: cannot set a {type(current).__name__} from the command line")


def describe(
    config: ml_collections.ConfigDict, prefix: str = "config", notes: dict | None = None
) -> list[str]:
    """One ``key = value`` line per field, nested groups flattened, each with its allowed
    values and the comment it has in `default_config` (for ``--help``)."""
    notes = _field_comments() if notes is None else notes
    lines = []
    for name, value in config.items():
        key = f"{prefix}.{name}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            group_note = notes.get(key.removeprefix("config."))
            lines += [f"{key}.*  # {group_note}"] if group_note else []
            lines += describe(value, key, notes)
            continue
        shown = dict(value) if isinstance(value, ml_collections.ConfigDict) else value
        short = key.removeprefix("config.")
        note = [f"one of {list(CHOICES[short])}"] if short in CHOICES else []
        note += [notes[short]] if short in notes else []
        lines.append(f"{key} = {shown!r}" + (f"  # {'; '.join(note)}" if note else ""))
    return lines


def _field_comments() -> dict[str, str]:
    """``{"model.dtype": "compute dtype; ..."}``: each field's comment in `default_config`
    (trailing, else the comment block just above it), so a default and its explanation
    are written once."""
    import inspect
    import re

    notes, block = {}, []
    for line in inspect.getsource(default_config).splitlines():
        line = line.strip()
        if line.startswith("#"):
            block.append(line.lstrip("# "))
            continue
        field = re.match(r"c\.(\w+\.\w+) = ([^#]*)(?:#\s*(.+))?$", line)
        if field and (field[3] or block):
            notes[field[1]] = field[3] or " ".join(block)
        block = []
    return notes
