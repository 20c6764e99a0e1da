"""One mining core: the candidate pool, the queries, the rules and the selection of hard
negatives. `jaxembed.mine` (the command line, with its embedding cache) and re-mining during
training (`jaxembed.remine`) both run it, so they pick the same negatives for the same
model, data and rules.

Per record (the score is the cosine of unit vectors):

1. Rank the pool (`candidate_pool`: the corpus deduplicated by text, then every positive
   not in it) for the query and drop every candidate whose text key equals that of any
   positive of the query (records the model reads the same query for are one query
   with all their positives: `group_queries`); keep the best ``top_k`` of the rest (ties:
   lower pool index first; `search.nearest_non_positives`).
2. Drop the first ``skip_top`` of those (likely unlabelled positives).
3. Drop candidates with ``score >= max_score`` (an absolute cap; None disables).
4. Drop candidates with ``score >= pos - relative_margin * |pos|``, ``pos`` being this
   record's positive score: for ``pos >= 0`` that keeps ``score < (1 - margin) * pos``
   (0.05 is NV-Retriever's TopK-PercPos at 95%), and it stays below the positive when
   ``pos < 0``. None disables it.
5. Take ``num_negatives`` of the survivors: ``top`` the best, ``random`` a sample seeded
   by ``(seed, query, positive)`` (reproducible). Negatives are written best first.

`Rules` holds these settings and their defaults (F2LLM's: top 100, skip 5, cap 0.8, 95% of
the positive, 24 negatives), written once: the command line's flags, the config's ``mine``
group and re-mining take them from here.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxembed.beir import EvalDataError, corpus_text
from jaxembed.packing import text_hash
from jaxembed.search import own

SAMPLING = ("top", "random")
TOO_FEW = ("keep", "drop")


class MiningError(ValueError):
    """Bad mining input or settings; the message names what is wrong."""


def _rule(default, help: str, **meta):
    """A field of `Rules`: its default and help, which the command line's flags and the
    config's ``mine`` group both read (with ``choices``, and ``none_ok``: None disables)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class Rules:
    """The selection rules (the module docstring's steps 1-5) and their defaults."""

    top_k: int = _rule(100, "candidates retrieved per query")
    skip_top: int = _rule(5, "best candidates skipped (likely unlabelled positives)")
    max_score: float | None = _rule(0.8, "candidates scoring at or above it dropped", none_ok=True)
    relative_margin: float | None = _rule(
        0.05,
        "candidates scoring at or above (1 - margin) x the positive's score dropped (0.05: "
        "NV-Retriever's 95 percent rule)",
        none_ok=True,
    )
    num_negatives: int = _rule(24, "negatives kept per record")
    sampling: str = _rule(
        "top",
        "top: the best survivors; random: a sample seeded by the seed, query and positive",
        choices=SAMPLING,
    )
    too_few: str = _rule(
        "keep",
        "records left with fewer than num_negatives: keep them with fewer, or drop them "
        "(counted in the stats either way)",
        choices=TOO_FEW,
    )
    seed: int = _rule(0, "seeds sampling=random")

    def __post_init__(self):
        if self.top_k < 1 or self.skip_top < 0 or self.num_negatives < 1:
            raise MiningError(
                f"need top_k >= 1, skip_top >= 0, num_negatives >= 1; got top_k={self.top_k}, "
                f"skip_top={self.skip_top}, num_negatives={self.num_negatives}"
            )
        if self.skip_top + self.num_negatives > self.top_k:
            raise MiningError(
                f"top_k={self.top_k} leaves only {self.top_k - self.skip_top} candidates after "
                f"skip_top={self.skip_top}, fewer than num_negatives={self.num_negatives}; "
                "raise top_k"
            )
        if self.sampling not in SAMPLING:
            raise MiningError(f"sampling={self.sampling!r}; choose one of {list(SAMPLING)}")
        if self.too_few not in TOO_FEW:
            raise MiningError(f"too_few={self.too_few!r}; choose one of {list(TOO_FEW)}")
        for name in ("max_score", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(float(value)):
                raise MiningError(f"{name}={value} must be a finite number (or None to disable)")
            object.__setattr__(self, name, None if value is None else float(value))

    def select(self, scores, valid, positive_score: float, record: dict):
        """Steps 2-5 for one record: ``(taken ranks, (skipped, capped, too-close masks))``.

        ``scores`` are the record's non-positive candidates best first, ``valid`` marks the
        real ones; the taken ranks come back in increasing order; the masks say why each
        candidate was dropped (the stats). Random sampling is seeded by the record's texts,
        so reruns agree.
        """
        ranks = np.arange(len(scores))
        none = np.zeros(len(scores), bool)
        drop_skip = valid & (ranks < self.skip_top)
        rest = valid & ~drop_skip
        drop_max = rest & (scores >= self.max_score) if self.max_score is not None else none
        rest &= ~drop_max
        drop_margin = none
        if self.relative_margin is not None:
            # pos - margin * |pos| is (1 - margin) * pos for pos >= 0 and stays below pos else.
            threshold = positive_score - self.relative_margin * abs(positive_score)
            drop_margin = rest & (scores >= threshold)
        rest &= ~drop_margin
        survivors = np.flatnonzero(rest)
        if self.sampling == "top" or len(survivors) <= self.num_negatives:
            take = survivors[: self.num_negatives]
        else:
            seed = [self.seed, text_hash(record["query"]), text_hash(record["positive"])]
            rng = np.random.default_rng(seed)
            take = np.sort(rng.choice(survivors, size=self.num_negatives, replace=False))
        return take, (drop_skip, drop_max, drop_margin)


# --- the pool and the queries ------------------------------------------------------------------


def check_scores(rules: Rules, scored_by: str, model, flag: str = "max_score") -> None:
    """``max_score``, a cosine threshold, for a model scored otherwise (`retrieval.
    scored_by`: a sparse model's dot products, a multi-vector model's MaxSim): one line."""
    if scored_by != "cosine" and rules.max_score is not None:
        kind = "sparse" if scored_by == "dot product" else "multi-vector"
        raise MiningError(
            f"{flag}={rules.max_score} is a cosine threshold, but {model} is a {kind} model "
            f"scored by {scored_by}: set {flag} to none (relative_margin, relative to each "
            "positive's score, applies as it is)"
        )


def text_key(text: str) -> int:
    """A 63-bit hash of a text: how the pool tells texts apart (duplicates, and a query's
    positives among its candidates) without holding them. Any collision among 10^7 texts
    has odds of about 5e-6."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass
class Candidates:
    """The candidate pool: the corpus deduplicated by text (`text_key`), then every positive
    not in it, so every positive has an embedding (the relative margin needs its score) and
    the positives of other queries are candidates too (as in sentence-transformers)."""

    texts: Sequence[str]  # the corpus (first occurrences, in order), then new positives
    n_corpus: int  # how many of them come from the corpus
    duplicates: int  # corpus texts dropped as duplicates
    positive: np.ndarray  # per record, its positive's index in ``texts``
    hashes: np.ndarray  # `text_key` of each text: how positives are told from negatives


class PoolTexts(Sequence):
    """The pool's texts without copying them: rows ``rows`` of ``corpus`` (a list, or a
    `CorpusFile` that reads each from disk), then ``extra``."""

    def __init__(self, corpus: Sequence[str], rows: np.ndarray, extra: list[str]):
        self.corpus, self.rows, self.extra = corpus, rows, extra

    def __len__(self) -> int:
        return len(self.rows) + len(self.extra)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        return (
            self.corpus[int(self.rows[i])] if i < len(self.rows) else self.extra[i - len(self.rows)]
        )


def candidate_pool(corpus: Sequence[str] | None, records: Sequence[dict]) -> Candidates:
    """The pool of ``corpus`` (None: the records' distinct positives) and ``records``.

    Memory: a few int64 per corpus document (its key, its row), never a copy of its text.
    """
    corpus = corpus if corpus is not None else []
    if isinstance(corpus, CorpusFile):
        keys = corpus.keys
    else:
        keys = np.fromiter((text_key(t) for t in corpus), np.int64, len(corpus))
    uniq, first = np.unique(keys, return_index=True)
    rows = np.sort(first)  # each text's first occurrence, in corpus order
    pool_of_uniq = np.searchsorted(rows, first)
    new: dict[int, int] = {}  # positives not in the corpus: key -> pool index
    extra: list[str] = []
    positive = np.empty(len(records), np.int64)
    for n, r in enumerate(records):
        k = text_key(r["positive"])
        j = int(np.searchsorted(uniq, k))
        if j < len(uniq) and uniq[j] == k:
            positive[n] = pool_of_uniq[j]
            continue
        if k not in new:
            new[k] = len(rows) + len(extra)
            extra.append(r["positive"])
        positive[n] = new[k]
    if not len(rows) and not extra:
        raise MiningError("the corpus is empty and there are no positives")
    return Candidates(
        texts=PoolTexts(corpus, rows, extra),
        n_corpus=len(rows),
        duplicates=len(corpus) - len(rows),
        positive=positive,
        hashes=np.concatenate([keys[rows], np.fromiter(new, np.int64, len(new))]),
    )


@dataclasses.dataclass
class Queries:
    """The distinct queries the model reads, and which records and positives are theirs."""

    texts: list[str]  # one per distinct (prompt, text) the model reads
    prompts: list[str]
    of_record: np.ndarray  # per record, its query's index
    positive_hashes: np.ndarray  # (queries, most positives) each query's, -1 padded


def group_queries(
    records: Sequence[dict], pool: Candidates, read: Callable[[dict], tuple[str, str]]
) -> Queries:
    """Records the model reads the same query for (``read(record) -> (prompt, text)``) are
    one query with several positives: encoded and searched once, and none of its positives
    is a negative of any of its records."""
    group_of: dict[tuple[str, str], int] = {}
    of_record = np.empty(len(records), np.int64)
    for n, r in enumerate(records):
        of_record[n] = group_of.setdefault(read(r), len(group_of))
    positives: list[list[int]] = [[] for _ in group_of]
    for n, g in enumerate(of_record):
        if pool.positive[n] not in positives[g]:
            positives[g].append(int(pool.positive[n]))
    pos_hash = np.full((len(group_of), max(map(len, positives), default=1)), -1, np.int64)
    for g, p in enumerate(positives):
        pos_hash[g, : len(p)] = pool.hashes[p]  # -1 (padding) never equals a text_hash
    return Queries([t for _, t in group_of], [p for p, _ in group_of], of_record, pos_hash)


def positive_scores(query_rows, pool_rows, queries: Queries, pool: Candidates, chunk: int):
    """Each record's query-positive score (the relative margin's reference), gathered
    ``chunk`` records at a time: ``query_rows(idx)`` / ``pool_rows(idx)`` return the
    embeddings of those query / pool indices."""
    n = len(pool.positive)
    out = np.empty(n, np.float32)
    for lo in range(0, n, chunk):
        sl = slice(lo, lo + chunk)
        q, d = query_rows(queries.of_record[sl]), pool_rows(pool.positive[sl])
        out[sl] = np.asarray(own(q, d[:, None]))[:, 0]
    return out


class Choice(NamedTuple):
    """One record's selection: its query, the candidates and what the rules took."""

    query: int  # its query's index
    negatives: np.ndarray  # the taken candidates' pool indices, best first
    scores: np.ndarray  # their scores
    ranks: np.ndarray  # their ranks among the query's candidates
    drops: tuple  # (skipped, capped, too-close) masks over the candidates
    candidates: np.ndarray  # the query's candidates' scores, best first
    valid: np.ndarray  # which of them are real
    positive_score: float


