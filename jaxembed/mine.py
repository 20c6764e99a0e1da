"""Hard-negative mining with a teacher model on the device mesh.

::

    python -m jaxembed.mine --model MODEL --input PAIRS --out OUT [--corpus CORPUS]

The teacher (an HF / sentence-transformers folder or a jaxembed training checkpoint, any
``jaxembed.load`` path) encodes the corpus and the queries data-parallel over all local
devices, exact search finds each query's nearest passages, and the F2LLM / NV-Retriever
rules turn them into hard negatives. The output is training data (`jaxembed.data.readers`
reads it back) plus ``OUT.stats.json``.

Inputs
------
* **Training-format pairs** (``--input`` a JSONL / JSONL.gz / Parquet file or a TFDS
  directory, see `jaxembed.data.readers`): ``query``, ``positive`` and optionally
  ``instruction``, ``task`` (default ``retrieval``), ``dataset`` (default: the file
  name). Existing ``negatives`` are replaced. Records with the same query (the text the
  model reads: instruction template applied) are *one query with several positives*: each
  of them is excluded as a negative for all of them. There is one output record per input
  record. The corpus is ``--corpus`` (JSONL ``{"_id", "text"[, "title"]}`` or
  ``{"text"}`` rows, or a plain text file with one document per line), or without it the
  distinct positives (F2LLM).
* **A BEIR folder** (``corpus.jsonl``, ``queries.jsonl``, ``qrels/SPLIT.tsv``, default
  split ``train``): positives are the judged corpus ids with grade > 0 (one output record
  per such pair, task ``retrieval``, dataset the folder name); ids judged <= 0 stay
  candidates. The folder's own corpus is the corpus. A qrels id missing from the corpus is
  an error naming the id and the file.

The candidate pool is the corpus, deduplicated by exact text, plus every positive not in
it (as in sentence-transformers' ``mine_hard_negatives``), so each positive has an
embedding and the positives of other queries are candidates too.

Text the model reads: queries of records with an ``instruction`` become
``instruction_template.format(instruction=..., query=...)`` (training's
``PipelineConfig.instruction_template``) with no model prompt; other queries get the
query prompt (``--query-prefix`` text, else the model's ``--query-prompt`` name, else its
``query`` prompt if defined). Passages get ``--passage-prefix``, else the model's
``--passage-prompt``, else its ``document`` / ``passage`` / ``corpus`` prompt, if any.

Selection, per record (the score is the cosine of unit vectors)
---------------------------------------------------------------
1. Rank the pool by score for the query and drop every candidate whose `text_hash`
   equals that of any positive of the query; keep the best ``top_k`` of the rest
   (ties: lower pool index first; the pool holds the corpus in file order, then new
   positives in input order).
2. Drop the first ``skip_top`` of those (likely unlabelled positives).
3. Drop candidates with ``score >= max_score`` (absolute cap; ``None`` disables).
4. Drop candidates with ``score >= pos - relative_margin * |pos|``, ``pos`` being this
   record's positive score: for ``pos >= 0`` that keeps ``score < (1 - margin) * pos``
   (0.05 is NV-Retriever's TopK-PercPos at 95%), and it stays below the positive when
   ``pos < 0``. ``None`` disables it.
5. Take ``num_negatives`` of the survivors: ``top`` the best, ``random`` a sample seeded
   by ``(seed, query, positive)`` (reproducible). Negatives are written best first.

A record left with fewer than ``num_negatives`` is written with what it has
(``too_few="keep"``) or dropped (``"drop"``); both are counted. Defaults are F2LLM's:
top 100, skip 5, cap 0.8, 95% of the positive, 24 negatives.

Scale
-----
Embeddings go to ``--cache`` (default ``OUT.cache/``) in shards of ``shard_size`` rows,
each written atomically, under a manifest keyed by the model (path and a fingerprint of
its files), prompts, max length, dtype and a hash of the texts: an interrupted run
re-encodes only the missing shards, and a changed input or model invalidates the cache
(logged). Search reads the shards memory-mapped, runs `evaluate.top_k` (blocked matrix
products with a running top-k) against each, and merges the per-shard results with the
same tie rule, so neither host nor device memory has to hold the corpus embeddings. The
pool's texts, and ``top_k`` scores and indices per query, stay in host memory.

Multi-host (run the same command on every host, see ``launch/``): encoding is split over
every device of every host, and every process receives all embeddings; process 0 alone
writes the cache (which must be on storage all hosts share), the output and the stats.
The search itself still runs whole on every host.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxembed import distributed
from jaxembed.data.pipeline import PipelineConfig, text_hash
from jaxembed.data.records import RecordError, check_record

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = PipelineConfig.__dataclass_fields__["instruction_template"].default
SAMPLING = ("top", "random")
TOO_FEW = ("keep", "drop")
CACHE_VERSION = 1
# Score histograms in the stats file: 200 bins over the cosine range.
HIST_EDGES = np.linspace(-1.0, 1.0, 201)
DROP_REASONS = ("skip_top", "max_score", "relative_margin", "not_sampled")


class MiningError(ValueError):
    """Bad input, model or settings; the message names the file, id or option."""


class MiningInterrupted(RuntimeError):
    """Raised by the ``stop_after_shards`` test hook after that many shards were encoded."""


# ------------------------------------------------------------------------------------------
# Search: running top-k over embedding shards


def merge_top_k(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merges two ``(scores, global indices)`` candidate lists per row into the best ``k``.

    Ties rank the lower index first; index -1 marks an empty slot (score -inf).
    """
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, i], axis=1)
    # lexsort: the last key is primary. Empty slots (-inf) sort after every real score.
    order = np.lexsort((cand_i, -cand_s), axis=-1)[:, :k]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def search_shards(
    queries: np.ndarray,
    shards: Sequence[np.ndarray],
    k: int,
    *,
    block: int = 16384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` over the concatenation of ``shards`` (e.g. memory-maps).

    Each shard is searched with `jaxembed.evaluate.top_k` and merged into a running top-k,
    so only one shard is in memory at a time. Returns ``(scores, indices)`` of shape
    ``(len(queries), k)``, indices global; when the shards hold fewer than ``k`` rows the
    rest is filled with score -inf and index -1. Ties: lower index first.
    """
    from jaxembed import evaluate

    queries = np.asarray(queries, np.float32)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for shard in shards:
        if len(shard) and len(queries) and k:
            s, i = evaluate.top_k(queries, np.asarray(shard), k, block, query_block)
            best_s, best_i = merge_top_k(best_s, best_i, s, i + offset, k)
        offset += len(shard)
    return best_s, best_i


def nearest_non_positives(
    q_shards: Sequence[np.ndarray],
    d_shards: Sequence[np.ndarray],
    pool_hash: np.ndarray,
    pos_hash: np.ndarray,
    top_k: int,
    *,
    block: int = 16384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best ``top_k`` candidates that are none of its positives (step 1).

    Args:
      q_shards, d_shards: query and pool embeddings, in shards of equal size (but the last).
      pool_hash: `text_hash` of every pool text.
      pos_hash: ``(queries, max positives)`` hashes of each query's positives, -1 padded.
      top_k, block, query_block: as for `mine`.

    Returns:
      ``(scores, pool indices)``, ``(queries, top_k)``, best first; -inf and -1 where the
      pool has fewer candidates.
    """
    n_q, max_pos = pos_hash.shape
    # A query's positives are at most max_pos of the ranks: top_k + max_pos covers them.
    k_search = top_k + max_pos
    cand_s = np.full((n_q, top_k), -np.inf, np.float32)
    cand_i = np.full((n_q, top_k), -1, np.int64)
    lo = 0
    for q_shard in q_shards:
        hi = lo + len(q_shard)
        s, i = search_shards(
            np.asarray(q_shard), d_shards, k_search, block=block, query_block=query_block
        )
        h = np.where(i >= 0, pool_hash[np.maximum(i, 0)], -2)
        excluded = i < 0
        for j in range(max_pos):
            excluded |= h == pos_hash[lo:hi, j : j + 1]
        # A stable sort on the flag moves the kept candidates forward in rank order.
        order = np.argsort(excluded, axis=1, kind="stable")[:, :top_k]
        keep = ~np.take_along_axis(excluded, order, 1)
        cand_s[lo:hi] = np.where(keep, np.take_along_axis(s, order, 1), -np.inf)
        cand_i[lo:hi] = np.where(keep, np.take_along_axis(i, order, 1), -1)
        lo = hi
    return cand_s, cand_i


def select(
    scores: np.ndarray,
    valid: np.ndarray,
    positive_score: float,
    *,
    skip_top: int,
    max_score: float | None,
    relative_margin: float | None,
    num_negatives: int,
    sampling: str,
    rng_seed: Sequence[int],
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Steps 2-5 for one record: ``(taken ranks, (skipped, capped, too-close masks))``.

    ``scores`` are the record's non-positive candidates best first (`nearest_non_positives`),
    ``valid`` marks the real ones; the taken ranks come back in increasing order.
    """
    ranks = np.arange(len(scores))
    none = np.zeros(len(scores), bool)
    drop_skip = valid & (ranks < skip_top)
    rest = valid & ~drop_skip
    drop_max = rest & (scores >= max_score) if max_score is not None else none
    rest &= ~drop_max
    if relative_margin is not None:
        # pos - margin * |pos| is (1 - margin) * pos for pos >= 0 and stays below pos else.
        threshold = positive_score - relative_margin * abs(positive_score)
        drop_margin = rest & (scores >= threshold)
    else:
        drop_margin = none
    rest &= ~drop_margin
    survivors = np.flatnonzero(rest)
    if sampling == "top" or len(survivors) <= num_negatives:
        take = survivors[:num_negatives]
    else:
        rng = np.random.default_rng(list(rng_seed))
        take = np.sort(rng.choice(survivors, size=num_negatives, replace=False))
    return take, (drop_skip, drop_max, drop_margin)


# ------------------------------------------------------------------------------------------
# Embedding cache: fixed-size shards, written atomically, under a manifest


def _sha256_texts(texts: Sequence[str], prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p, t in zip(prompts, texts, strict=True):
        for s in (p, t):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def model_fingerprint(path: str | os.PathLike) -> str:
    """A hash of the names, sizes and modification times of the files under ``path``.

    It changes when the weights are rewritten or a training run saves a newer checkpoint,
    so a cache written for other weights at the same path is not reused.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write) -> None:
    """Writes via ``write(file)`` to a unique temporary file beside ``path``, then renames."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Budget:
    """Counts shards encoded in this run; raises once ``limit`` is reached (test hook)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.done = 0

    def tick(self) -> None:
        self.done += 1
        if self.limit is not None and self.done >= self.limit:
            raise MiningInterrupted(f"stopped after encoding {self.done} shard(s) (test hook)")


def encode_cached(
    encoder,
    texts: Sequence[str],
    prompts: Sequence[str],
    folder: Path,
    key: dict,
    *,
    shard_size: int,
    batch_size: int,
    desc: str,
    progress: bool = True,
    budget: _Budget | None = None,
) -> tuple[list[np.ndarray], dict]:
    """Embeddings of ``texts`` (each read with its prompt) as shards cached in ``folder``.

    Returns ``(shards, info)``: memory-mapped ``(rows, dim)`` float32 arrays in order, and
    ``{"shards", "encoded", "reused", "encoded_rows", "seconds"}``. A manifest holding
    ``key`` plus the texts' hash guards the folder: when it differs, the old shards are
    deleted (and a log line says what changed); otherwise shards already on disk are used
    as they are and only the missing ones are encoded.
    """
    from tqdm import tqdm  # installed with transformers

    n = len(texts)
    dim = int(encoder.dim)
    manifest = {
        "version": CACHE_VERSION,
        **key,
        "texts_sha256": _sha256_texts(texts, prompts),
        "count": n,
        "shard_size": int(shard_size),
        "dim": dim,
    }
    # Multi-host: every process encodes (batches split over all hosts' devices); process 0
    # alone writes the cache, which must be on storage all hosts share.
    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    distributed.barrier("mine cache folder")
    distributed.check_shared_dir(folder)
    mpath = folder / "manifest.json"
    old = None
    if writer and mpath.exists():
        try:
            old = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
    if writer and old != manifest:
        if old is not None:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            log.info("cache %s is stale (changed: %s): re-encoding", folder, ", ".join(changed))
        for f in folder.glob("shard_*.npy"):
            f.unlink()
        text = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        _atomic_write_bytes(mpath, lambda f: f.write(text))

    n_shards = -(-n // shard_size)
    paths = [folder / f"shard_{s:06d}.npy" for s in range(n_shards)]

    def cached(s: int) -> np.ndarray | None:
        if not paths[s].exists():
            return None
        try:
            arr = np.load(paths[s], mmap_mode="r")
        except (OSError, ValueError):
            return None
        rows = min(shard_size, n - s * shard_size)
        return arr if arr.shape == (rows, dim) and arr.dtype == np.float32 else None

    distributed.barrier("mine cache manifest")
    present = [cached(s) for s in range(n_shards)]
    # A shard counts as cached only if every host can read it: all encode the same rest.
    readable = distributed.gather(np.array([a is not None for a in present], bool)).all(0)
    present = [a if ok else None for a, ok in zip(present, readable, strict=True)]
    reused = sum(a is not None for a in present)
    if reused:
        log.info("cache %s: %d of %d %s shard(s) already encoded", folder, reused, n_shards, desc)
    todo_rows = sum(min(shard_size, n - s * shard_size) for s, a in enumerate(present) if a is None)
    # Sub-batches inside a shard keep the progress bar moving; the encoder sorts texts by
    # length within each call, so calls of a few thousand texts waste little padding.
    chunk = max(batch_size * 32, 1024)
    seconds = 0.0
    encoded = 0
    with tqdm(
        total=todo_rows,
        desc=f"encode {desc}",
        unit="doc" if desc == "corpus" else "query",
        file=sys.stderr,
        disable=not progress or todo_rows == 0 or not writer,
        mininterval=1.0,
    ) as bar:
        for s in range(n_shards):
            if present[s] is not None:
                continue
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            out = np.empty((hi - lo, dim), np.float32)
            t0 = time.perf_counter()
            for c in range(lo, hi, chunk):
                c_hi = min(hi, c + chunk)
                # Group by prompt: the encoder skips prompt tokens when pooling per call.
                by_prompt: dict[str, list[int]] = {}
                for j in range(c, c_hi):
                    by_prompt.setdefault(prompts[j], []).append(j)
                for prompt, rows in by_prompt.items():
                    emb = encoder.encode(
                        [texts[j] for j in rows], batch_size=batch_size, prompt=prompt
                    )
                    out[np.asarray(rows) - lo] = emb
                bar.update(c_hi - c)
            seconds += time.perf_counter() - t0
            if not np.isfinite(out).all():
                bad = lo + int(np.flatnonzero(~np.isfinite(out).all(1))[0])
                raise FloatingPointError(f"encoding the {desc}: non-finite embedding (row {bad})")
            if writer:
                _atomic_write_bytes(paths[s], lambda f, out=out: np.save(f, out))
                present[s] = np.load(paths[s], mmap_mode="r")
            else:
                present[s] = out
            encoded += 1
            if budget is not None:
                budget.tick()
    info = {
        "shards": n_shards,
        "encoded": encoded,
        "reused": reused,
        "encoded_rows": todo_rows,
        "seconds": seconds,
    }
    return present, info


def _gather(shards: Sequence[np.ndarray], shard_size: int, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (global) of the concatenated shards."""
    idx = np.asarray(idx, np.int64)
    dim = shards[0].shape[1] if shards else 0
    out = np.empty((len(idx), dim), np.float32)
    for s in np.unique(idx // shard_size):
        sel = np.flatnonzero(idx // shard_size == s)
        out[sel] = shards[int(s)][idx[sel] - int(s) * shard_size]
    return out


# ------------------------------------------------------------------------------------------
# Inputs


def read_corpus(path: str | os.PathLike) -> tuple[list[str], int]:
    """``(texts, skipped)`` of a corpus file; empty documents are skipped and counted.

    ``.jsonl`` / ``.jsonl.gz``: one object per line with ``text`` (and optionally ``title``
    and ``_id``; a title is joined as `evaluate.corpus_text` does). Anything else: plain
    text, one document per line.
    """
    from jaxembed import evaluate

    path = Path(path)
    if not path.is_file():
        raise MiningError(f"{path}: corpus file not found")
    texts: list[str] = []
    skipped = 0
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MiningError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise MiningError(f"{path}:{line_no}: expected an object with a 'text' string")
                text = evaluate.corpus_text(row)
                if text:
                    texts.append(text)
                else:
                    skipped += 1
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = line.rstrip("\n").rstrip("\r")
                if text.strip():
                    texts.append(text)
                else:
                    skipped += 1
    if not texts:
        raise MiningError(f"{path}: the corpus is empty (no non-empty document)")
    return texts, skipped


def is_beir_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a BEIR folder (``queries.jsonl`` and ``qrels/``)."""
    path = Path(path)
    return path.is_dir() and (path / "queries.jsonl").exists() and (path / "qrels").is_dir()


@dataclasses.dataclass
class _Inputs:
    records: list[dict]  # query, positive, task, dataset[, instruction]
    corpus: list[str] | None  # corpus texts (None: the positives are the corpus)
    corpus_skipped: int = 0


def _read_inputs(
    input: str | os.PathLike,
    corpus: str | os.PathLike | None,
    split: str,
    task: str,
    dataset: str | None,
) -> _Inputs:
    from jaxembed import evaluate
    from jaxembed.data import readers

    input = Path(input)
    if is_beir_folder(input):
        if corpus is not None:
            raise MiningError(
                f"{input}: a BEIR folder brings its own corpus.jsonl; --corpus cannot be given"
            )
        try:
            docs, queries, qrels = evaluate.load_beir(input, split)
        except evaluate.EvalDataError as e:
            raise MiningError(str(e)) from None
        qrels_file = input / "qrels" / f"{split}.tsv"
        records = []
        for qid, rels in qrels.items():
            for did, grade in rels.items():
                if grade <= 0:
                    continue
                rec = {
                    "query": queries[qid],
                    "positive": docs[did],
                    "task": "retrieval",
                    "dataset": dataset or input.name,
                }
                try:
                    records.append(check_record(rec, f"{qrels_file}: query {qid!r}, doc {did!r}"))
                except RecordError as e:
                    raise MiningError(str(e)) from None
        if not records:
            raise MiningError(f"{qrels_file}: no judgment with grade > 0: nothing to mine")
        # Corpus order is the file's order (ties in search go to the lower pool index).
        return _Inputs(records, list(docs.values()))
    try:
        src = readers.open_source(input, task=task, dataset=dataset or input.name.split(".", 1)[0])
    except (RecordError, FileNotFoundError, ValueError) as e:
        raise MiningError(str(e)) from None
    records = [src[i] for i in range(len(src))]
    if not records:
        raise MiningError(f"{input}: no records")
    if corpus is None:
        return _Inputs(records, None)
    texts, skipped = read_corpus(corpus)
    return _Inputs(records, texts, skipped)


# ------------------------------------------------------------------------------------------
# Stats


class _Dist:
    """Count, mean, min, max and a fixed histogram of a stream of scores."""

    def __init__(self):
        self.count = 0
        self.total = 0.0
        self.min = np.inf
        self.max = -np.inf
        self.hist = np.zeros(len(HIST_EDGES) - 1, np.int64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).ravel()
        if not len(x):
            return
        self.count += len(x)
        self.total += float(x.sum())
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.hist += np.histogram(np.clip(x, -1.0, 1.0), HIST_EDGES)[0]

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0}
        cdf = np.cumsum(self.hist) / self.count
        centers = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2

        def q(p: float) -> float:
            return round(float(centers[np.searchsorted(cdf, p)]), 3)

        return {
            "count": self.count,
            "mean": self.total / self.count,
            "min": self.min,
            "max": self.max,
            # Quantiles from the histogram: +-0.005.
            **{f"p{int(p * 100):02d}": q(p) for p in (0.05, 0.25, 0.5, 0.75, 0.95)},
            "histogram": {
                "range": [-1.0, 1.0],
                "bins": len(self.hist),
                "counts": self.hist.tolist(),
            },
        }


class _Dists:
    """Buffers per-record score arrays and folds them into `_Dist`s in bulk."""

    def __init__(self, names: Sequence[str]):
        self.d = {n: _Dist() for n in names}
        self.buf: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.size = 0

    def add(self, name: str, x: np.ndarray) -> None:
        self.buf[name].append(x)
        self.size += len(x)
        if self.size > 1 << 20:
            self.flush()

    def flush(self) -> None:
        for n, xs in self.buf.items():
            if xs:
                self.d[n].add(np.concatenate(xs))
            self.buf[n] = []
        self.size = 0


# ------------------------------------------------------------------------------------------
# Output


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(f):
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))

    _atomic_write_bytes(path, write)


def _write_parquet(path: Path, rows: list[dict], with_scores: bool) -> None:
    """F2LLM's layout: query, passage, negative_1..N (null past a row's own), then extras."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = max((len(r["negatives"]) for r in rows), default=0)
    cols: dict[str, list] = {
        "query": [r["query"] for r in rows],
        "passage": [r["positive"] for r in rows],
    }
    for j in range(width):
        cols[f"negative_{j + 1}"] = [
            r["negatives"][j] if j < len(r["negatives"]) else None for r in rows
        ]
    cols["task"] = [r["task"] for r in rows]
    cols["dataset"] = [r["dataset"] for r in rows]
    if any("instruction" in r for r in rows):
        cols["instruction"] = [r.get("instruction") for r in rows]
    if with_scores:
        cols["positive_score"] = [r["positive_score"] for r in rows]
        cols["negative_scores"] = [r["negative_scores"] for r in rows]
    schema = pa.schema(
        [
            (k, pa.list_(pa.float32()) if k == "negative_scores" else
             pa.float32() if k == "positive_score" else pa.string())
            for k in cols
        ]
    )  # fmt: skip
    table = pa.table(cols, schema=schema)
    _atomic_write_bytes(path, lambda f: pq.write_table(table, f))


# ------------------------------------------------------------------------------------------
# Mining


def _opt_float(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not np.isfinite(value):
        raise MiningError(f"{name}={value} must be a finite number (or None to disable)")
    return value


def mine(
    model,
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    corpus: str | os.PathLike | None = None,
    split: str = "train",
    top_k: int = 100,
    skip_top: int = 5,
    max_score: float | None = 0.8,
    relative_margin: float | None = 0.05,
    num_negatives: int = 24,
    sampling: str = "top",
    too_few: str = "keep",
    seed: int = 0,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    instruction_template: str = DEFAULT_TEMPLATE,
    task: str = "retrieval",
    dataset: str | None = None,
    with_scores: bool = False,
    overwrite: bool = False,
    batch_size: int = 64,
    dtype: str = "float32",
    max_length: int | None = None,
    packing: bool = False,
    cache: str | os.PathLike | None = None,
    shard_size: int = 16384,
    block: int = 16384,
    query_block: int = 1024,
    mesh=None,
    devices: Sequence | None = None,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict:
    """Mines hard negatives for ``input`` and writes them to ``out``; returns the stats.

    The rules, inputs and cache are described in the module docstring.

    Args:
      model: a model path (HF / sentence-transformers folder or training checkpoint), or an
        already loaded `jaxembed.Encoder`.
      input: training-format pairs (JSONL, JSONL.gz, Parquet, TFDS dir) or a BEIR folder.
      out: the output file: ``*.parquet`` (F2LLM layout), else JSONL. The stats go to
        ``out + ".stats.json"``.
      corpus: candidate documents (JSONL or plain text); default: the distinct positives.
      split: the qrels split of a BEIR input.
      top_k, skip_top, max_score, relative_margin, num_negatives, sampling: the selection
        rules (steps 1-5 of the module docstring).
      too_few: "keep" writes records with fewer than ``num_negatives`` negatives, "drop"
        drops them; both are counted in the stats.
      seed: seeds ``sampling="random"`` (with the query and positive texts).
      query_prompt, passage_prompt: names of the model's prompts.
      query_prefix, passage_prefix: literal prompt text, overriding the names.
      instruction_template: how a record's ``instruction`` and query are joined.
      task, dataset: for records that lack them (dataset default: the input's file name).
      with_scores: also write ``positive_score`` and ``negative_scores`` per record.
      overwrite: replace an existing ``out``.
      batch_size: texts per forward pass (split over the mesh's devices).
      dtype, max_length, packing: passed to `jaxembed.load` when ``model`` is a path
        (packing: several texts per row, same embeddings, less padding).
      cache: the embedding cache folder (default ``out + ".cache"``).
      shard_size: rows per cached embedding shard (the unit of resumption and search).
      block, query_block: block sizes of the search (bounding its memory).
      mesh, devices: the devices to encode on (default: every device, of every host).
      progress: show progress bars on stderr.
      stop_after_shards: test hook: raise `MiningInterrupted` after encoding this many
        shards, as an interruption would.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if top_k < 1 or skip_top < 0 or num_negatives < 1:
        raise MiningError(
            f"need top_k >= 1, skip_top >= 0, num_negatives >= 1; got top_k={top_k}, "
            f"skip_top={skip_top}, num_negatives={num_negatives}"
        )
    if skip_top + num_negatives > top_k:
        raise MiningError(
            f"top_k={top_k} leaves only {top_k - skip_top} candidates after skip_top="
            f"{skip_top}, fewer than num_negatives={num_negatives}; raise top_k"
        )
    if sampling not in SAMPLING:
        raise MiningError(f"sampling={sampling!r}; choose one of {list(SAMPLING)}")
    if too_few not in TOO_FEW:
        raise MiningError(f"too_few={too_few!r}; choose one of {list(TOO_FEW)}")
    if batch_size < 1 or shard_size < 1:
        raise MiningError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    max_score = _opt_float(max_score, "max_score")
    relative_margin = _opt_float(relative_margin, "relative_margin")
    if out.exists() and not overwrite:
        raise MiningError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    stats_path = Path(f"{out}.stats.json")
    cache = Path(cache) if cache is not None else Path(f"{out}.cache")

    data = _read_inputs(input, corpus, split, task, dataset)
    records = data.records

    # The candidate pool: the corpus (deduplicated by exact text), then new positives.
    pool_index: dict[str, int] = {}
    pool: list[str] = []
    for t in data.corpus if data.corpus is not None else ():
        if t not in pool_index:
            pool_index[t] = len(pool)
            pool.append(t)
    n_corpus = len(pool)
    corpus_duplicates = (len(data.corpus) - n_corpus) if data.corpus is not None else 0
    for r in records:
        if r["positive"] not in pool_index:
            pool_index[r["positive"]] = len(pool)
            pool.append(r["positive"])
    if not pool:
        raise MiningError(f"{input}: the corpus is empty")
    pos_idx = np.array([pool_index[r["positive"]] for r in records], np.int64)
    pool_hash = np.array([text_hash(t) for t in pool], np.int64)

    encoder = _load_model(model, dtype, max_length, packing)
    from jaxembed import evaluate, sharding

    if mesh is None:  # every device of every host: each encodes its share of a batch
        mesh = sharding.make_mesh(devices=list(devices) if devices else None)
    evaluate.on_mesh(encoder, mesh)
    try:
        q_prompt = (
            query_prefix
            if query_prefix is not None
            else evaluate.pick_prompt(
                encoder.prompts, query_prompt, evaluate.QUERY_PROMPTS, encoder.name
            )
        )
        p_prompt = (
            passage_prefix
            if passage_prefix is not None
            else evaluate.pick_prompt(
                encoder.prompts, passage_prompt, evaluate.DOC_PROMPTS, encoder.name
            )
        )
    except ValueError as e:
        raise MiningError(str(e)) from None

    # Queries: one per distinct (prompt, text) the model reads.
    group_of: dict[tuple[str, str], int] = {}
    q_texts: list[str] = []
    q_prompts: list[str] = []
    rec_group = np.empty(len(records), np.int64)
    for n, r in enumerate(records):
        if r.get("instruction"):
            try:
                key = (
                    "",
                    instruction_template.format(instruction=r["instruction"], query=r["query"]),
                )
            except (KeyError, IndexError) as e:
                raise MiningError(
                    f"instruction_template {instruction_template!r}: unknown field {e}; "
                    "use {instruction} and {query}"
                ) from None
        else:
            key = (q_prompt, r["query"])
        g = group_of.setdefault(key, len(group_of))
        if g == len(q_texts):
            q_prompts.append(key[0])
            q_texts.append(key[1])
        rec_group[n] = g
    n_groups = len(q_texts)
    # Each query's positives, as padded hash and pool-index tables.
    group_pos: list[list[int]] = [[] for _ in range(n_groups)]
    for n, g in enumerate(rec_group):
        if pos_idx[n] not in group_pos[g]:
            group_pos[g].append(int(pos_idx[n]))
    max_pos = max(len(p) for p in group_pos)
    pos_hash = np.full((n_groups, max_pos), -1, np.int64)  # -1 never equals a text_hash
    for g, p in enumerate(group_pos):
        pos_hash[g, : len(p)] = pool_hash[p]

    key = {
        "model": encoder.name,
        "model_fingerprint": model_fingerprint(encoder.name) if encoder.name else "",
        "dtype": str(getattr(encoder, "dtype", dtype)),
        "max_length": int(encoder.max_length),
        "pooling": encoder.pooling,
    }
    budget = _Budget(stop_after_shards)
    enc_kw = dict(shard_size=shard_size, batch_size=batch_size, progress=progress, budget=budget)
    log.info(
        "mining %d records (%d queries) against %d candidates (%d from the corpus) on %d device(s)",
        len(records), n_groups, len(pool), n_corpus, mesh.devices.size,
    )  # fmt: skip
    d_shards, d_info = encode_cached(
        encoder, pool, [p_prompt] * len(pool), cache / "corpus", key, desc="corpus", **enc_kw
    )
    q_shards, q_info = encode_cached(
        encoder, q_texts, q_prompts, cache / "queries", key, desc="queries", **enc_kw
    )

    # Search: the best top_k non-positives per query.
    t0 = time.perf_counter()
    cand_s, cand_i = nearest_non_positives(
        q_shards, d_shards, pool_hash, pos_hash, top_k, block=block, query_block=query_block
    )
    search_s = time.perf_counter() - t0

    # Selection per record.
    t0 = time.perf_counter()
    pos_score = np.empty(len(records), np.float32)
    for lo in range(0, len(records), shard_size):  # in chunks: bounded memory
        sl = slice(lo, lo + shard_size)
        q_emb = _gather(q_shards, shard_size, rec_group[sl])
        pos_score[sl] = np.einsum("nd,nd->n", q_emb, _gather(d_shards, shard_size, pos_idx[sl]))
    dists = _Dists(("positive", "kept", *DROP_REASONS))
    counts = dict.fromkeys(("retrieved", "kept", *DROP_REASONS), 0)
    per_record: dict[int, int] = {}
    rows: list[dict] = []
    short = dropped = 0
    kept_groups: set[int] = set()
    rules = dict(
        skip_top=skip_top,
        max_score=max_score,
        relative_margin=relative_margin,
        num_negatives=num_negatives,
        sampling=sampling,
    )
    for n, r in enumerate(records):
        g = rec_group[n]
        s, i = cand_s[g], cand_i[g]
        valid = i >= 0
        ps = float(pos_score[n])
        rng_seed = [seed, text_hash(r["query"]), text_hash(r["positive"])]
        take, drops = select(s, valid, ps, rng_seed=rng_seed, **rules)
        drop_skip, drop_max, drop_margin = drops
        surv = np.flatnonzero(valid & ~drop_skip & ~drop_max & ~drop_margin)
        not_sampled = np.setdiff1d(surv, take, assume_unique=True)
        counts["retrieved"] += int(valid.sum())
        for name, mask in (
            ("skip_top", drop_skip),
            ("max_score", drop_max),
            ("relative_margin", drop_margin),
        ):
            counts[name] += int(mask.sum())
            dists.add(name, s[mask])
        counts["not_sampled"] += len(not_sampled)
        dists.add("not_sampled", s[not_sampled])
        dists.add("positive", np.array([ps]))
        if len(take) < num_negatives:
            if too_few == "drop":
                dropped += 1
                continue
            short += 1
        counts["kept"] += len(take)
        dists.add("kept", s[take])
        per_record[len(take)] = per_record.get(len(take), 0) + 1
        kept_groups.add(int(g))
        row = {
            "query": r["query"],
            "positive": r["positive"],
            "negatives": [pool[int(j)] for j in i[take]],
            "task": r["task"],
            "dataset": r["dataset"],
        }
        if r.get("instruction"):
            row["instruction"] = r["instruction"]
        if with_scores:
            row["positive_score"] = round(ps, 6)
            row["negative_scores"] = [round(float(x), 6) for x in s[take]]
        rows.append(row)
    dists.flush()
    select_s = time.perf_counter() - t0

    total_neg = sum(k * v for k, v in per_record.items())
    query_s = q_info["seconds"] + search_s + select_s
    stats = {
        "input": str(input),
        "corpus": str(corpus) if corpus is not None else None,
        "output": str(out),
        "model": encoder.name,
        "devices": int(mesh.devices.size),
        "settings": {
            "top_k": top_k,
            "skip_top": skip_top,
            "max_score": max_score,
            "relative_margin": relative_margin,
            "num_negatives": num_negatives,
            "sampling": sampling,
            "too_few": too_few,
            "seed": seed,
            "query_prompt": q_prompt,
            "passage_prompt": p_prompt,
            "instruction_template": instruction_template,
            "max_length": int(encoder.max_length),
        },
        "records_in": len(records),
        "records_out": len(rows),
        "records_dropped_too_few": dropped,
        "records_short_kept": short,
        "queries_in": n_groups,
        "queries_out": len(kept_groups),
        "corpus_docs": n_corpus,
        "corpus_duplicates": corpus_duplicates,
        "corpus_skipped_empty": data.corpus_skipped,
        "candidate_pool": len(pool),
        "negatives_per_record": {
            "mean": total_neg / len(rows) if rows else 0.0,
            "min": min(per_record, default=0),
            "max": max(per_record, default=0),
            "counts": {str(k): per_record[k] for k in sorted(per_record)},
        },
        "candidates": counts,
        "scores": {name: d.summary() for name, d in dists.d.items()},
        "cache": {"dir": str(cache), "corpus": d_info, "queries": q_info},
        "timing": {
            "encode_corpus_s": d_info["seconds"],
            "encode_queries_s": q_info["seconds"],
            "search_s": search_s,
            "select_s": select_s,
            # docs/s: corpus documents encoded in this run per second of corpus encoding;
            # queries/s: distinct queries per second of query encoding + search + selection.
            "docs_per_s": d_info["encoded_rows"] / d_info["seconds"] if d_info["seconds"] else None,
            "queries_per_s": n_groups / query_s if query_s else None,
        },
    }
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.name.endswith(".parquet"):
            _write_parquet(out, rows, with_scores)
        else:
            _write_jsonl(out, rows)
        stats["timing"]["total_s"] = time.perf_counter() - t_start
        text = json.dumps(stats, indent=1, ensure_ascii=False).encode("utf-8")
        _atomic_write_bytes(stats_path, lambda f: f.write(text))
    else:
        stats["timing"]["total_s"] = time.perf_counter() - t_start
    return stats


def _load_model(model, dtype: str, max_length: int | None, packing: bool = False):
    if not isinstance(model, (str, os.PathLike)):
        return model  # an already loaded Encoder
    import jaxembed

    try:
        return jaxembed.load(model, dtype=dtype, max_length=max_length, packing=packing)
    except Exception as e:  # the loaders raise many types; the cause is in the message
        raise MiningError(f"cannot load model {model}: {e}") from e


def summary_line(stats: dict) -> str:
    """One line: records and queries in/out, negatives per record, docs/s, queries/s."""
    t = stats["timing"]
    docs = f"{t['docs_per_s']:.1f} docs/s" if t["docs_per_s"] else "corpus from cache"
    dropped = stats["records_dropped_too_few"]
    return (
        f"mined {stats['records_in']} records ({stats['queries_in']} queries) -> "
        f"{stats['records_out']} records ({stats['queries_out']} queries, {dropped} dropped, "
        f"{stats['records_short_kept']} kept short); "
        f"{stats['negatives_per_record']['mean']:.1f} negatives/record; "
        f"{stats['candidate_pool']} candidates: {docs}, {t['queries_per_s']:.1f} queries/s; "
        f"{t['total_s']:.1f} s in all"
    )


# ------------------------------------------------------------------------------------------
# CLI


def _float_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxembed.mine",
        description=(
            "Hard-negative mining with a teacher model on all devices. Per record: "
            "rank the candidates by cosine, drop the query's positives (by text hash), keep "
            "the best --top-k, skip the first --skip-top, drop scores >= --max-score, drop "
            "scores >= (1 - --relative-margin) x the positive's score, then take "
            "--num-negatives (--sampling top|random). Writes OUT (JSONL, or Parquet in "
            "F2LLM's layout when OUT ends with .parquet) and OUT.stats.json; embeddings are "
            "cached in shards so an interrupted run resumes."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="teacher: a Hugging Face / sentence-transformers folder or a jaxembed training "
        "checkpoint directory",
    )
    p.add_argument(
        "--input",
        required=True,
        help="training-format pairs (JSONL, JSONL.gz, Parquet, TFDS dir: query, positive"
        "[, instruction, task, dataset]; records sharing a query are one query with several "
        "positives), or a BEIR folder (queries.jsonl, qrels/SPLIT.tsv, corpus.jsonl)",
    )
    p.add_argument(
        "--corpus",
        help="candidate documents: JSONL ({'_id', 'text'[, 'title']} or {'text'}) or a "
        "text file, one document per line (default: the distinct positives; a BEIR "
        "folder uses its corpus.jsonl). The positives are always added to it.",
    )
    p.add_argument("--out", required=True, help="output file: *.parquet, else JSONL")
    p.add_argument("--split", default="train", help="qrels split of a BEIR input (default: train)")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved (default: 100)")
    p.add_argument("--skip-top", type=int, default=5, help="best candidates skipped (default: 5)")
    p.add_argument(
        "--max-score",
        type=_float_or_none,
        default=0.8,
        help="drop candidates scoring >= this; 'none' disables (default: 0.8)",
    )
    p.add_argument(
        "--relative-margin",
        type=_float_or_none,
        default=0.05,
        help="drop candidates scoring >= (1 - MARGIN) x the positive's score (0.05: "
        "NV-Retriever's 95%% rule); 'none' disables (default: 0.05)",
    )
    p.add_argument("--num-negatives", type=int, default=24, help="negatives kept (default: 24)")
    p.add_argument(
        "--sampling",
        choices=SAMPLING,
        default="top",
        help="top: the best survivors; random: a sample seeded by --seed, query and "
        "positive (default: top)",
    )
    p.add_argument(
        "--too-few",
        choices=TOO_FEW,
        default="keep",
        help="records left with fewer than --num-negatives: keep them with fewer, or drop "
        "them (counted in the stats either way; default: keep)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random (default: 0)")
    p.add_argument(
        "--query-prompt",
        metavar="NAME",
        help="the model's prompt for queries (default: its 'query' prompt if defined); "
        "queries with an instruction get the instruction template instead",
    )
    p.add_argument(
        "--passage-prompt",
        metavar="NAME",
        help="the model's prompt for passages (default: its 'document', 'passage' or "
        "'corpus' prompt, the first defined)",
    )
    p.add_argument("--query-prefix", metavar="TEXT", help="literal query prompt text")
    p.add_argument("--passage-prefix", metavar="TEXT", help="literal passage prompt text")
    p.add_argument(
        "--instruction-template",
        default=DEFAULT_TEMPLATE,
        help="query text of records with an instruction (default: training's, %(default)r)",
    )
    p.add_argument(
        "--task", default="retrieval", help="task of input records lacking one (default: retrieval)"
    )
    p.add_argument(
        "--dataset", help="dataset of input records lacking one (default: the input's name)"
    )
    p.add_argument(
        "--with-scores",
        action="store_true",
        help="also write positive_score and negative_scores per record",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="embedding cache (default: OUT.cache); reused when model, prompts and texts match",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=16384,
        help="embeddings per cache shard, the unit of resumption (default: 16384)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="texts per forward pass, split over the devices (default: 64)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=16384,
        help="corpus rows per search block; memory ~ query-block x (block + top-k) floats "
        "(default: 16384)",
    )
    p.add_argument(
        "--query-block", type=int, default=1024, help="queries per search block (default: 1024)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype"
    )
    p.add_argument("--max-length", type=int, help="max tokens per text (default: the model's)")
    p.add_argument(
        "--packing",
        action="store_true",
        help="sequence packing: several texts per row, attention kept within each (same "
        "embeddings, less padding; --batch-size then counts rows)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    distributed.add_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns the stats written to ``OUT.stats.json``."""
    args = _parser().parse_args(argv)
    distributed.initialize_from_args(args)
    return distributed.run(lambda: _main(args))


def _main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")  # no model hub here: never try to reach it
    try:
        stats = mine(
            args.model,
            args.input,
            args.out,
            corpus=args.corpus,
            split=args.split,
            top_k=args.top_k,
            skip_top=args.skip_top,
            max_score=args.max_score,
            relative_margin=args.relative_margin,
            num_negatives=args.num_negatives,
            sampling=args.sampling,
            too_few=args.too_few,
            seed=args.seed,
            query_prompt=args.query_prompt,
            passage_prompt=args.passage_prompt,
            query_prefix=args.query_prefix,
            passage_prefix=args.passage_prefix,
            instruction_template=args.instruction_template,
            task=args.task,
            dataset=args.dataset,
            with_scores=args.with_scores,
            overwrite=args.overwrite,
            batch_size=args.batch_size,
            dtype=args.dtype,
            max_length=args.max_length,
            packing=args.packing,
            cache=args.cache,
            shard_size=args.shard_size,
            block=args.block,
            query_block=args.query_block,
            progress=not args.no_progress,
        )
    except MiningError as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0:
        print(summary_line(stats), file=sys.stderr)
        print(f"wrote {args.out} and {args.out}.stats.json", file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
