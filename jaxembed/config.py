"""The config schema, in one place: each setting's default, help, allowed values and whether
a resumed run must keep it.

Configs are Python files whose ``get_config()`` starts from `default_config()` and overrides
what the recipe needs (`load`); the command line overrides further with
``--config.optim.lr=...`` (`override`). Everything about a setting is written once, in
`SCHEMA`: `default_config` builds from it, `validate` and `check` read its allowed values
and bounds, ``--help`` prints it (`describe`), the resume check reads `RESUME_KEYS` from it,
and the data pipeline (`jaxembed.data.pipeline.PipelineConfig`) takes its defaults and
checks from it. What links several settings (a chunk dividing the batch, LoRA needing
targets) is checked in `validate`, below the table.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from jaxembed.choices import (
    ATTENTION,
    DTYPES,
    LOSS_STYLES,
    MIXING,
    NEGATIVES,
    PACKING_SHAPES,
    QUANTIZATIONS,
    SCHEDULES,
    SPARSE_MODELS,
    TASKS,
)
from jaxembed.mining import MiningError, Rules


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting. A dict ``default`` is a group of numbers keyed by ``keys`` (any key when
    None), each checked against the bounds."""

    default: Any
    help: str = ""
    choices: tuple = ()  # the allowed values (a closed set of names)
    above: float | None = None  # bounds, checked by `validate`
    at_least: float | None = None
    below: float | None = None
    at_most: float | None = None
    none_ok: bool = False  # None (``none`` on the command line) turns the setting off
    keys: tuple | None = None  # a dict's allowed keys
    key_name: str = "key"  # what its keys are, for errors ("task")
    resume: bool = False  # a resumed run must keep it (train.allow_config_change overrides)

    def check(self, value, key: str):
        """``value`` if allowed, else a ValueError naming ``config.KEY``, the value and why."""
        if value is None and self.none_ok:
            return value
        if isinstance(self.default, dict):
            for name, v in dict(value).items():
                if self.keys is not None and name not in self.keys:
                    raise ValueError(
                        f"config.{key}.{name}: unknown {self.key_name}; allowed: "
                        f"{', '.join(self.keys)}"
                    )
                dataclasses.replace(self, default=0.0).check(v, f"{key}.{name}")
            return value
        if self.choices and value not in self.choices:
            raise ValueError(
                f"config.{key}={value!r} is not allowed; choose one of {list(self.choices)}"
            )
        if (
            (self.above is not None and value <= self.above)
            or (self.at_least is not None and value < self.at_least)
            or (self.below is not None and value >= self.below)
            or (self.at_most is not None and value > self.at_most)
        ):
            raise ValueError(f"config.{key}={value!r} must {self.bounds()}")
        return value

    def bounds(self) -> str:
        """The bounds in words: "be > 0", "lie in [0, 1)"; "" when there are none."""
        low = ("(", self.above) if self.above is not None else ("[", self.at_least)
        high = (")", self.below) if self.below is not None else ("]", self.at_most)
        if low[1] is not None and high[1] is not None:
            return f"lie in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
        if low[1] is not None:
            return f"be {'>' if low[0] == '(' else '>='} {low[1]:g}"
        if high[1] is not None:
            return f"be {'<' if high[0] == ')' else '<='} {high[1]:g}"
        return ""

    def describe(self) -> str:
        """The allowed values and the help, as ``--help`` shows them."""
        parts = [f"one of {list(self.choices)}"] if self.choices else []
        parts += [f"must {self.bounds()}"] if self.bounds() else []
        parts += ["None: off"] if self.none_ok and self.default is not None else []
        parts += ["must match on resume"] if self.resume else []
        return "; ".join(parts + ([self.help] if self.help else []))


class Group(dict):
    """Named fields and subgroups, in order, with the help ``--help`` prints above them."""

    def __init__(self, help: str = "", **fields: Field | Group):
        super().__init__(fields)
        self.help = help


PER_TASK = dict.fromkeys(TASKS, 1.0)

