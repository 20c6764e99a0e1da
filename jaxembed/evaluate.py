"""Retrieval evaluation on BEIR-layout data: exact search and the standard metrics.

One implementation serves the CLI and the in-training evaluation (`jaxembed.train`).
Input: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
``text``) and ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, graded relevance
allowed; a header line is optional). Search is exact: blocked matrix products keep a
running top-k, so memory is bounded by the block size, not the corpus.

Metrics follow trec_eval's definitions (as MTEB reports them): nDCG@10 with linear gains,
MRR@10, MAP@100 (divided by all relevant documents), Recall@{1,10,100}. Queries without
a relevant document are left out.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100")


class EvalDataError(ValueError):
    """Malformed or inconsistent BEIR-layout data; the message names the file."""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if "_id" not in rows[-1]:
                raise EvalDataError(f"{path}:{line_no}: missing field '_id'")
    return rows


def load_beir(folder: str | os.PathLike, split: str = "dev"):
    """``(corpus {id: text}, queries {id: text}, qrels {qid: {doc_id: grade}})``."""
    folder = Path(folder)
    corpus_file, queries_file = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for f in (corpus_file, queries_file, qrels_file):
        if not f.exists():
            raise EvalDataError(f"{folder}: missing {f.relative_to(folder)}")
    corpus = {}
    for row in _read_jsonl(corpus_file):
        title = (row.get("title") or "").strip()
        text = (row.get("text") or "").strip()
        corpus[str(row["_id"])] = f"{title} {text}".strip() if title else text
    if not corpus:
        raise EvalDataError(f"{corpus_file}: the corpus is empty")
    queries = {str(r["_id"]): r.get("text", "") for r in _read_jsonl(queries_file)}
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_file, encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (line_no == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3:
                raise EvalDataError(f"{qrels_file}:{line_no}: expected 3 tab-separated columns")
            qid, did, score = row
            if qid not in queries:
                raise EvalDataError(
                    f"{qrels_file}:{line_no}: query id {qid!r} is not in {queries_file.name}"
                )
            if did not in corpus:
                raise EvalDataError(
                    f"{qrels_file}:{line_no}: corpus id {did!r} is not in {corpus_file.name}"
                )
            qrels.setdefault(qid, {})[did] = int(score)
    return corpus, queries, qrels


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, block: int = 65536):
    """Exact top-k by inner product, scanning ``docs`` in blocks: (scores, indices).

    Ties are broken by the lower document index, so results do not depend on the block size.
    """
    k = min(k, len(docs))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(docs), block):
        s = queries @ docs[start : start + block].T
        idx = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, idx], axis=1)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


def retrieval_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict:
    """Mean metrics over queries with at least one relevant document."""
    totals = dict.fromkeys(METRICS, 0.0)
    n = 0
    for qid, rels in qrels.items():
        relevant = {d: g for d, g in rels.items() if g > 0}
        if not relevant:
            continue
        n += 1
        docs = ranked.get(qid, [])
        gains = [relevant.get(d, 0) for d in docs]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
        ideal = sorted(relevant.values(), reverse=True)[:10]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        totals["ndcg@10"] += dcg / idcg
        first = next((i for i, g in enumerate(gains[:10]) if g > 0), None)
        totals["mrr@10"] += 0.0 if first is None else 1.0 / (first + 1)
        hits, ap = 0, 0.0
        for i, g in enumerate(gains[:100]):
            if g > 0:
                hits += 1
                ap += hits / (i + 1)
        totals["map@100"] += ap / len(relevant)
        for k in (1, 10, 100):
            totals[f"recall@{k}"] += sum(1 for g in gains[:k] if g > 0) / len(relevant)
    if n == 0:
        raise EvalDataError("no query has a relevant document in the qrels")
    return {m: v / n for m, v in totals.items()}


def evaluate_beir(
    encode_queries,
    encode_docs,
    folder: str | os.PathLike,
    split: str = "dev",
    k: int = 100,
    data=None,
) -> dict:
    """Encodes a BEIR folder with the two callables (texts -> unit vectors) and scores it.

    ``data`` may pass an already loaded ``load_beir`` result (the training loop keeps it).
    """
    corpus, queries, qrels = data if data is not None else load_beir(folder, split)
    doc_ids = list(corpus)
    qids = [q for q in qrels if q in queries]
    d = encode_docs([corpus[i] for i in doc_ids])
    q = encode_queries([queries[i] for i in qids])
    _, idx = top_k(q, d, k)
    ranked = {qid: [doc_ids[j] for j in row] for qid, row in zip(qids, idx, strict=True)}
    return retrieval_metrics(ranked, qrels)
