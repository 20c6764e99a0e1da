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

The candidate pool is the corpus, deduplicated by text (a 63-bit key), plus every positive
not in it (as in sentence-transformers' ``mine_hard_negatives``), so each positive has an
embedding and the positives of other queries are candidates too.

Text the model reads: queries of records with an ``instruction`` become
``instruction_template.format(instruction=..., query=...)`` (training's
``config.data.instruction_template``) with no model prompt; other queries get the
query prompt (``--query-prefix`` text, else the model's ``--query-prompt`` name, else its
``query`` prompt if defined). Passages get ``--passage-prefix``, else the model's
``--passage-prompt``, else its ``document`` / ``passage`` / ``corpus`` prompt, if any.

Selection: `jaxembed.mining` (the rules, steps 1-5, with their defaults: F2LLM's, top
100, skip 5, cap 0.8, 95% of the positive, 24 negatives), shared with re-mining during
training. A record left with fewer than ``num_negatives`` is written with what it has
(``too_few="keep"``) or dropped (``"drop"``); both are counted.

Scale
-----
Embeddings go to ``--cache`` (default ``OUT.cache/``) in shards of ``shard_size`` rows,
each written atomically, under a manifest keyed by the model (path and a fingerprint of
its files), prompts, max length, dtype and a hash of the texts (`jaxembed.embedding_cache`):
an interrupted run re-encodes only the missing shards, and a changed input or model
invalidates the cache (logged). Search reads the shards memory-mapped, runs
`search.top_k` (blocked matrix products with a running top-k) against each, and merges
the per-shard results with the same tie rule (`search.search_shards`), so neither host
nor device memory has to hold the corpus embeddings. Nor its texts: a ``--corpus`` file is
indexed once (`mining.CorpusFile`: a byte offset and a 63-bit text key per document; a
``.gz`` corpus is held in memory) and each text read from disk when it is encoded or
written as a negative, and output rows go to OUT as they are chosen. What stays in host
memory grows with the corpus by about 80 bytes a document at the peak (offset, key, the
pool's row and its key, the prompt list); the pairs themselves, and ``top_k`` scores and
indices per query, grow with the queries (bench/scale.py measures both).

Multi-host (run the same command on every host, see ``launch/``): encoding is split over
every device of every host, and every process receives all embeddings; process 0 alone
writes the cache (which must be on storage all hosts share), the output and the stats.
The search itself still runs whole on every host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxembed import beir, cli, mining, retrieval, search, sharding
from jaxembed.choices import DTYPES
from jaxembed.config import default_config
from jaxembed.data import readers
from jaxembed.data.records import RecordError, check_record
from jaxembed.embedding_cache import encode_cached, encoder_key, gather
from jaxembed.encoder import load
from jaxembed.files import atomic_open, atomic_write_text, hf_offline
from jaxembed.mining import CorpusFile, MiningError, Rules

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = default_config().data.instruction_template
RULES = Rules()  # the defaults of every rule (`jaxembed.mining.Rules`)
# Score histograms in the stats file: 200 bins over the cosine range.
HIST_EDGES = np.linspace(-1.0, 1.0, 201)
DROP_REASONS = ("skip_top", "max_score", "relative_margin", "not_sampled")


# ------------------------------------------------------------------------------------------
# Mining: the stages


def mine(
    model,
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    corpus: str | os.PathLike | None = None,
    split: str = "train",
    top_k: int = RULES.top_k,
    skip_top: int = RULES.skip_top,
    max_score: float | None = RULES.max_score,
    relative_margin: float | None = RULES.relative_margin,
    num_negatives: int = RULES.num_negatives,
    sampling: str = RULES.sampling,
    too_few: str = RULES.too_few,
    seed: int = RULES.seed,
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
      top_k, skip_top, max_score, relative_margin, num_negatives, sampling, too_few, seed:
        the rules (`jaxembed.mining.Rules`; too_few: records left with fewer than
        ``num_negatives`` are kept or dropped, counted in the stats either way).
      query_prompt, passage_prompt: names of the model's prompts.
      query_prefix, passage_prefix: literal prompt text, overriding the names.
      instruction_template: how a record's ``instruction`` and query are joined.
      task, dataset: for records that lack them (dataset default: the input's file name).
      with_scores: also write each record's ``scores``: the teacher's score (cosine; a
        sparse model's dot product) of the positive, then of each negative (what
        distillation trains on).
      overwrite: replace an existing ``out``.
      batch_size: texts per forward pass (split over the mesh's devices).
      dtype, max_length, packing: passed to `jaxembed.load` when ``model`` is a path
        (packing: several texts per row, same embeddings, less padding).
      cache: the embedding cache folder (default ``out + ".cache"``).
      shard_size: rows per cached embedding shard (the unit of resumption and search).
      block, query_block: block sizes of the search (bounding its memory).
      mesh, devices: the devices to encode on (default: every device, of every host).
      progress: show progress bars on stderr.
    """
    t_start = time.perf_counter()
    rules = Rules(
        top_k=top_k,
        skip_top=skip_top,
        max_score=max_score,
        relative_margin=relative_margin,
        num_negatives=num_negatives,
        sampling=sampling,
        too_few=too_few,
        seed=seed,
    )  # fmt: skip  (checked before any input is read or model loaded: bad settings fail fast)
    if batch_size < 1 or shard_size < 1:
        raise MiningError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    out = Path(out)
    if out.exists() and not overwrite:
        raise MiningError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    cache = Path(cache) if cache is not None else Path(f"{out}.cache")

    data = _read_inputs(input, corpus, split, task, dataset)
    pool = mining.candidate_pool(data.corpus, data.records)
    encoder, mesh = _load_teacher(model, dtype, max_length, packing, mesh, devices)
    mining.check_scores(rules, retrieval.scored_by(encoder), encoder.name or model)
    q_prompt, p_prompt = _prompts(
        encoder, query_prompt, passage_prompt, query_prefix, passage_prefix
    )
    queries = mining.group_queries(
        data.records, pool, lambda r: _model_query(r, q_prompt, instruction_template)
    )
    log.info(
        "mining %d records (%d queries) against %d candidates (%d from the corpus) on %d device(s)",
        len(data.records), len(queries.texts), len(pool.texts), pool.n_corpus, mesh.devices.size,
    )  # fmt: skip

    key = encoder_key(encoder, dtype)
    enc_kw = dict(shard_size=shard_size, batch_size=batch_size, progress=progress)
    d_prompts = [p_prompt] * len(pool.texts)
    d_shards, d_info = encode_cached(
        encoder, pool.texts, d_prompts, cache / "corpus", key, desc="corpus", **enc_kw
    )
    q_shards, q_info = encode_cached(
        encoder,
        queries.texts,
        queries.prompts,
        cache / "queries",
        key,
        desc="queries",
        query=True,
        **enc_kw,
    )

    top_k = min(rules.top_k, len(pool.texts))
    if top_k < rules.top_k:
        log.warning("--top-k %d exceeds the %d candidates: capped at %d", rules.top_k, top_k, top_k)
    t0 = time.perf_counter()
    candidates = search.nearest_non_positives(
        q_shards, d_shards, pool.hashes, queries.positive_hashes, top_k,
        block=block, query_block=query_block,
    )  # fmt: skip
    search_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    pos_score = mining.positive_scores(
        lambda idx: gather(q_shards, shard_size, idx),
        lambda idx: gather(d_shards, shard_size, idx),
        queries, pool, shard_size,
    )  # fmt: skip
    # Rows go to the output file as they are chosen: the host never holds them all.
    instructions = any(r.get("instruction") for r in data.records)
    with _output(out, rules.num_negatives, instructions, with_scores) as put:
        sel = _select_negatives(
            data.records, queries, candidates, pos_score, pool, rules, with_scores, put
        )
    select_s = time.perf_counter() - t0

    stats = _stats(
        run={
            "input": str(input),
            "corpus": str(corpus) if corpus is not None else None,
            "output": str(out),
            "model": encoder.name,
            "devices": int(mesh.devices.size),
        },
        settings={
            **dataclasses.asdict(rules),
            "query_prompt": q_prompt,
            "passage_prompt": p_prompt,
            "instruction_template": instruction_template,
            "max_length": int(encoder.max_length),
        },
        data=data, pool=pool, queries=queries, sel=sel,
        cache={"dir": str(cache), "corpus": d_info, "queries": q_info},
        timing=_timing(d_info, q_info, search_s, select_s, len(queries.texts)),
    )  # fmt: skip
    stats["timing"]["total_s"] = time.perf_counter() - t_start
    if jax.process_index() == 0:
        text = json.dumps(stats, indent=1, ensure_ascii=False)
        atomic_write_text(Path(f"{out}.stats.json"), text)
    return stats


def _load_teacher(model, dtype: str, max_length: int | None, packing: bool, mesh, devices):
    """``(encoder, mesh)``: by default every device of every host encodes its share of a batch."""
    if isinstance(model, (str, os.PathLike)):
        try:
            model = load(model, dtype=dtype, max_length=max_length, packing=packing)
        except Exception as e:  # the loaders raise many types; the cause is in the message
            raise MiningError(f"cannot load model {model}: {e}") from e
    if mesh is None:
        mesh = sharding.make_mesh(devices=list(devices) if devices else None)
    retrieval.on_mesh(model, mesh)
    return model, mesh


def _prompts(encoder, query_prompt, passage_prompt, query_prefix, passage_prefix):
    """``(query prompt, passage prompt)`` texts: a literal prefix wins over a prompt name.

    Resolved before anything is encoded, so an undefined prompt name fails at once.
    """
    try:
        if query_prefix is None:
            query_prefix = retrieval.pick_prompt(
                encoder.prompts, query_prompt, retrieval.QUERY_PROMPTS, encoder.name
            )
        if passage_prefix is None:
            passage_prefix = retrieval.pick_prompt(
                encoder.prompts, passage_prompt, retrieval.DOC_PROMPTS, encoder.name
            )
    except ValueError as e:
        raise MiningError(str(e)) from None
    return query_prefix, passage_prefix


# ------------------------------------------------------------------------------------------
# Inputs: records, the candidate pool, the queries the model reads


@dataclasses.dataclass
class _Inputs:
    records: list[dict]  # query, positive, task, dataset[, instruction]
    corpus: Sequence[str] | None  # corpus texts (None: the positives are the corpus)
    corpus_skipped: int = 0


def _read_inputs(
    input: str | os.PathLike,
    corpus: str | os.PathLike | None,
    split: str,
    task: str,
    dataset: str | None,
) -> _Inputs:
    """Training-format pairs (with ``corpus``, if given) or a BEIR folder, as one shape."""
    input = Path(input)
    if not is_beir_folder(input):
        return _read_pairs(input, corpus, task, dataset)
    if corpus is not None:
        raise MiningError(
            f"{input}: a BEIR folder brings its own corpus.jsonl; --corpus cannot be given"
        )
    return _read_beir(input, split, dataset)


def _read_pairs(input: Path, corpus, task: str, dataset: str | None) -> _Inputs:
    try:
        src = readers.open_source(input, task=task, dataset=dataset or input.name.split(".", 1)[0])
    except (RecordError, FileNotFoundError, ValueError) as e:
        raise MiningError(str(e)) from None
    records = [src[i] for i in range(len(src))]
    if not records:
        raise MiningError(f"{input}: no records")
    if corpus is None:
        return _Inputs(records, None)
    docs = CorpusFile(corpus)  # read from disk when needed: the host keeps 16 bytes a document
    return _Inputs(records, docs, docs.skipped)


def _read_beir(folder: Path, split: str, dataset: str | None) -> _Inputs:
    """One record per judgment with grade > 0; ids judged <= 0 stay mere candidates."""
    try:
        docs, queries, qrels = beir.load_beir(folder, split)
    except beir.EvalDataError as e:
        raise MiningError(str(e)) from None
    qrels_file = folder / "qrels" / f"{split}.tsv"
    records = []
    for qid, rels in qrels.items():
        for did, grade in rels.items():
            if grade <= 0:
                continue
            rec = {
                "query": queries[qid],
                "positive": docs[did],
                "task": "retrieval",
                "dataset": dataset or folder.name,
            }
            try:
                records.append(check_record(rec, f"{qrels_file}: query {qid!r}, doc {did!r}"))
            except RecordError as e:
                raise MiningError(str(e)) from None
    if not records:
        raise MiningError(f"{qrels_file}: no judgment with grade > 0: nothing to mine")
    # Corpus order is the file's order (ties in search go to the lower pool index).
    return _Inputs(records, list(docs.values()))


def is_beir_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a BEIR folder (``queries.jsonl`` and ``qrels/``)."""
    path = Path(path)
    return path.is_dir() and (path / "queries.jsonl").exists() and (path / "qrels").is_dir()


def _model_query(record: dict, q_prompt: str, template: str) -> tuple[str, str]:
    """``(prompt, text)`` the model reads: an instruction replaces the prompt, as in training."""
    if not record.get("instruction"):
        return q_prompt, record["query"]
    try:
        return "", template.format(instruction=record["instruction"], query=record["query"])
    except (KeyError, IndexError) as e:
        raise MiningError(
            f"instruction_template {template!r}: unknown field {e}; "
            "use {instruction} and {query}"
        ) from None


# ------------------------------------------------------------------------------------------
# Selection


def _select_negatives(records, queries, candidates, pos_score, pool, rules, with_scores, put):
    """Steps 2-5 for every record (`jaxembed.mining.choose`): its output row, handed to
    ``put``, and the tallies of the stats file."""
    sel = _Selected()
    choices = mining.choose(records, queries, candidates, pos_score, rules)
    for record, c in zip(records, choices, strict=True):
        sel.count_candidates(c.candidates, c.valid, c.ranks, c.drops, c.positive_score)
        if len(c.negatives) < rules.num_negatives:
            if rules.too_few == "drop":
                sel.dropped += 1
                continue
            sel.short += 1
        sel.keep(c.query, c.scores)
        negatives = [pool.texts[int(j)] for j in c.negatives]
        put(_row(record, negatives, c.positive_score, c.scores, with_scores))
        sel.written += 1
    sel.dists.flush()
    return sel


def _row(record: dict, negatives: list[str], positive_score: float, scores, with_scores: bool):
    row = {
        "query": record["query"],
        "positive": record["positive"],
        "negatives": negatives,
        "task": record["task"],
        "dataset": record["dataset"],
    }
    if record.get("instruction"):
        row["instruction"] = record["instruction"]
    if with_scores:
        # The record's "scores" field: the teacher's score of the positive, then of each
        # negative; the distillation losses train on it (`jaxembed.data.records`).
        row["scores"] = [round(positive_score, 6), *(round(float(x), 6) for x in scores)]
    return row


# ------------------------------------------------------------------------------------------
# Stats: where every candidate went, so the settings can be tuned from one run


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
    """Buffers per-record score arrays and folds them into `_Dist`s in bulk (fewer calls)."""

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


@dataclasses.dataclass
class _Selected:
    """The output rows, and what the stats file reports about how they were chosen."""

    written: int = 0  # output rows
    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("retrieved", "kept", *DROP_REASONS), 0)
    )
    dists: _Dists = dataclasses.field(
        default_factory=lambda: _Dists(("positive", "kept", *DROP_REASONS))
    )
    per_record: dict[int, int] = dataclasses.field(default_factory=dict)  # negatives: records
    short: int = 0  # records kept with fewer than num_negatives
    dropped: int = 0  # records dropped for that
    queries: set[int] = dataclasses.field(default_factory=set)  # with a record written

    def count_candidates(self, scores, valid, take, drops, positive_score: float) -> None:
        """Tallies which rule dropped each retrieved candidate: it explains short records."""
        survivors = np.flatnonzero(valid & ~drops[0] & ~drops[1] & ~drops[2])
        not_sampled = np.setdiff1d(survivors, take, assume_unique=True)
        self.counts["retrieved"] += int(valid.sum())
        for name, mask in zip(DROP_REASONS[:3], drops, strict=True):
            self.counts[name] += int(mask.sum())
            self.dists.add(name, scores[mask])
        self.counts["not_sampled"] += len(not_sampled)
        self.dists.add("not_sampled", scores[not_sampled])
        self.dists.add("positive", np.array([positive_score]))

    def keep(self, query: int, scores: np.ndarray) -> None:
        self.counts["kept"] += len(scores)
        self.dists.add("kept", scores)
        self.per_record[len(scores)] = self.per_record.get(len(scores), 0) + 1
        self.queries.add(query)

    def negatives_per_record(self) -> dict:
        total = sum(k * v for k, v in self.per_record.items())
        return {
            "mean": total / self.written if self.written else 0.0,
            "min": min(self.per_record, default=0),
            "max": max(self.per_record, default=0),
            "counts": {str(k): self.per_record[k] for k in sorted(self.per_record)},
        }


def _stats(*, run, settings, data, pool, queries, sel, cache, timing) -> dict:
    return {
        **run,
        "settings": settings,
        "records_in": len(data.records),
        "records_out": sel.written,
        "records_dropped_too_few": sel.dropped,
        "records_short_kept": sel.short,
        "queries_in": len(queries.texts),
        "queries_out": len(sel.queries),
        "corpus_docs": pool.n_corpus,
        "corpus_duplicates": pool.duplicates,
        "corpus_skipped_empty": data.corpus_skipped,
        "candidate_pool": len(pool.texts),
        "negatives_per_record": sel.negatives_per_record(),
        "candidates": sel.counts,
        "scores": {name: d.summary() for name, d in sel.dists.d.items()},
        "cache": cache,
        "timing": timing,
    }


def _timing(d_info: dict, q_info: dict, search_s: float, select_s: float, n_queries: int):
    query_s = q_info["seconds"] + search_s + select_s
    return {
        "encode_corpus_s": d_info["seconds"],
        "encode_queries_s": q_info["seconds"],
        "search_s": search_s,
        "select_s": select_s,
        # docs/s: corpus documents encoded in this run per second of corpus encoding;
        # queries/s: distinct queries per second of query encoding + search + selection.
        "docs_per_s": d_info["encoded_rows"] / d_info["seconds"] if d_info["seconds"] else None,
        "queries_per_s": n_queries / query_s if query_s else None,
    }


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
# Output


@contextlib.contextmanager
def _output(out: Path, width: int, instructions: bool, with_scores: bool):
    """``put(row)``, writing ``out`` as rows come: JSONL, or Parquet in F2LLM's layout
    (query, passage, negative_1..``width``, null past a row's own, then extras) in row
    groups. The file appears whole when the block ends, or not at all. Process 0 alone
    writes: every host holds the same rows."""
    if jax.process_index() != 0:
        yield lambda row: None
        return
    if not out.name.endswith(".parquet"):
        with atomic_open(out) as f:
            yield lambda row: f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["query", "passage", *(f"negative_{j + 1}" for j in range(width)), "task", "dataset"]
    names += ["instruction"] * instructions + ["scores"] * with_scores
    schema = pa.schema(
        [(k, pa.list_(pa.float64()) if k == "scores" else pa.string()) for k in names]
    )
    rows: list[dict] = []

    def flush(writer) -> None:
        cols = {"query": [r["query"] for r in rows], "passage": [r["positive"] for r in rows]}
        for j in range(width):
            cols[f"negative_{j + 1}"] = [
                r["negatives"][j] if j < len(r["negatives"]) else None for r in rows
            ]
        cols |= {k: [r.get(k) for r in rows] for k in names[2 + width :]}
        writer.write_table(pa.table(cols, schema=schema))
        rows.clear()

    with atomic_open(out, "wb") as f, pq.ParquetWriter(f, schema) as writer:

        def put(row: dict) -> None:
            rows.append(row)
            if len(rows) == PARQUET_ROW_GROUP:
                flush(writer)

        yield put
        if rows:
            flush(writer)


PARQUET_ROW_GROUP = 8192


# ------------------------------------------------------------------------------------------
# Command line

DESCRIPTION = (
    "Hard-negative mining with a teacher model on all devices. Per record: "
    "rank the candidates by cosine, drop the query's positives (by text hash), keep "
    "the best --top-k, skip the first --skip-top, drop scores >= --max-score, drop "
    "scores >= (1 - --relative-margin) x the positive's score, then take "
    "--num-negatives (--sampling top|random). Writes OUT (JSONL, or Parquet in "
    "F2LLM's layout when OUT ends with .parquet) and OUT.stats.json; embeddings are "
    "cached in shards so an interrupted run resumes."
)
EPILOG = (
    "Bad input (a missing file, a malformed record, a bad setting) prints one 'error:' "
    "line and exits with status 2; --debug shows the traceback instead."
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns the stats written to ``OUT.stats.json``."""
    return cli.main(_parser(), _main, argv)


def configure_logging() -> None:
    """Our INFO lines on stderr, and others' warnings only: JAX logs at INFO that a CPU host
    has no TPU ("Unable to initialize backend 'tpu' ... libtpu.so"), which nobody can act on."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("jaxembed").setLevel(logging.INFO)


def _main(args: argparse.Namespace) -> dict:
    configure_logging()
    hf_offline()  # no model hub here: never try to reach it
    # Every flag but --no-progress and the shared ones (`jaxembed.cli`) is named after the
    # `mine` argument it sets, so a flag cannot be left unpassed.
    params = inspect.signature(mine).parameters
    stats = mine(
        **{k: v for k, v in vars(args).items() if k in params}, progress=not args.no_progress
    )
    if jax.process_index() == 0:
        print(summary_line(stats), file=sys.stderr)
        print(f"wrote {args.out} and {args.out}.stats.json", file=sys.stderr)
    return stats


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("jaxembed.mine", DESCRIPTION, EPILOG)
    _add_input_flags(p)
    _add_selection_flags(p)
    _add_text_flags(p)
    _add_run_flags(p)
    return p


def _add_input_flags(p: argparse.ArgumentParser) -> None:
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


def _add_selection_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of `jaxembed.mining.Rules`, whose default and help it takes."""
    for field in dataclasses.fields(Rules):
        meta = field.metadata
        p.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_float_or_none if meta.get("none_ok") else type(field.default),
            choices=meta.get("choices"),
            default=field.default,
            help=meta["help"]
            + ("; 'none' disables" if meta.get("none_ok") else "")
            + " (default: %(default)s)",
        )


def _float_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_text_flags(p: argparse.ArgumentParser) -> None:
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
        help="also write each record's scores (the positive's, then each negative's cosine; "
        "a sparse model's dot product), "
        "the field distillation trains on (loss.kl_weight, loss.margin_mse_weight)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument("--max-length", type=int, help="max tokens per text (default: the model's)")
    p.add_argument(
        "--packing",
        action="store_true",
        help="sequence packing: several texts per row, attention kept within each (same "
        "embeddings, less padding; --batch-size then counts rows)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


if __name__ == "__main__":
    main()