SCHEMA = Group(
    model=Group(
        "",
        path=Field("", "local HF / sentence-transformers folder", resume=True),
        dtype=Field("float32", "compute dtype; parameters are always float32", choices=DTYPES),
        remat=Field(False, "recompute each layer in the backward pass (less memory)"),
        attention=Field(
            "auto",
            "xla everywhere; cudnn (GPU) and splash (TPU) fused kernels; auto: the platform's best",
            choices=ATTENTION,
        ),
        pooling=Field(
            "", '"" = the folder\'s pooling (sentence-transformers), else mean', resume=True
        ),
        lora=Group(
            "LoRA (rank > 0): low-rank adapters on the linear layers named in targets (HF "
            'module names, matched as PEFT\'s target_modules: "query", "q_proj", '
            '"self_attn.o_proj"); only the adapters (and a Dense head, if any) train, the '
            "backbone's weights stay frozen.",
            rank=Field(0, at_least=0, resume=True),
            alpha=Field(16.0, "the update is scaled by alpha / rank", above=0, resume=True),
            dropout=Field(0.0, "on the adapters' input, in training", at_least=0, below=1),
            targets=Field((), resume=True),
        ),
        sparse=Field(
            "none",
            "a sparse model (sentence-transformers' SparseEncoder), scored by dot product "
            "(logits: dot / loss.temperature; sentence-transformers uses 1.0). csr: a "
            "sparse top-k autoencoder appended to a dense model (jaxembed.models.sparse): "
            "csr_hidden_dim dimensions, csr_k of them non-zero. splade: the max over a text's "
            "tokens of log(1 + ReLU(MLM logits)), a vocabulary-sized vector (a *ForMaskedLM "
            "checkpoint of BERT, RoBERTa, XLM-R), kept sparse by loss.splade_* FLOPS "
            "regularisers. A folder that is already sparse trains as it is",
            choices=SPARSE_MODELS,
            resume=True,
        ),
        multi_vector_dim=Field(
            0,
            "> 0: a multi-vector (late-interaction, ColBERT) model, sentence-transformers' "
            "MultiVectorEncoder: every token's last hidden state through a bias-free Dense to "
            "this many dimensions, normalised, a query scored against a document by MaxSim "
            "(the sum over query tokens of the best document token's cosine; logits: MaxSim / "
            "loss.temperature). 0: one vector per text. A multi-vector folder trains as it is",
            at_least=0,
            resume=True,
        ),
        query_expansion=Field(
            0,
            "a multi-vector model's queries cut or padded with the mask token to this many "
            "tokens, all scored (ColBERT's query augmentation; 32 in ColBERT). "
            "data.max_query_length must equal it. 0: none (a multi-vector folder's own)",
            at_least=0,
            resume=True,
        ),
        query_expansion_attend=Field(
            None,
            "whether the encoder attends to the query expansion's tokens (sentence-transformers' "
            "attend; false: classic ColBERT, they read the query but nothing reads them). "
            "None: a multi-vector folder's own, else false, sentence-transformers' default",
            choices=(True, False),
            none_ok=True,
            resume=True,
        ),
        csr_hidden_dim=Field(0, "0 = 4x the embedding size", at_least=0, resume=True),
        csr_k=Field(
            0, "latents kept per text; 0 = a quarter of the embedding size", at_least=0, resume=True
        ),
        csr_k_aux=Field(
            0, "latents of the auxiliary loss; 0 = half the embedding size", at_least=0, resume=True
        ),
        csr_dead_threshold=Field(
            30,
            "forward passes (2 per tower and step) without firing after which a latent is dead",
            above=0,
            resume=True,
        ),
    ),
    loss=Group(
        "",
        style=Field(
            "joint",
            'retrieval: "joint" one softmax, "f2llm" in-batch + hard, summed',
            choices=LOSS_STYLES,
        ),
        temperature=Field(0.05, above=0),
        learnable_temperature=Field(False),
        symmetric=Field(False, "add the passage -> query direction to the in-batch term"),
        false_negative_masking=Field(True, "mask candidates whose text equals the positive"),
        matryoshka_dims=Field((), "e.g. (768, 512, 256, 128); () = off"),
        matryoshka_weights=Field((), "one per dim; () = all 1"),
        quantization=Field(
            "none",
            "train the output for a quantized index (jaxembed.quantization): the loss of "
            "the straight-through int8 / binary codes is added to the float loss",
            choices=QUANTIZATIONS,
        ),
        quantization_weight=Field(1.0, "weight of the quantized loss", at_least=0),
        infonce_weight=Field(
            PER_TASK,
            'per task. Distillation from the teacher scores records carry ("scores", '
            "jaxembed.score), added to InfoNCE: KL between the teacher's and the student's "
            "softmax over each row's positive and hard negatives (kl_weight), and Margin-MSE "
            "on positive-minus-negative margins (margin_mse_weight). Student logits are "
            "cos / temperature; teacher scores are divided by teacher_temperature.",
            at_least=0,
            keys=TASKS,
            key_name="task",
        ),
        kl_weight=Field(
            dict.fromkeys(TASKS, 0.0), "per task", at_least=0, keys=TASKS, key_name="task"
        ),
        margin_mse_weight=Field(
            dict.fromkeys(TASKS, 0.0), "per task", at_least=0, keys=TASKS, key_name="task"
        ),
        teacher_temperature=Field(1.0, above=0),
        csr_beta=Field(
            0.1,
            "a sparse (CSR) model's loss: csr_gamma x InfoNCE + the reconstructions of the "
            "embedding from its top-k and top-4k latents (/8) + csr_beta x the auxiliary "
            "reconstruction from dead latents (sentence-transformers' CSRLoss)",
            at_least=0,
        ),
        csr_gamma=Field(1.0, at_least=0),
        splade_query_weight=Field(
            5e-5,
            "a SPLADE model's FLOPS regularisers (sum over the vocabulary of the squared mean "
            "activation over the global batch) on queries and on documents (positives and "
            "hard negatives), added to InfoNCE, each weight ramped up quadratically over "
            "splade_warmup_steps (sentence-transformers' SpladeLoss and its scheduler)",
            at_least=0,
        ),
        splade_document_weight=Field(3e-5, at_least=0),
        splade_warmup_steps=Field(0, "0 = a third of train.steps", at_least=0),
    ),
    optim=Group(
        "AdamW",
        lr=Field(2e-5, above=0),
        b1=Field(0.9, at_least=0, below=1),
        b2=Field(0.999, at_least=0, below=1),
        eps=Field(1e-8, above=0),
        weight_decay=Field(
            0.01, "not applied to LayerNorm scales, biases or the temperature", at_least=0
        ),
        warmup_steps=Field(100, at_least=0),
        schedule=Field(
            "cosine",
            "after warmup: cosine / linear decay to min_lr, or constant",
            choices=SCHEDULES,
        ),
        min_lr=Field(0.0, at_least=0),
        clip_norm=Field(1.0, "global-norm clipping; 0 = off", at_least=0),
    ),
    mesh=Group(
        "device mesh axes (jaxembed.sharding)",
        data=Field(-1, "-1: all devices left over by the other axes"),
        fsdp=Field(1),
        tensor=Field(1),
    ),
    train=Group(
        "",
        steps=Field(1000, above=0),
        global_batch=Field(64, above=0, resume=True),
        seed=Field(0, resume=True),
        dropout=Field(True, "the backbone's dropout during training"),
        gradcache=Field(False),
        gradcache_chunk=Field(
            16, "rows per GradCache chunk (a multiple of data parallelism)", above=0
        ),
        packing=Field(
            False,
            "several texts per row of data.max_*_length tokens (attention and pooling per "
            "text): no padding to compute",
        ),
        packing_rows=Field(
            0, "the granule: rows per tower come in its multiples (0: batch / 16)", at_least=0
        ),
        packing_shapes=Field(
            "few",
            '"few": each tower\'s row count rounded up further, to 1, 2, 3, 4, 6, 8, 12, 16, '
            "24, ... granules, so a run meets a few shapes (one compile each) instead of one "
            'per granule: ~15% more (empty) rows per step on average. "exact": the next '
            "multiple of the granule (long runs, where compiles are paid once and every "
            "step's rows count)",
            choices=PACKING_SHAPES,
        ),
        time_limit_minutes=Field(
            0.0,
            "wall-clock budget of one invocation, start-up and compiles included (0 = none): "
            "when spent, training ends after the current step (checkpoint, eval after) even "
            "if the schedule has steps left; rerunning the same command resumes and continues",
            at_least=0,
        ),
        allow_config_change=Field(
            False, "resume even when a setting marked 'must match on resume' changed"
        ),
    ),
    mine=Group(
        "Hard-negative mining during training (jaxembed.remine): every `every` steps the "
        "retrieval datasets' negatives are re-mined with the live parameters by "
        "jaxembed.mining's rules (jaxembed.mining.Rules: their defaults, F2LLM's, help and "
        "checks).",
        every=Field(0, "steps between re-minings (0: never)", at_least=0, resume=True),
        corpus=Field((), "corpus files as jaxembed.mine reads them; (): the distinct positives"),
        **{
            rule.name: Field(
                rule.default,
                rule.metadata["help"],
                choices=rule.metadata.get("choices", ()),
                none_ok=rule.metadata.get("none_ok", False),
            )
            for rule in dataclasses.fields(Rules)
            if rule.name not in ("too_few", "seed")  # a training run keeps short rows, seed 0
        },
    ),
    data=Group(
        "",
        train=Field(
            (),
            "JSONL / Parquet files, directories of them, HF datasets or prepared TFDS "
            "folders, or hf://OWNER/NAME[/CONFIG][:SPLIT] (a dataset in the local hub cache)",
            resume=True,
        ),
        skip_bad=Field(False, "skip (and count) malformed records instead of stopping"),
        columns=Field(
            {},
            'renames of your columns to the record fields, e.g. {"question": "query", '
            '"answer": "positive"}; sentence-transformers\' anchor / positive / negative(_N) '
            "need none",
        ),
        mixing=Field(
            "remaining",
            "F2LLM: proportional to remaining batches; or temperature",
            choices=MIXING,
            resume=True,
        ),
        mixing_temperature=Field(1.0, above=0),
        num_negatives=Field(
            {"retrieval": 7, "classification": 1, "clustering": 7},
            "hard negatives per row, per task",
            at_least=0,
            keys=TASKS,
            key_name="task",
            resume=True,
        ),
        negatives=Field(
            "mined",
            '"mined": each row\'s stored negatives; "random": other rows\' positives drawn '
            "uniformly from the same dataset (the control that shows what mining adds)",
            choices=NEGATIVES,
            resume=True,
        ),
        group_size=Field(
            0,
            "> 0: batches made of groups of this many rows linked by their mined negatives "
            "(a row's negative is another row's positive), so in-batch negatives are hard "
            "ones without encoding extra passages; 0: rows shuffled uniformly",
            at_least=0,
            resume=True,
        ),
        query_transform=Field(
            "",
            'a function rewriting training queries, "MODULE:FUNCTION" (f(record, rng) -> the '
            'query text; "" = none), applied to a query_transform_rate fraction of them, '
            "drawn per row: e.g. examples.debian_retrofit.script:cyrillic",
            resume=True,
        ),
        query_transform_rate=Field(0.0, at_least=0, at_most=1, resume=True),
        max_query_length=Field(64, above=0, resume=True),
        max_passage_length=Field(256, above=0, resume=True),
        query_buckets=Field((), "padded lengths; () = a quarter, half and all of the maximum"),
        passage_buckets=Field(()),
        query_prefix=Field("", 'e.g. "query: " (E5)', resume=True),
        passage_prefix=Field("", 'e.g. "passage: "', resume=True),
        instruction_template=Field("Instruct: {instruction}\nQuery: {query}", resume=True),
        workers=Field(0, "Grain worker processes building batches ahead of the step", at_least=0),
        prefetch=Field(2, at_least=0),
    ),
    ckpt=Group(
        "",
        every=Field(500, "steps between checkpoints (and one at the end)", above=0),
        keep=Field(3, above=0),
        keep_best=Field(0, "also keep this many best by eval.best_metric", at_least=0),
        async_save=Field(True),
        fallback=Field(
            False,
            "resume from the newest intact step when the latest cannot be restored (the "
            "damaged steps are moved to WORKDIR/damaged_checkpoints); False: stop and say so",
        ),
    ),
    eval=Group(
        "",
        every=Field(0, "steps between evaluations; 0 = only before and after training", at_least=0),
        data=Field((), "BEIR-layout folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"),
        split=Field("dev"),
        batch_size=Field(64, above=0),
        best_metric=Field("ndcg@10", "averaged over eval.data; used by ckpt.keep_best"),
        groups=Field(
            {},
            "named groups of eval.data sets (by folder name), each also reported as its own "
            'mean, e.g. {"zero-shot": ("xling-ja", "xling-ko"), "trained": ("xling-de",)}',
        ),
    ),
    log=Group("", every=Field(10, above=0), tensorboard=Field(True)),
)


