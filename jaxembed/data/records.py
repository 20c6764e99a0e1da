"""The training record: one query, its positive, its mined negatives, its task and dataset.

Every reader (JSONL, Parquet, TFDS/ArrayRecord) yields plain dicts of this shape, checked by
`check_record`, whose errors name the file and the line (or row):

    {"query": str, "positive": str, "negatives": [str, ...], "task": str, "dataset": str,
     "instruction": str (optional; the query-side instruction, F2LLM's "Instruct: ..."),
     "scores": [float, ...] (optional; a teacher's score of the positive, then of each
               negative in order: what distillation losses learn from, `jaxembed.score`)}
"""

from __future__ import annotations

import math
import re
from typing import Any

from jaxembed.choices import TASKS

REQUIRED = ("query", "positive", "task", "dataset")
FIELDS = (*REQUIRED, "negatives", "instruction", "scores")


# sentence-transformers' column names (and F2LLM's "passage") for the schema's fields.
ALIASES = {"anchor": "query", "passage": "positive", "negative": "negatives"}
NUMBERED_NEGATIVE = re.compile(r"negative_(\d+)")


def normalise(obj: Any, columns: dict[str, str] | None = None) -> Any:
    """A row of a user's table as the schema's fields (before `check_record`).

    ``columns`` renames first (``{"question": "query", "answer": "positive"}``: the
    config's ``data.columns``); then sentence-transformers' names are understood:
    ``anchor`` is the query, ``negative`` (a text or a list) and ``negative_1`` ..
    ``negative_N`` (in numeric order; empty ones dropped) the negatives; F2LLM's
    ``passage`` is the positive. A field the schema already has is never overwritten.
    """
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        out[(columns or {}).get(key, key)] = value
    for alias, field in ALIASES.items():
        if alias in out and field not in out:
            value = out.pop(alias)
            out[field] = [value] if field == "negatives" and isinstance(value, str) else value
    numbered = sorted((int(m.group(1)), k) for k in out if (m := NUMBERED_NEGATIVE.fullmatch(k)))
    if numbered and "negatives" not in out:
        values = [out.pop(k) for _, k in numbered]
        while values and (values[-1] is None or not str(values[-1]).strip()):
            values.pop()  # rows with fewer negatives than columns leave the last ones empty
        out["negatives"] = values
    return out


class RecordError(ValueError):
    """A record that breaks the schema; the message starts with ``file:line:``."""


def check_record(obj: Any, where: str) -> dict:
    """Validates one record and returns it normalised (``negatives`` a list, no extra keys).

    Args:
      obj: the decoded record.
      where: ``"path:line"`` (or ``"path:row N"``) for the error message.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED:
        if key not in obj or obj[key] is None:
            raise RecordError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], str):
            raise RecordError(
                f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}"
            )
        if not obj[key].strip():
            raise RecordError(f"{where}: field '{key}' is empty")
    if obj["task"] not in TASKS:
        raise RecordError(f"{where}: field 'task' is {obj['task']!r}; allowed: {', '.join(TASKS)}")
    negatives = obj.get("negatives") or []
    if not isinstance(negatives, (list, tuple)):
        raise RecordError(
            f"{where}: field 'negatives' must be a list of strings, got {type(negatives).__name__}"
        )
    for i, neg in enumerate(negatives):
        if not isinstance(neg, str):
            raise RecordError(f"{where}: negatives[{i}] must be a string, got {type(neg).__name__}")
        if not neg.strip():
            raise RecordError(f"{where}: negatives[{i}] is empty")
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise RecordError(
            f"{where}: field 'instruction' must be a string, got {type(instruction).__name__}"
        )
    record = {k: obj[k] for k in REQUIRED}
    record["negatives"] = list(negatives)
    if instruction:
        record["instruction"] = instruction
    scores = obj.get("scores")
    if scores is not None:
        record["scores"] = _check_scores(scores, len(negatives), where)
    return record


def _check_scores(scores: Any, num_negatives: int, where: str) -> list[float]:
    if not isinstance(scores, (list, tuple)):
        raise RecordError(
            f"{where}: field 'scores' must be a list of numbers, got {type(scores).__name__}"
        )
    if len(scores) != 1 + num_negatives:
        raise RecordError(
            f"{where}: field 'scores' has {len(scores)} numbers; expected 1 + {num_negatives} "
            "(the positive's, then one per negative)"
        )
    for i, x in enumerate(scores):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise RecordError(f"{where}: scores[{i}] must be a finite number, got {x!r}")
    return [float(x) for x in scores]
