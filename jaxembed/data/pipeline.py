"""The Grain input pipeline: task-homogeneous global batches, sharded per host, exactly resumable.

The pipeline is a `grain.MapDataset` indexed by *global step*: element ``s`` is this host's
slice of global batch ``s``. Everything about batch ``s`` is a pure function of
``(seed, s)`` and the dataset sizes, so

- every host agrees on which dataset batch ``s`` comes from and which rows it holds, with
  no communication (each host materialises only its rows);
- resuming is exact: Grain's iterator state is the next step index, saved with the model;
- worker processes (``mp_prefetch``) can build batches out of order and in parallel.

Mixing (which dataset each global batch comes from):

- ``"remaining"`` (F2LLM): each epoch is a uniformly random order of all datasets' batches,
  which is the same as picking a dataset with probability proportional to its remaining
  batches at every step. Seeded by (seed, epoch).
- ``"temperature"``: every step independently picks dataset d with probability
  proportional to ``rows_d ** (1 / T)``; each dataset cycles through its own epochs.

Within a dataset, rows are shuffled per (seed, dataset, epoch); a batch's hard negatives are
sampled from each row's stored pool per (seed, dataset, epoch, row). Each host reads and
tokenizes only its own rows of the global batch: element ``s`` holds their token ids
(``query``, ``pos``, ``neg``: lists of id lists, negative ``t`` of row ``r`` at ``r * K +
t``), masks and hashes. Before the step the hosts agree on row lengths and counts and pack
them (`Packing`; `agree`): the step sees one layout, rows of
token ids with segment ids, whatever the packing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
from collections import OrderedDict
from collections.abc import Sequence

import grain
import numpy as np

from jaxembed import config as config_lib
from jaxembed.packing import bucket, fill, pack_rows, text_hash
from jaxembed.tokenizer import expand_queries, load_tokenizer

_DATA = config_lib.default_config().data  # the defaults live in jaxembed.config, once


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Three padded lengths per text kind: a quarter, half and all of ``max_length``."""
    return tuple(sorted({max(16, max_length // 4), max(16, max_length // 2), max_length}))


class Stream(enum.IntEnum):
    """The random streams of the pipeline: each draw is seeded by ``[train.seed, stream,
    ...]`` and what it is for (dataset, epoch, row), so one stream never shifts another and a
    batch is a pure function of its index. The numbers are the seeds: changing one changes
    every run's batches."""

    MIXING = 1  # which dataset each global step reads
    ROW_ORDER = 2  # the order of a dataset's rows in an epoch (and its linked groups)
    NEGATIVE_PICK = 3  # which of a row's stored (or re-mined) negatives a step uses
    RANDOM_NEGATIVES = 4  # data.negatives="random": other rows' positives
    QUERY_TRANSFORM = 7  # which queries data.query_transform rewrites (and its own draws)


@functools.cache
def query_transform(spec: str):
    """The function ``spec`` names, ``"MODULE:FUNCTION"`` (``f(record, rng) -> query text``):
    the general hook for rewriting training queries (`examples.debian_retrofit.script` has
    one). Imported where batches are built, worker processes included."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if module and name else None
    except ImportError as e:
        raise ValueError(
            f"config.data.query_transform={spec!r}: cannot import {module} ({e})"
        ) from None
    except AttributeError:
        fn = None
    if not callable(fn):
        raise ValueError(
            f"config.data.query_transform={spec!r}: expected MODULE:FUNCTION naming a function"
        )
    return fn


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The ``config.data`` settings the pipeline reads (`from_config`); see `jaxembed.config`."""

    global_batch: int
    seed: int = 0
    mixing: str = _DATA.mixing
    mixing_temperature: float = _DATA.mixing_temperature
    num_negatives: tuple[tuple[str, int], ...] = tuple(_DATA.num_negatives.items())
    negatives: str = _DATA.negatives
    group_size: int = _DATA.group_size  # > 0: batches of rows linked by mined negatives
    query_transform: str = _DATA.query_transform  # "MODULE:FUNCTION", "" = none
    query_transform_rate: float = _DATA.query_transform_rate
    max_query_length: int = _DATA.max_query_length
    max_passage_length: int = _DATA.max_passage_length
    query_buckets: tuple[int, ...] = ()  # () = default_buckets(max_query_length)
    passage_buckets: tuple[int, ...] = ()
    query_prefix: str = _DATA.query_prefix
    passage_prefix: str = _DATA.passage_prefix
    instruction_template: str = _DATA.instruction_template
    # A multi-vector model's query expansion (the run folder's, not config.data's): queries
    # padded with the mask token to this many tokens (`tokenizer.expand_queries`); 0: none;
    # attended by the encoder or not (then the step's batch holds ``query_keys``).
    query_expansion: int = 0
    query_expansion_attend: bool = False

    @classmethod
    def from_config(cls, config) -> PipelineConfig:
        """The pipeline settings of a run config: the batch, the seed and ``config.data``'s
        settings of the same names."""
        given = {
            f.name: config.data[f.name]
            for f in dataclasses.fields(cls)
            if f.name in config.data and f.name != "num_negatives"
        }
        return cls(
            global_batch=config.train.global_batch,
            seed=config.train.seed,
            num_negatives=tuple(config.data.num_negatives.items()),
            **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items()},
        )

    def __post_init__(self):
        for f in dataclasses.fields(self):  # allowed values and bounds: the config's schema
            if f"data.{f.name}" in config_lib.FIELDS:
                value = getattr(self, f.name)
                value = dict(value) if f.name == "num_negatives" else value
                config_lib.check(f"data.{f.name}", value)
        if self.group_size > self.global_batch:
            raise ValueError(
                f"config.data.group_size={self.group_size} must lie in 0..{self.global_batch} "
                "(the global batch)"
            )
        if self.query_transform_rate and not self.query_transform:
            raise ValueError(
                f"config.data.query_transform_rate={self.query_transform_rate} needs "
                "config.data.query_transform (MODULE:FUNCTION)"
            )
        if self.query_transform:
            query_transform(self.query_transform)  # importable, or one line saying why not
        if self.global_batch < 1:
            raise ValueError(f"global batch {self.global_batch} must be >= 1")
        for name in ("query_buckets", "passage_buckets"):
            limit = self.max_query_length if name == "query_buckets" else self.max_passage_length
            if any(b > limit or b < 1 for b in getattr(self, name)):
                raise ValueError(f"config.data.{name}={getattr(self, name)} must lie in 1..{limit}")

    def negatives_for(self, task: str) -> int:
        return dict(self.num_negatives)[task]

    def buckets(self, kind: str) -> tuple[int, ...]:
        """Padded lengths for ``kind`` ("query" / "passage"), always ending at the maximum."""
        given = self.query_buckets if kind == "query" else self.passage_buckets
        limit = self.max_query_length if kind == "query" else self.max_passage_length
        return tuple(sorted({*given, limit})) if given else default_buckets(limit)


class Links:
    """Each row's linked rows in two flat arrays (CSR): row ``i``'s are
    ``rows[starts[i]:starts[i + 1]]``. 8 bytes per row and per link: a Python list of one
    array per row cost ~100 bytes per row more, in every worker process."""

    def __init__(self, starts: np.ndarray, rows: np.ndarray):
        self.starts, self.rows = starts, rows

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[self.starts[i] : self.starts[i + 1]]


def negative_links(source) -> Links:
    """For each row, the rows whose positive is one of its mined negatives, best first.

    In data mined against the distinct positives (``jaxembed.mine`` without ``--corpus``),
    a row's hard negatives are other rows' positives: putting those rows in the same batch
    makes them in-batch negatives, at no extra encoding.

    One pass over the records keeps only text hashes (a record at a time, never the
    table); the matching is sorted search: O(n log n) time, memory linear in rows + links.
    """
    n = len(source)
    positive = np.empty(n, np.int64)
    negative: list[int] = []  # every row's negatives' hashes, row after row
    owner: list[int] = []  # the row each of them belongs to
    for i in range(n):
        record = source[i]
        positive[i] = text_hash(record["positive"])
        hashes = [text_hash(t) for t in record["negatives"]]
        negative += hashes
        owner += [i] * len(hashes)
    by_hash = np.argsort(positive, kind="stable")  # rows sharing a positive stay in order
    sorted_hash = positive[by_hash]
    neg, own = np.asarray(negative, np.int64), np.asarray(owner, np.int64)
    lo = np.searchsorted(sorted_hash, neg, "left")
    count = np.searchsorted(sorted_hash, neg, "right") - lo
    # Each negative's matching rows, negative after negative: the ranges lo .. lo + count.
    first = np.repeat(lo - np.cumsum(count) + count, count)
    match = by_hash[first + np.arange(int(count.sum()))]
    match_owner = np.repeat(own, count)
    # A row linked twice (two of its negatives are one row's positive) keeps its first place.
    _, keep = np.unique(match_owner * n + match, return_index=True)
    keep.sort()
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(match_owner[keep], minlength=n), out=starts[1:])
    return Links(starts, match[keep])


def negative_groups(links: Links, size: int, rng) -> np.ndarray:
    """A permutation of the rows in which consecutive runs of up to ``size`` rows are linked.

    Groups grow breadth-first from seeds in random order over `negative_links`; a group
    whose neighbourhood runs out is simply shorter. A global batch of B rows then holds
    about B / size groups: each row meets its hard negatives as other rows' positives.
    """
    n = len(links)
    taken = np.zeros(n, bool)
    order: list[int] = []
    for seed in rng.permutation(n):
        if taken[seed]:
            continue
        taken[seed] = True
        group, frontier = [int(seed)], [int(seed)]
        while frontier and len(group) < size:
            row = frontier.pop(0)
            for nb in links[row]:
                if not taken[nb]:
                    taken[nb] = True
                    group.append(int(nb))
                    frontier.append(int(nb))
                    if len(group) == size:
                        break
        order.extend(group)
    return np.asarray(order, np.int64)


class Schedule:
    """Which dataset, epoch and batch number every global step reads: identical on all hosts."""

    def __init__(self, sizes: Sequence[int], global_batch: int, total_steps: int, cfg):
        self.batches = np.array([n // global_batch for n in sizes], np.int64)
        empty = [i for i, n in enumerate(self.batches) if n == 0]
        if empty:
            raise ValueError(
                f"datasets {empty} have fewer rows ({[sizes[i] for i in empty]}) than one "
                f"global batch ({global_batch})"
            )
        if cfg.mixing == "remaining":
            per_epoch = np.repeat(np.arange(len(sizes)), self.batches)
            epochs = -(-total_steps // len(per_epoch))
            choices = np.concatenate(
                [
                    np.random.default_rng([cfg.seed, Stream.MIXING, e]).permutation(per_epoch)
                    for e in range(epochs)
                ]
            )[:total_steps]
        else:
            p = np.asarray(sizes, np.float64) ** (1.0 / cfg.mixing_temperature)
            choices = np.random.default_rng([cfg.seed, Stream.MIXING]).choice(
                len(sizes), total_steps, p=p / p.sum()
            )
        self.choices = choices
        # How many earlier steps chose the same dataset: that dataset's running batch count.
        self.counts = np.zeros(total_steps, np.int64)
        for d in range(len(sizes)):
            where = choices == d
            self.counts[where] = np.arange(where.sum())
        self.steps_per_epoch = int(self.batches.sum())

    def __len__(self) -> int:
        return len(self.choices)

    def lookup(self, step: int) -> tuple[int, int, int]:
        """(dataset, that dataset's epoch, batch number within the epoch) of a global step."""
        d = int(self.choices[step])
        epoch, j = divmod(int(self.counts[step]), int(self.batches[d]))
        return d, epoch, j


class BatchBuilder:
    """Builds this host's slice of global batch ``step`` (Grain's map function).

    Picklable: the tokenizer is loaded lazily from its folder in each worker process.
    """

    def __init__(
        self,
        sources: Sequence,
        tokenizer_path: str,
        cfg: PipelineConfig,
        total_steps: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if cfg.global_batch % process_count:
            raise ValueError(
                f"global batch {cfg.global_batch} is not divisible by the {process_count} hosts"
            )
        tasks = {s.task for s in sources}
        unknown = tasks - set(dict(cfg.num_negatives))
        if unknown:
            raise ValueError(f"no num_negatives entry for tasks {sorted(unknown)}")
        self.sources = list(sources)
        self.tokenizer_path = str(tokenizer_path)
        self.cfg = cfg
        self.schedule = Schedule([len(s) for s in sources], cfg.global_batch, total_steps, cfg)
        per_host = cfg.global_batch // process_count
        self.local = slice(process_index * per_host, (process_index + 1) * per_host)
        self._tokenizer = None
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        # Per dataset, for group_size: computed here, once per host, and pickled to the
        # workers (compact arrays) rather than recomputed in each.
        self._links = {d: negative_links(s) for d, s in enumerate(sources) if cfg.group_size}
        # Negatives re-mined during training: (texts, {source index: (rows, K) indices into
        # texts, -1 padded}); they replace those sources' stored negatives. None: stored.
        self.remined: tuple[list[str], dict[int, np.ndarray]] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        state["_perms"] = OrderedDict()
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _rows(self, d: int, epoch: int, j: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.cfg.seed, Stream.ROW_ORDER, d, epoch])
            if self.cfg.group_size:
                self._perms[key] = negative_groups(self._links[d], self.cfg.group_size, rng)
            else:
                self._perms[key] = rng.permutation(len(self.sources[d]))
            while len(self._perms) > 2 * len(self.sources):
                self._perms.popitem(last=False)
        g = self.cfg.global_batch
        return self._perms[key][j * g : (j + 1) * g]

    def query_text(self, record: dict, rng: np.random.Generator | None = None) -> str:
        """The query as the model reads it: instruction template, else the query prefix.

        With ``rng`` (a training query's coin came up: ``data.query_transform_rate``), the
        query (not the instruction) goes through ``data.query_transform`` first.
        """
        query = record["query"]
        if rng is not None:
            query = query_transform(self.cfg.query_transform)(record, rng)
        if record.get("instruction"):
            return self.cfg.instruction_template.format(
                instruction=record["instruction"], query=query
            )
        return self.cfg.query_prefix + query

    def _tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        if not texts:
            return []
        out = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)
        return out["input_ids"]

    @staticmethod
    def _random_negatives(source, record: dict, k: int, seed: list[int]) -> list[str]:
        """``k`` positives of other rows of ``source``, uniform, none equal to this positive."""
        rng = np.random.default_rng(seed)
        out: list[str] = []
        for _ in range(8):  # rejection rounds: a draw misses only on an equal positive
            for idx in rng.integers(len(source), size=2 * k):
                text = source[int(idx)]["positive"]
                if text != record["positive"] and text not in out and len(out) < k:
                    out.append(text)
            if len(out) == k:
                break
        return out

    def __call__(self, step: int) -> dict:
        cfg = self.cfg
        d, epoch, j = self.schedule.lookup(int(step))
        source = self.sources[d]
        task = source.task
        k = cfg.negatives_for(task)
        # This host's rows only: what it reads and tokenizes shrinks as hosts are added.
        rows = self._rows(d, epoch, j)[self.local]
        # A jaxembed source reads the batch at once (TFDS: one ArrayRecord call); any other
        # random-access source (Grain's protocol: __len__, __getitem__), one at a time.
        get_many = getattr(source, "get_many", None)
        records = get_many(rows) if get_many else [source[int(i)] for i in rows]
        negatives, valid = [], np.zeros((len(rows), k), bool)
        # The teacher's scores of each row's positive and chosen negatives; NaN: none.
        teacher = np.full((len(rows), 1 + k), np.nan, np.float32)
        for r, (i, rec) in enumerate(zip(rows, records, strict=True)):
            scores = rec.get("scores")
            if cfg.negatives == "random":
                seed = [cfg.seed, Stream.RANDOM_NEGATIVES, d, epoch, int(i)]
                chosen = self._random_negatives(source, rec, k, seed)
                picked = []  # drawn from other rows: the teacher never scored them
            else:
                pool = rec["negatives"]
                if self.remined is not None and d in self.remined[1]:
                    texts, rows_of = self.remined
                    pool = [texts[j] for j in rows_of[d][i] if j >= 0]
                    scores = None  # the teacher scored the stored negatives, not these
                rng = np.random.default_rng([cfg.seed, Stream.NEGATIVE_PICK, d, epoch, int(i)])
                picked = rng.permutation(len(pool))[:k].tolist() if pool else []
                chosen = [pool[t] for t in picked]
            if scores is not None:
                teacher[r, 0] = scores[0]
                teacher[r, 1 : 1 + len(picked)] = [scores[1 + t] for t in picked]
            negatives.append(chosen)
            valid[r, : len(chosen)] = True
        # Which queries are transformed: one coin per (seed, dataset, epoch, row); the
        # transform draws from the same generator after it.
        rngs = [np.random.default_rng([cfg.seed, Stream.QUERY_TRANSFORM, d, epoch, int(i)])
                for i in rows] if cfg.query_transform_rate else [None] * len(rows)  # fmt: skip
        rngs = [
            g if g is not None and g.random() < cfg.query_transform_rate else None for g in rngs
        ]
        texts = [self.query_text(r, g) for r, g in zip(records, rngs, strict=True)]
        q_ids, q_hidden = self._tokenize(texts, cfg.max_query_length), None
        if cfg.query_expansion:
            q_ids, q_hidden = expand_queries(
                q_ids, cfg.query_expansion, self.tokenizer, cfg.query_expansion_attend
            )
        p_ids = self._tokenize(
            [cfg.passage_prefix + r["positive"] for r in records], cfg.max_passage_length
        )
        flat = [cfg.passage_prefix + t for negs in negatives for t in negs]
        flat_ids = iter(self._tokenize(flat, cfg.max_passage_length))
        # Row r's negative t is text r * k + t; absent ones (a short pool) are empty.
        n_ids = [next(flat_ids) if valid[r, t] else [] for r in range(len(rows)) for t in range(k)]
        neg_hash = np.zeros((len(rows), k), np.int32)
        for r, negs in enumerate(negatives):
            neg_hash[r, : len(negs)] = [text_hash(t) for t in negs]
        return {
            "query": q_ids,
            "query_hidden": q_hidden,  # expansion tokens no token attends to, or None
            "pos": p_ids,
            "neg": n_ids,
            "neg_valid": valid,
            "pos_hash": np.array([text_hash(r["positive"]) for r in records], np.int32),
            "neg_hash": neg_hash,
            "teacher": teacher,
            "step": np.int64(step),
            "source": np.int64(d),
            "task": task,
            "dataset": source.name,
            "pad_id": np.int32(self.tokenizer.pad_token_id or 0),
            "num_tokens": np.int64(sum(map(len, q_ids + p_ids + n_ids))),
        }


# --- the train step's batch: texts packed into rows ----------------------------------------
# Every tower (queries, positives, hard negatives) is rows of token ids with segment ids
# (`jaxembed.packing`): ``<tower>_ids`` and ``<tower>_seg`` (R, L), 1, 2, ... per text and 0
# for padding, and ``<tower>_slot``: for every text, (global row, segment - 1), where the
# step finds its pooled embedding in the (R, segments, dim) output. With one text per row
# this is a padded batch. Absent texts (padded hard negatives) take no room; their slot is
# any valid one and ``neg_valid`` masks them in the loss. ``query_keys`` (the segment ids
# attended to) is there only when a multi-vector model's query expansion is not attended.

STEP_KEYS = (
    "query_ids",
    "query_seg",
    "query_pool",
    "query_keys",
    "query_slot",
    "pos_ids",
    "pos_seg",
    "pos_slot",
    "neg_ids",
    "neg_seg",
    "neg_slot",
    "neg_valid",
    "pos_hash",
    "neg_hash",
    "teacher",
)


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a host's batch becomes the train step's rows: lengths, segments, row-count granule.

    A tower's rows are as long as the bucket that holds its longest text (queries and
    passages each have their buckets; positives and negatives share one length), and hold
    at most ``num_segments`` texts (1: one text per row). ``granule`` is the host-local
    row-count step: every host pads its tower with empty rows to the same multiple of it
    (hosts agree on lengths and counts before the step), so the global row count divides the
    data-parallel size (and the GradCache chunk). Each (length, rows) met is one compile.
    """

    query_buckets: tuple[int, ...]
    passage_buckets: tuple[int, ...]
    granule: int
    num_segments: int  # texts per row at most (`jaxembed.packing.MAX_SEGMENTS` or fewer)
    few_shapes: bool = False  # config.train.packing_shapes == "few"

    def lengths(self, batch: dict) -> dict[str, int]:
        """This host's row length per kind ("query", "passage"): the bucket of its longest."""
        longest_q = max(map(len, batch["query"]), default=1)
        longest_p = max(map(len, batch["pos"] + batch["neg"]), default=1)
        return {
            "query": bucket(longest_q, self.query_buckets),
            "passage": bucket(longest_p, self.passage_buckets),
        }

    def plan(self, batch: dict, lengths: dict[str, int]) -> dict[str, list[list[int]]]:
        """Per tower, the texts of each row (`jaxembed.packing.pack_rows`) at ``lengths``."""
        plans = {}
        for name in ("query", "pos", "neg"):
            texts = batch[name]
            if name == "neg" and not texts:
                continue
            keep = [i for i, t in enumerate(texts) if t or name != "neg"]  # absent: no room
            row_length = lengths["query" if name == "query" else "passage"]
            rows = pack_rows([len(texts[i]) for i in keep], row_length, self.num_segments)
            plans[name] = [[keep[i] for i in row] for row in rows]
        return plans

    def rows(self, needed: int) -> int:
        """Host-local rows for a tower that needs ``needed``: the next multiple of the granule,
        with ``few_shapes`` the next one of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... granules (two
        significant binary digits: up to half as many again, ~15% on average in our runs)."""
        granules = max(1, -(-needed // self.granule))
        if self.few_shapes and granules.bit_length() > 2:
            shift = granules.bit_length() - 2
            granules = -(-granules >> shift) << shift
        return granules * self.granule

    def pack(
        self,
        batch: dict,
        plans: dict,
        lengths: dict[str, int],
        rows: dict[str, int],
        global_rows: dict[str, np.ndarray],
    ) -> dict:
        """The step's arrays (`STEP_KEYS`): every tower packed into ``rows[t]`` rows.

        ``global_rows[t][r]`` is the global index of this host's row ``r`` of tower ``t``
        (`jaxembed.sharding.local_rows`), so that slots address the global (sharded) matrix
        of segment embeddings.
        """
        out = {k: batch[k] for k in ("neg_valid", "pos_hash", "neg_hash")}
        b, k = batch["neg_valid"].shape
        # A hand-made host batch may carry no teacher scores: none, as for unscored data.
        out["teacher"] = batch.get("teacher", np.full((b, 1 + k), np.nan, np.float32))
        for name, plan in plans.items():
            length = lengths["query" if name == "query" else "passage"]
            hidden = batch.get(f"{name}_hidden")
            ids, seg, pooled, keys, where = fill(
                batch[name], plan, rows[name], length, int(batch["pad_id"]), hidden=hidden
            )
            slot = np.zeros((len(batch[name]), 2), np.int32)
            slot[:, 0] = global_rows[name][0]
            slot[where[:, 0], 0] = global_rows[name][where[:, 1]]
            slot[where[:, 0], 1] = where[:, 2]
            out[f"{name}_ids"], out[f"{name}_seg"] = ids, seg
            if name == "query":
                out["query_pool"] = pooled
            if hidden is not None:
                out[f"{name}_keys"] = keys
            out[f"{name}_slot"] = (
                slot.reshape(*batch["neg_valid"].shape, 2) if name == "neg" else slot
            )
        return out

    def pack_local(self, batch: dict) -> dict:
        """`pack` for one process: its own lengths and rows (what `agree` agrees on)."""
        lengths = self.lengths(batch)
        plans = self.plan(batch, lengths)
        rows = {t: self.rows(len(p)) for t, p in plans.items()}
        return self.pack(batch, plans, lengths, rows, {t: np.arange(r) for t, r in rows.items()})


# Why a run stops early, as exchanged between hosts: the largest request wins, so a
# preemption (save and exit) overrides a spent time limit (finish: eval after, save).
NO_STOP, TIME_LIMIT, PREEMPTED = 0, 1, 2


def agree(
    batch: dict, stop_request: int, packing: Packing, exchange=None, global_rows=None
) -> tuple[dict, int, int]:
    """What every host must agree on before a step: ``(step batch, global tokens, stop)``.

    Hosts exchange their batch's index and source, their row lengths (the bucket of their
    longest text per kind) and the rows each tower needs, their real token count and their
    stop request (``PREEMPTED``: SIGTERM on one preempted host; ``TIME_LIMIT``:
    ``train.time_limit_minutes`` spent). All pack into the longest lengths and the most
    rows, and all stop after the same step for the same reason, so none is left waiting in
    a collective. ``exchange(values) -> (hosts, ...)`` stacks every host's values
    (`jaxembed.distributed.gather`: through the coordination service, never a device
    collective that would queue behind the running step); ``global_rows(rows)`` is this
    host's global row of each of its rows of a tower of ``rows`` in all
    (`jaxembed.sharding.local_rows`). Both None: one process, nothing exchanged.
    """
    lengths = packing.lengths(batch)
    plans = packing.plan(batch, lengths)
    towers = ("query", "pos", "neg")
    need = [len(plans.get(t, ())) for t in towers]
    local = [batch["step"], batch["source"], lengths["query"], lengths["passage"]]
    local += [batch["num_tokens"], stop_request, *need]
    local = np.asarray(local, np.int64)
    hosts = local[None] if exchange is None else exchange(local)
    if (hosts[:, :2] != hosts[0, :2]).any():
        raise RuntimeError(
            "hosts disagree on the global batch (index, dataset) per process: "
            f"{hosts[:, :2].tolist()}; the input pipelines are out of step"
        )
    lengths = {"query": int(hosts[:, 2].max()), "passage": int(hosts[:, 3].max())}
    most = dict(zip(towers, hosts[:, 6:].max(0).tolist(), strict=True))
    rows = {t: packing.rows(most[t]) for t in plans}
    count = len(hosts)
    where = {
        t: global_rows(r * count) if global_rows is not None else np.arange(r)
        for t, r in rows.items()
    }
    batch = packing.pack(batch, plans, lengths, rows, where)
    return batch, int(hosts[:, 4].sum()), int(hosts[:, 5].max())


def make_dataset(builder: BatchBuilder, start_step: int = 0) -> grain.MapDataset:
    """Global steps ``start_step .. total`` as a Grain MapDataset of host-local batches."""
    return grain.MapDataset.range(start_step, len(builder.schedule)).map(builder)


def make_iterator(dataset: grain.MapDataset, workers: int = 0, prefetch: int = 2):
    """An iterator with Grain checkpointable state (``get_state`` / ``set_state``).

    ``workers`` > 0 builds batches in that many processes, ahead of the train step.
    """
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers > 0:
        from absl import flags

        # Grain's worker processes read absl flags; outside an absl app nobody parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)