def fields(group: Group = SCHEMA, prefix: str = ""):
    """``(key, Field)`` of every setting, nested groups flattened (``"model.lora.rank"``)."""
    for name, item in group.items():
        if isinstance(item, Group):
            yield from fields(item, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", item


FIELDS = dict(fields())
# What a resumed run must share with the run that wrote the checkpoint: the model, and what
# decides which rows, texts and negatives each step sees.
RESUME_KEYS = tuple(key for key, f in FIELDS.items() if f.resume)


def default_config() -> ml_collections.ConfigDict:
    """Every setting at its default (`SCHEMA`)."""

    def build(group: Group) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        for name, item in group.items():
            if isinstance(item, Group):
                c[name] = build(item)
            elif isinstance(item.default, dict):
                c[name] = ml_collections.ConfigDict(dict(item.default))
            else:
                c[name] = item.default
        return c

    return build(SCHEMA)


def check(key: str, value):
    """``value`` if ``config.KEY`` allows it (`SCHEMA`), else a ValueError naming both."""
    return FIELDS[key].check(value, key)


def output_type(c: ml_collections.ConfigDict) -> dict:
    """The model type ``config.model`` asks for, as `hf.sentence_transformers.output_settings`
    takes it: ``sparse``, ``csr`` (the autoencoder's hidden_dim, k, k_aux, dead_threshold)
    and ``multi_vector`` (dim, query expansion, whether it is attended)."""
    m = c.model
    return dict(
        sparse=m.sparse,
        csr=(m.csr_hidden_dim, m.csr_k, m.csr_k_aux, m.csr_dead_threshold),
        multi_vector=(m.multi_vector_dim, m.query_expansion, m.query_expansion_attend),
    )


def mining_rules(c: ml_collections.ConfigDict) -> Rules:
    """The mining rules of ``config.mine`` (checked by `Rules`, the errors naming the group)."""
    names = {f.name for f in dataclasses.fields(Rules)}
    try:
        return Rules(**{k: v for k, v in c.mine.items() if k in names})
    except MiningError as e:
        raise ValueError(f"config.mine: {e}") from None


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every setting against `SCHEMA`, then what links settings; returns the config."""
    if unknown := unknown_keys(c):
        raise ValueError(f"config.{unknown[0]}: no such setting (a typo?); see --help")
    for key, field in FIELDS.items():
        value = c
        for part in key.split("."):
            value = value[part]
        field.check(value, key)
    if c.train.gradcache and c.train.global_batch % c.train.gradcache_chunk:
        raise ValueError(
            f"config.train.gradcache_chunk={c.train.gradcache_chunk} must divide "
            f"config.train.global_batch={c.train.global_batch}"
        )
    if c.model.lora.rank and not c.model.lora.targets:
        raise ValueError(
            "config.model.lora.targets is empty: name the linear layers to adapt, "
            "e.g. ('query', 'key', 'value') for BERT or ('q_proj', 'v_proj') for Qwen3"
        )
    mining_rules(c)
    if c.model.sparse == "splade" and c.model.pooling not in ("", "splade"):
        raise ValueError(
            f"config.model.pooling={c.model.pooling!r}: a SPLADE model (model.sparse=splade) "
            "pools its MLM logits; leave model.pooling empty"
        )
    if c.model.multi_vector_dim and (c.model.sparse != "none" or c.model.pooling):
        raise ValueError(
            "config.model.multi_vector_dim: a multi-vector model keeps every token (no "
            "pooling) and is dense: leave model.pooling empty and model.sparse=none"
        )
    if c.model.pooling == "splade" and c.model.sparse != "splade":
        raise ValueError(
            "config.model.pooling='splade' pools an MLM head, which only model.sparse=splade "
            "loads: set config.model.sparse=splade (a SPLADE folder needs neither)"
        )
    if c.optim.min_lr > c.optim.lr:
        raise ValueError(
            f"config.optim.min_lr={c.optim.min_lr} exceeds config.optim.lr={c.optim.lr}"
        )
    # data.group_size against the batch, buckets and the query transform: `PipelineConfig`.
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


def unknown_keys(c: ml_collections.ConfigDict, group: Group = SCHEMA, prefix: str = "") -> list:
    """Keys of ``c`` that `SCHEMA` does not define (a typo in a config file)."""
    out = []
    for name, value in c.items():
        item = group.get(name)
        if item is None:
            out.append(f"{prefix}{name}")
        elif isinstance(item, Group):
            out += unknown_keys(value, item, f"{prefix}{name}.")
    return out


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
    """Sets ``config.<key>`` from command-line ``text``, parsed as the setting's type.

    Booleans take true/false (or 1/0, yes/no); tuples take a Python literal ("(1, 2)") or
    comma-separated values ("a.jsonl,b.jsonl"); ``none`` turns off a setting that allows
    it; a dict setting takes new keys where `SCHEMA` allows any (``eval.groups.NAME``).
    Unknown keys and unparsable values are errors naming the key.
    """
    *parents, name = key.split(".")
    group = config
    for i, part in enumerate(parents):
        if part not in group or not isinstance(group[part], ml_collections.ConfigDict):
            raise ValueError(f"--config.{key}: config.{'.'.join(parents[: i + 1])} is not a group")
        group = group[part]
    field, parent = FIELDS.get(key), FIELDS.get(".".join(parents))
    if field is not None:  # a setting None by default parses as its choices' type
        like = field.default if field.default is not None or not field.choices else field.choices[0]
        group[name] = _parse(text, like, key, field.none_ok)
    elif parent is not None and (parent.keys is None or name in parent.keys):
        # An entry of a dict setting: typed like the entry it replaces, if any.
        group[name] = _parse(text, group.get(name), key)
    elif parent is not None:
        raise ValueError(f"--config.{key}: unknown key; allowed: {', '.join(parent.keys)}")
    elif isinstance(group.get(name), ml_collections.ConfigDict):
        raise ValueError(f"--config.{key}: a group; set its fields ({sorted(group[name])})")
    else:
        where = f"config.{'.'.join(parents)}" if parents else "config"
        raise ValueError(f"--config.{key}: no such field; {where} has {sorted(group)}")


def _parse(text: str, like, key: str, none_ok: bool = False):
    """``text`` as a value of ``like``'s type (any Python literal when it is None)."""
    if none_ok and text.strip().lower() == "none":
        return None
    try:
        if isinstance(like, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, str):
            return text
        if isinstance(like, (tuple, list)) or like is None:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if like is None:
                return value
            if isinstance(value, str):  # a,b,c
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(like)(value)
    except ValueError as e:
        raise ValueError(f"--config.{key}={text!r}: {e}") from None
    raise ValueError(f"--config.{key}: cannot set a {type(like).__name__} from the command line")


def describe(config: ml_collections.ConfigDict | None = None) -> list[str]:
    """``--help``: a ``config.KEY = value  # allowed values; help`` line per setting (of
    ``config``, default: the defaults), each group's help above its fields."""
    config = default_config() if config is None else config
    lines = []

    def walk(group: Group, values, prefix: str) -> None:
        lines.extend([f"{prefix}.*  # {group.help}"] if group.help else [])
        for name, item in group.items():
            key = f"{prefix}.{name}"
            if isinstance(item, Group):
                walk(item, values[name], key)
                continue
            value = values[name]
            shown = dict(value) if isinstance(value, ml_collections.ConfigDict) else value
            note = item.describe()
            lines.append(f"{key} = {shown!r}" + (f"  # {note}" if note else ""))

    walk(SCHEMA, config, "config")
    return lines