def choose(records, queries: Queries, candidates, pos_score, rules: Rules) -> Iterator[Choice]:
    """Steps 2-5 for every record, from each query's ``candidates``
    (`search.nearest_non_positives`: scores and pool indices, best first)."""
    cand_s, cand_i = candidates
    for n, r in enumerate(records):
        g = int(queries.of_record[n])
        s, i = cand_s[g], cand_i[g]
        valid = i >= 0
        take, drops = rules.select(s, valid, float(pos_score[n]), r)
        yield Choice(g, i[take], s[take], take, drops, s, valid, float(pos_score[n]))


# --- corpora ---------------------------------------------------------------------------------


def read_corpus(path: str | os.PathLike) -> tuple[list[str], int]:
    """``(texts, skipped)`` of a corpus file, in memory; empty documents are skipped and
    counted. The formats are `CorpusFile`'s."""
    docs = CorpusFile(path, in_memory=True)  # one read: the texts kept as they are indexed
    return list(docs), docs.skipped


class CorpusFile(Sequence):
    """The documents of a corpus file, each read from disk when asked for: the host holds
    two int64 per document (its byte offset and `text_key`), not its text.

    ``.jsonl`` / ``.jsonl.gz``: one object per line with ``text`` (and optionally ``title``
    and ``_id``; a title is joined as `beir.corpus_text` does). Anything else: plain text,
    one document per line. Empty documents are skipped and counted (``skipped``). A ``.gz``
    file cannot be read at an offset: its texts are held in memory (as ``in_memory`` asks).
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise EvalDataError(f"{self.path}: corpus file not found")
        self.jsonl = self.path.name.endswith((".jsonl", ".jsonl.gz"))
        self.skipped, self._texts, self._file = 0, None, None
        offsets, keys = [], []
        if in_memory or self.path.name.endswith(".gz"):
            self._texts = []
        for offset, line_no, line in self._lines():
            text = self._parse(line, line_no)
            if text is None:
                continue
            if not text.strip():
                self.skipped += 1
                continue
            offsets.append(offset)
            keys.append(text_key(text))
            if self._texts is not None:
                self._texts.append(text)
        if not keys:
            raise EvalDataError(f"{self.path}: the corpus is empty (no non-empty document)")
        self.offsets = np.array(offsets, np.int64)
        self.keys = np.array(keys, np.int64)
        self._stat = self._signature(os.stat(self.path))

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        """``(byte offset, line number, line)`` of every line."""
        opener = gzip.open if self.path.name.endswith(".gz") else open
        with opener(self.path, "rb") as f:
            offset = 0
            for line_no, line in enumerate(f, 1):
                yield offset, line_no, line
                offset += len(line)

    def _parse(self, line: bytes, line_no: int) -> str | None:
        """The document a line holds (None: a blank JSONL line, not a document)."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalDataError(f"{self.path}:{line_no}: not UTF-8 ({e.reason})") from None
        if not self.jsonl:
            return text.rstrip("\n").rstrip("\r")
        if not text.strip():
            return None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{self.path}:{line_no}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise EvalDataError(f"{self.path}:{line_no}: expected an object with a 'text' string")
        return corpus_text(row)

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, int]:
        return st.st_size, st.st_mtime_ns

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._texts is not None:
            return self._texts[i]
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (open while the corpus is used)
        # A corpus rewritten since it was indexed would hand out other documents' texts.
        if self._signature(os.fstat(self._file.fileno())) != self._stat:
            raise EvalDataError(f"{self.path}: changed while in use; mine again")
        self._file.seek(int(self.offsets[i]))
        return self._parse(self._file.readline(), -1)

    def __iter__(self) -> Iterator[str]:
        """In order, read sequentially (no seek per document)."""
        if self._texts is not None:
            yield from self._texts
            return
        k = 0
        for offset, line_no, line in self._lines():
            if k < len(self.offsets) and offset == self.offsets[k]:
                k += 1
                yield self._parse(line, line_no)
        if k != len(self.offsets):
            raise EvalDataError(f"{self.path}: changed while in use; mine again")

    def __getstate__(self):
        return {**self.__dict__, "_file": None}
