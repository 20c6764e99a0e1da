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
tokenizes only its own rows of the global batch and pads them to its own bucket length;
before the step the hosts exchange their lengths and pad to the largest (`pad_lengths`),
which is the bucket the whole global batch would have picked on one host.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import grain
import numpy as np

MIXING = ("remaining", "temperature")
# Where a row's negatives come from: its stored (mined) pool, or, as the control that shows
# what mining adds, other rows' positives drawn uniformly from the same dataset.
NEGATIVES = ("mined", "random")
DEFAULT_NEGATIVES = {"retrieval": 7, "clustering": 7, "classification": 1}


def text_hash(text: str) -> int:
    """A stable 31-bit hash of a text (the same on every host and every run)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Three padded lengths per text kind: a quarter, half and all of ``max_length``."""
    return tuple(sorted({max(16, max_length // 4), max(16, max_length // 2), max_length}))


def bucket_length(ids: list[list[int]], buckets: Sequence[int]) -> int:
    """The smallest bucket that holds the longest sequence (texts are already truncated)."""
    longest = max((len(x) for x in ids), default=1)
    return next(b for b in buckets if b >= longest)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    global_batch: int
    seed: int = 0
    mixing: str = "remaining"
    mixing_temperature: float = 1.0
    num_negatives: tuple[tuple[str, int], ...] = tuple(DEFAULT_NEGATIVES.items())
    negatives: str = "mined"  # one of NEGATIVES
    # > 0: each batch is made of groups of this many rows linked by their mined negatives
    # (`negative_groups`), so in-batch negatives are hard ones; 0: rows shuffled uniformly.
    group_size: int = 0
    # Fraction of each training query's tokens replaced by random vocabulary tokens: queries
    # partly made of words the model cannot read, as in languages it was never trained on.
    query_noise: float = 0.0
    max_query_length: int = 64
    max_passage_length: int = 256
    query_buckets: tuple[int, ...] = ()  # () = default_buckets(max_query_length)
    passage_buckets: tuple[int, ...] = ()
    query_prefix: str = ""  # e.g. E5's "query: "
    passage_prefix: str = ""  # e.g. E5's "passage: "
    # Applied when a record has an instruction (F2LLM's format); passages never get one.
    instruction_template: str = "Instruct: {instruction}\nQuery: {query}"

    def __post_init__(self):
        if self.mixing not in MIXING:
            raise ValueError(f"config.data.mixing={self.mixing!r}; choose one of {list(MIXING)}")
        if self.negatives not in NEGATIVES:
            raise ValueError(
                f"config.data.negatives={self.negatives!r}; choose one of {list(NEGATIVES)}"
            )
        if self.group_size < 0 or self.group_size > self.global_batch:
            raise ValueError(
                f"config.data.group_size={self.group_size} must lie in 0..{self.global_batch} "
                "(the global batch)"
            )
        if not 0.0 <= self.query_noise < 1.0:
            raise ValueError(f"config.data.query_noise={self.query_noise} must lie in [0, 1)")
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


def negative_links(source) -> list[np.ndarray]:
    """For each row, the rows whose positive is one of its mined negatives, best first.

    In data mined against the distinct positives (``jaxembed.mine`` without ``--corpus``),
    a row's hard negatives are other rows' positives: putting those rows in the same batch
    makes them in-batch negatives, at no extra encoding.
    """
    by_positive: dict[int, list[int]] = {}
    records = [source[i] for i in range(len(source))]
    for i, r in enumerate(records):
        by_positive.setdefault(text_hash(r["positive"]), []).append(i)
    links = []
    for r in records:
        rows = [j for t in r["negatives"] for j in by_positive.get(text_hash(t), ())]
        links.append(np.asarray(list(dict.fromkeys(rows)), np.int64))
    return links


def negative_groups(links: Sequence[np.ndarray], size: int, rng) -> np.ndarray:
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
                    np.random.default_rng([cfg.seed, 1, e]).permutation(per_epoch)
                    for e in range(epochs)
                ]
            )[:total_steps]
        else:
            p = np.asarray(sizes, np.float64) ** (1.0 / cfg.mixing_temperature)
            choices = np.random.default_rng([cfg.seed, 1]).choice(
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
        self._links: dict[int, list[np.ndarray]] = {}  # per dataset, for group_size
        self._special = None  # the tokenizer's special token ids, for query_noise

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        state["_perms"] = OrderedDict()
        state["_links"] = {}
        state["_special"] = None
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from jaxembed.encoder import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _rows(self, d: int, epoch: int, j: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.cfg.seed, 2, d, epoch])
            if self.cfg.group_size:
                if d not in self._links:
                    self._links[d] = negative_links(self.sources[d])
                self._perms[key] = negative_groups(self._links[d], self.cfg.group_size, rng)
            else:
                self._perms[key] = rng.permutation(len(self.sources[d]))
            while len(self._perms) > 2 * len(self.sources):
                self._perms.popitem(last=False)
        g = self.cfg.global_batch
        return self._perms[key][j * g : (j + 1) * g]

    def _query_text(self, record: dict) -> str:
        if record.get("instruction"):
            return self.cfg.instruction_template.format(
                instruction=record["instruction"], query=record["query"]
            )
        return self.cfg.query_prefix + record["query"]

    def _tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        if not texts:
            return []
        out = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)
        return out["input_ids"]

    @staticmethod
    def _pad(ids: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.full((len(ids), length), pad_id, np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for r, x in enumerate(ids):
            out[r, : len(x)] = x
            mask[r, : len(x)] = 1
        return out, mask

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

    def _noised(self, ids: list[int], seed: list[int]) -> list[int]:
        """``ids`` with a ``query_noise`` fraction of its non-special tokens made random."""
        tok = self.tokenizer
        if self._special is None:
            self._special = np.asarray(sorted(set(tok.all_special_ids)), np.int64)
        x = np.asarray(ids, np.int64)
        rng = np.random.default_rng(seed)
        hit = (rng.random(len(x)) < self.cfg.query_noise) & ~np.isin(x, self._special)
        x[hit] = rng.integers(len(tok), size=int(hit.sum()))
        return x.tolist()

    def __call__(self, step: int) -> dict:
        cfg = self.cfg
        d, epoch, j = self.schedule.lookup(int(step))
        source = self.sources[d]
        task = source.task
        k = cfg.negatives_for(task)
        # This host's rows only: what it reads and tokenizes shrinks as hosts are added.
        rows = self._rows(d, epoch, j)[self.local]
        records = [source[int(i)] for i in rows]
        negatives, valid = [], np.zeros((len(rows), k), bool)
        for r, (i, rec) in enumerate(zip(rows, records, strict=True)):
            if cfg.negatives == "random":
                chosen = self._random_negatives(source, rec, k, [cfg.seed, 4, d, epoch, int(i)])
            else:
                pool = rec["negatives"]
                rng = np.random.default_rng([cfg.seed, 3, d, epoch, int(i)])
                chosen = [pool[t] for t in rng.permutation(len(pool))[:k]] if pool else []
            negatives.append(chosen)
            valid[r, : len(chosen)] = True
        pad_id = self.tokenizer.pad_token_id or 0
        q_ids = self._tokenize([self._query_text(r) for r in records], cfg.max_query_length)
        if cfg.query_noise:
            q_ids = [
                self._noised(x, [cfg.seed, 6, d, epoch, int(i)])
                for x, i in zip(q_ids, rows, strict=True)
            ]
        p_ids = self._tokenize(
            [cfg.passage_prefix + r["positive"] for r in records], cfg.max_passage_length
        )
        flat_negs = [cfg.passage_prefix + t for negs in negatives for t in negs]
        n_flat = self._tokenize(flat_negs, cfg.max_passage_length)
        # Padded to this host's bucket; hosts then agree on the largest (`pad_lengths`).
        lq = bucket_length(q_ids, cfg.buckets("query"))
        lp = bucket_length(p_ids + n_flat, cfg.buckets("passage"))

        n = len(rows)
        q, qm = self._pad(q_ids, lq, pad_id)
        p, pm = self._pad(p_ids, lp, pad_id)
        neg = np.full((n, k, lp), pad_id, np.int32)
        negm = np.zeros((n, k, lp), np.int32)
        neg_hash = np.zeros((n, k), np.int32)
        offsets = np.cumsum([0] + [len(x) for x in negatives])
        for r in range(n):
            for t, text in enumerate(negatives[r]):
                ids = n_flat[offsets[r] + t]
                neg[r, t, : len(ids)] = ids
                negm[r, t, : len(ids)] = 1
                neg_hash[r, t] = text_hash(text)
        return {
            "query_ids": q,
            "query_mask": qm,
            "pos_ids": p,
            "pos_mask": pm,
            "neg_ids": neg,
            "neg_mask": negm,
            "neg_valid": valid,
            "pos_hash": np.array([text_hash(r["positive"]) for r in records], np.int32),
            "neg_hash": neg_hash,
            "step": np.int64(step),
            "source": np.int64(d),
            "task": task,
            "dataset": source.name,
            "pad_id": np.int32(pad_id),
            "num_tokens": np.int64(qm.sum() + pm.sum() + negm.sum()),
        }


def lengths(batch: dict) -> tuple[int, int]:
    """``(query, passage)`` padded lengths of a host-local batch."""
    return batch["query_ids"].shape[1], batch["pos_ids"].shape[1]


def pad_lengths(batch: dict, query_length: int, passage_length: int) -> dict:
    """``batch`` right-padded to the given lengths (pad id, mask 0): the lengths all hosts use.

    Each host pads its rows to its own bucket; the global batch needs one shape, the largest
    bucket of any host, which is the bucket the whole global batch would have picked.
    """
    lq, lp = lengths(batch)
    if (lq, lp) == (query_length, passage_length):
        return batch
    if query_length < lq or passage_length < lp:
        raise ValueError(f"cannot pad lengths {(lq, lp)} down to {(query_length, passage_length)}")
    out = dict(batch)
    pad_id = int(batch["pad_id"])

    def pad(x, length, value):
        width = [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]
        return np.pad(x, width, constant_values=value)

    out["query_ids"] = pad(batch["query_ids"], query_length, pad_id)
    out["query_mask"] = pad(batch["query_mask"], query_length, 0)
    if "query_pool_mask" in batch:
        out["query_pool_mask"] = pad(batch["query_pool_mask"], query_length, 0)
    for key, value in (("pos_ids", pad_id), ("pos_mask", 0), ("neg_ids", pad_id), ("neg_mask", 0)):
        out[key] = pad(batch[key], passage_length, value)
    return out


# --- sequence packing for the train step ------------------------------------------------------
# A packed tower holds its texts back to back in rows of the tower's maximum length:
# ``<tower>_ids`` and ``<tower>_seg`` (R, L) (segment ids 1, 2, ... per text, 0 = padding),
# and ``<tower>_slot``: for every text, (global row, segment - 1), where the step finds its
# pooled embedding in the (R, segments, dim) output. Absent texts (padded hard negatives)
# take no room; their slot is any valid one and ``neg_valid`` masks them in the loss.


@dataclasses.dataclass(frozen=True)
class Packing:
    """How the train step packs a host's batch: row lengths, row-count granule, segments.

    ``granule`` is the host-local row-count step: every host's tower is padded with empty
    rows to the same multiple of it (hosts agree on the count before the step), so the global
    row count divides the data-parallel size (and the GradCache chunk). Row counts of a
    tower vary from batch to batch only in granules: each count is one compiled shape.
    """

    query_length: int
    passage_length: int
    granule: int
    num_segments: int  # texts per row at most (`jaxembed.train.PACKED_SEGMENTS` or fewer)

    def _towers(self, batch: dict):
        b, k = batch["neg_valid"].shape
        yield "query", batch["query_ids"], batch["query_mask"], None, self.query_length
        yield "pos", batch["pos_ids"], batch["pos_mask"], None, self.passage_length
        if k:
            flat = (b * k, batch["neg_ids"].shape[-1])
            ids, mask = batch["neg_ids"].reshape(flat), batch["neg_mask"].reshape(flat)
            yield "neg", ids, mask, batch["neg_valid"].reshape(-1), self.passage_length

    def plan(self, batch: dict) -> dict[str, list[list[int]]]:
        """Per tower, the texts of each packed row (`jaxembed.encoder.pack_rows`)."""
        from jaxembed.encoder import pack_rows

        plans = {}
        for name, _ids, mask, present, length in self._towers(batch):
            lengths = mask.sum(-1)
            if lengths.max(initial=0) > length:
                raise ValueError(
                    f"packing: a {name} text has {lengths.max()} tokens, more than the "
                    f"row length {length}"
                )
            keep = np.arange(len(lengths)) if present is None else np.flatnonzero(present)
            rows = pack_rows(lengths[keep].tolist(), length, self.num_segments)
            plans[name] = [[int(keep[i]) for i in row] for row in rows]
        return plans

    def rows(self, needed: int) -> int:
        """Host-local rows for a tower that needs ``needed``: the next multiple of the granule."""
        return max(1, -(-needed // self.granule)) * self.granule

    def pack(self, batch: dict, plans: dict, rows: dict[str, int], offsets: dict[str, int]) -> dict:
        """``batch`` with every tower packed into ``rows[t]`` rows (this host's share).

        ``offsets[t]`` is the global index of this host's first row of tower ``t``, so that
        slots address the global (sharded) matrix of segment embeddings.
        """
        out = {k: v for k, v in batch.items() if k not in ARRAY_KEYS}
        out.update({k: batch[k] for k in ("neg_valid", "pos_hash", "neg_hash")})
        pad_id = int(batch["pad_id"])
        pool = batch.get("query_pool_mask")
        for name, ids, mask, _present, length in self._towers(batch):
            plan, n_rows = plans[name], rows[name]
            if len(plan) > n_rows:
                raise ValueError(f"packing: {name} needs {len(plan)} rows, given {n_rows}")
            packed = np.full((n_rows, length), pad_id, np.int32)
            seg = np.zeros((n_rows, length), np.int32)
            pool_seg = np.zeros((n_rows, length), np.int32) if name == "query" else None
            slot = np.zeros((len(ids), 2), np.int32)
            slot[:, 0] = offsets[name]
            lengths = mask.sum(-1)
            for r, texts in enumerate(plan):
                at = 0
                for j, i in enumerate(texts, start=1):
                    end = at + lengths[i]
                    packed[r, at:end] = ids[i, : lengths[i]]
                    seg[r, at:end] = j
                    if pool_seg is not None:
                        keep = pool[i, : lengths[i]] > 0 if pool is not None else True
                        pool_seg[r, at:end] = np.where(keep, j, 0)
                    slot[i] = offsets[name] + r, j - 1
                    at = end
            out[f"{name}_ids"], out[f"{name}_seg"] = packed, seg
            if pool_seg is not None:
                out["query_pool"] = pool_seg
            out[f"{name}_slot"] = (
                slot.reshape(*batch["neg_valid"].shape, 2) if name == "neg" else slot
            )
        return out


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


ARRAY_KEYS = (
    "query_ids",
    "query_mask",
    "pos_ids",
    "pos_mask",
    "neg_ids",
    "neg_mask",
    "neg_valid",
    "pos_hash",
    "neg_hash",
)


PACKED_KEYS = (
    "query_ids",
    "query_seg",
    "query_pool",
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
)


def is_packed(batch: dict) -> bool:
    return "query_seg" in batch


def to_global(batch: dict, mesh) -> dict:
    """Assembles global arrays from every host's local slice (the train step's input)."""
    import jax

    from jaxembed import sharding

    keys = PACKED_KEYS if is_packed(batch) else ARRAY_KEYS
    return {
        key: jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, np.ndim(batch[key])), batch[key]
        )
        for key in keys
        if key in batch
    }
