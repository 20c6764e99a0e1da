"""BEIR-layout retrieval data, read the way MTEB reads it.

A set is a folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id corpus-id score``, graded
relevance allowed; a header line is optional). A corpus text is ``title + " " + text``
(stripped) when there is a title, else the text stripped: MTEB's rule, so both see the same
strings. Errors name the file and line.

Kept apart from the metrics and encoders (`jaxembed.retrieval`) so that light modules
(`jaxembed.mining`, hence the config) read corpora without importing a model.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path


class EvalDataError(ValueError):
    """Malformed or inconsistent retrieval data (a BEIR folder, a corpus); names the file."""


# ------------------------------------------------------------------------------------------
# Data


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


def corpus_text(row: dict) -> str:
    """A corpus entry as the model reads it: MTEB's title/text join."""
    title = row.get("title") or ""
    text = row.get("text") or ""
    return f"{title} {text}".strip() if title else text.strip()


def load_beir(folder: str | os.PathLike, split: str = "dev"):
    """``(corpus {id: text}, queries {id: text}, qrels {qid: {doc_id: grade}})``.

    Errors name the file (and line): a missing file, an empty corpus, a qrels line whose
    query id is not in ``queries.jsonl`` or whose corpus id is not in ``corpus.jsonl``.
    """
    folder = Path(folder)
    corpus_file, queries_file = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for f in (corpus_file, queries_file, qrels_file):
        if not f.exists():
            raise EvalDataError(f"{folder}: missing {f.relative_to(folder)}")
    corpus = {str(row["_id"]): corpus_text(row) for row in _read_jsonl(corpus_file)}
    if not corpus:
        raise EvalDataError(f"{corpus_file}: the corpus is empty")
    queries = {str(r["_id"]): r.get("text") or "" for r in _read_jsonl(queries_file)}
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
                    f"{qrels_file}:{line_no}: query id {qid!r} is not in {queries_file}"
                )
            if did not in corpus:
                raise EvalDataError(
                    f"{qrels_file}:{line_no}: corpus id {did!r} is not in {corpus_file}"
                )
            try:
                qrels.setdefault(qid, {})[did] = int(score)
            except ValueError:
                raise EvalDataError(
                    f"{qrels_file}:{line_no}: score {score!r} is not an integer"
                ) from None
    if not qrels:
        raise EvalDataError(f"{qrels_file}: no judgments")
    return corpus, queries, qrels


def find_sets(data: str | os.PathLike) -> list[Path]:
    """``data`` itself if it is a BEIR folder, else its sub-folders that are (sorted)."""
    data = Path(data)
    if (data / "corpus.jsonl").exists():
        return [data]
    sets = (
        sorted(p for p in data.iterdir() if (p / "corpus.jsonl").exists()) if data.is_dir() else []
    )
    if not sets:
        raise EvalDataError(f"{data}: not a BEIR folder (no corpus.jsonl) and no sub-folder is one")
    return sets
