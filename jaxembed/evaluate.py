"""Retrieval evaluation on BEIR-layout data: exact search and the standard metrics, or MTEB.

::

    python -m jaxembed.evaluate --model MODEL --data DIR [--split dev] [--out OUT] [--mteb]

One implementation serves the CLI and the in-training evaluation (`jaxembed.train`'s
``Evaluator`` calls `evaluate_beir`). Input: ``corpus.jsonl`` (``_id``, ``title``,
``text``), ``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id
corpus-id score``, graded relevance allowed; a header line is optional). Search is exact:
blocked matrix products keep a running top-k, so memory is bounded by the block sizes, not
by the corpus.

The metrics are MTEB's for retrieval (it scores with ``pytrec_eval``, i.e. trec_eval), so
that our numbers and MTEB's agree on the same rankings:

- nDCG@10 with linear gains (the grade of a relevant document), log2 discounts, the ideal
  ranking built from all judged relevant documents; MRR@10; MAP@100 (the sum of precisions
  at relevant hits in the top 100, divided by *all* relevant documents); Recall@{1,10,100}.
- A document is relevant when its grade is > 0; grades <= 0 count as non-relevant.
- Ties: equal scores are ranked by document id, *descending* (string order), as trec_eval
  does (MTEB's own MRR follows the same rule). We get this for free by searching a corpus
  sorted by id descending with a "lower index first" tie rule.
- Every query with at least one judgment in the qrels is scored; one whose judgments are
  all <= 0 scores 0 on every metric (trec_eval and MTEB count it too). Queries without
  judgments are not evaluated. A document whose id equals the query id is *not* skipped
  (MTEB's default, ``ignore_identical_ids=False``).
- A corpus text is ``title + " " + text`` (stripped) when there is a title, else the text
  stripped: MTEB's rule, so both see the same strings.

Encoders here produce unit vectors, so the inner product is the cosine similarity MTEB uses.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import distributed

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100")
# Where MTEB stores the same numbers in its result files.
MTEB_KEYS = {m: m.replace("@", "_at_") for m in METRICS}
K = 100  # ranks kept per query: the deepest cut-off in METRICS

EncodeFn = Callable[[list[str]], np.ndarray]


class EvalDataError(ValueError):
    """Malformed or inconsistent BEIR-layout data; the message names the file."""


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


# ------------------------------------------------------------------------------------------
# Search and metrics


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_block(best_s, best_i, q, d, n_valid, offset, k):
    """Folds one corpus block into the running top-k (ties: lower corpus index first)."""
    # HIGHEST: no TF32/bf16 passes on accelerators, so near-ties rank as in float32.
    s = jnp.matmul(q, d.T, precision=jax.lax.Precision.HIGHEST)
    col = jnp.arange(d.shape[0])
    s = jnp.where(col[None, :] < n_valid, s, -jnp.inf)
    cand_s = jnp.concatenate([best_s, s], axis=1)
    cand_i = jnp.concatenate([best_i, jnp.broadcast_to(offset + col, s.shape)], axis=1)
    # top_k puts the lower position first among equal values; the running best always sits
    # before the block and holds lower corpus indices, so the tie rule holds across blocks.
    top_s, pos = jax.lax.top_k(cand_s, k)
    return top_s, jnp.take_along_axis(cand_i, pos, axis=1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def top_k(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    block: int = 16384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: ``(scores, indices)``, each ``(len(queries), k)``.

    Scans ``docs`` in blocks of ``block`` rows and ``queries`` in blocks of ``query_block``
    (both padded to a power of two, so few shapes compile), so memory stays at about
    ``query_block * (block + k)`` floats. Equal scores rank the lower document index first,
    whatever the block sizes.
    """
    queries = np.asarray(queries, np.float32)
    docs = np.asarray(docs, np.float32)
    k = min(k, len(docs))
    n_q = len(queries)
    out_s = np.zeros((n_q, k), np.float32)
    out_i = np.zeros((n_q, k), np.int64)
    if n_q == 0 or k == 0:
        return out_s, out_i
    d_rows = min(_pow2_at_least(block), _pow2_at_least(len(docs)))
    q_rows = min(_pow2_at_least(query_block), _pow2_at_least(n_q))
    n_docs = len(docs)
    docs = np.concatenate([docs, np.zeros((-n_docs % d_rows, docs.shape[1]), np.float32)])
    for qs in range(0, n_q, q_rows):
        q = np.zeros((q_rows, queries.shape[1]), np.float32)
        q[: min(q_rows, n_q - qs)] = queries[qs : qs + q_rows]
        q = jnp.asarray(q)
        best_s = jnp.full((q_rows, k), -jnp.inf, jnp.float32)
        best_i = jnp.full((q_rows, k), -1, jnp.int32)
        for ds in range(0, n_docs, d_rows):
            best_s, best_i = _merge_block(
                best_s, best_i, q, jnp.asarray(docs[ds : ds + d_rows]), n_docs - ds, ds, k
            )
        rows = min(q_rows, n_q - qs)
        out_s[qs : qs + rows] = np.asarray(best_s)[:rows]
        out_i[qs : qs + rows] = np.asarray(best_i)[:rows]
    return out_s, out_i


def retrieval_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict:
    """Mean metrics over every query in ``qrels`` (see the module docstring for the rules).

    ``ranked`` maps a query id to its documents, best first (at least 100 when the corpus
    has them); a query of ``qrels`` missing from it counts as retrieving nothing.
    """
    totals = dict.fromkeys(METRICS, 0.0)
    any_relevant = False
    for qid, rels in qrels.items():
        relevant = {d: g for d, g in rels.items() if g > 0}
        if not relevant:
            continue  # trec_eval scores it 0 on everything: it only counts in the mean
        any_relevant = True
        gains = [relevant.get(d, 0) for d in ranked.get(qid, [])[:K]]
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
    if not any_relevant:
        raise EvalDataError("no query in the qrels has a relevant document (grade > 0)")
    return {m: v / len(qrels) for m, v in totals.items()}


def evaluate_beir(
    encode_queries: EncodeFn,
    encode_docs: EncodeFn,
    folder: str | os.PathLike | None,
    split: str = "dev",
    k: int = K,
    data=None,
) -> dict:
    """Encodes a BEIR set with the two callables (texts -> unit vectors) and scores it.

    ``data`` may pass an already loaded `load_beir` result (the training loop keeps it).
    Returns the `METRICS` and the query and document counts.
    """
    corpus, queries, qrels = data if data is not None else load_beir(folder, split)
    # Sorted by id, descending: search breaks ties by lower index, i.e. by greater id, as
    # trec_eval does.
    doc_ids = sorted(corpus, reverse=True)
    qids = list(qrels)
    d = _check_embeddings(encode_docs([corpus[i] for i in doc_ids]), len(doc_ids), "corpus")
    q = _check_embeddings(encode_queries([queries[i] for i in qids]), len(qids), "queries")
    _, idx = top_k(q, d, k)
    ranked = {qid: [doc_ids[j] for j in row] for qid, row in zip(qids, idx, strict=True)}
    return {**retrieval_metrics(ranked, qrels), "queries": len(qids), "corpus": len(doc_ids)}


def reuse_last(encode: EncodeFn) -> EncodeFn:
    """``encode`` that reuses the vectors of the texts it encoded in its previous call.

    Evaluation sets often share a corpus (Debian's ``xling-*`` sets all search the same
    English descriptions): consecutive sets then encode it once. Only the last call's
    vectors are kept, so memory stays that of one corpus.
    """
    last: dict[str, np.ndarray] = {}

    def cached(texts: list[str]) -> np.ndarray:
        nonlocal last
        new = list(dict.fromkeys(t for t in texts if t not in last))
        vectors = dict(zip(new, np.asarray(encode(new)), strict=True)) if new else {}
        known = {t: last[t] for t in texts if t in last}
        last = known | vectors
        return np.stack([last[t] for t in texts]) if texts else np.asarray(encode([]))

    return cached


def _check_embeddings(x: np.ndarray, n: int, what: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) != n:
        raise ValueError(f"encoding the {what}: expected {n} rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise FloatingPointError(f"encoding the {what}: non-finite embeddings")
    return x


# ------------------------------------------------------------------------------------------
# Encoders: prompts and the device mesh

QUERY_PROMPTS = ("query",)
DOC_PROMPTS = ("document", "passage", "corpus")


def pick_prompt(
    prompts: dict[str, str], name: str | None, defaults: Sequence[str], model=""
) -> str:
    """Prompt text: ``prompts[name]``, else the first of ``defaults`` the model defines, else "".

    The defaults are sentence-transformers' ``encode_query`` ("query") and
    ``encode_document`` ("document", "passage", "corpus"), which MTEB calls, so both sides
    read the same prompts. An undefined ``name`` is an error naming the defined ones.
    """
    if name is not None:
        if name not in prompts:
            raise ValueError(
                f"prompt name {name!r} is not defined by {model or 'the model'}; "
                f"defined prompts: {sorted(prompts) or 'none'}"
            )
        return prompts[name]
    return next((prompts[n] for n in defaults if n in prompts), "")


def on_mesh(encoder, mesh=None):
    """``encoder`` with its forward passes data-parallel over ``mesh`` (see `Encoder.use_mesh`).

    The default mesh is every device on the ``data`` axis, on every host of a multi-host
    run (each process then encodes the same texts and receives every embedding).
    """
    from jaxembed import sharding

    if mesh is None:
        mesh = sharding.make_mesh()
    return encoder.use_mesh(mesh)


def encoder_fns(
    encoder, query_prompt: str | None = None, doc_prompt: str | None = None, batch_size: int = 32
) -> tuple[EncodeFn, EncodeFn, dict]:
    """``(encode_queries, encode_docs, prompts used)`` for a `jaxembed.Encoder`.

    ``query_prompt`` / ``doc_prompt`` are prompt *names* (see `pick_prompt`); both are
    checked before anything is encoded.
    """
    q_text = pick_prompt(encoder.prompts, query_prompt, QUERY_PROMPTS, encoder.name)
    d_text = pick_prompt(encoder.prompts, doc_prompt, DOC_PROMPTS, encoder.name)

    def queries(texts):
        return encoder.encode(texts, batch_size=batch_size, prompt=q_text)

    def docs(texts):
        return encoder.encode(texts, batch_size=batch_size, prompt=d_text)

    return queries, docs, {"query": q_text, "document": d_text}


def st_encoder_fns(
    model, query_prompt: str | None = None, doc_prompt: str | None = None, batch_size: int = 32
) -> tuple[EncodeFn, EncodeFn, dict]:
    """The same for a ``sentence_transformers.SentenceTransformer`` (PyTorch reference)."""
    prompts = {k: v for k, v in model.prompts.items() if v is not None}
    q_text = pick_prompt(prompts, query_prompt, QUERY_PROMPTS)
    d_text = pick_prompt(prompts, doc_prompt, DOC_PROMPTS)

    def run(texts, prompt):
        return model.encode(texts, prompt=prompt, batch_size=batch_size, normalize_embeddings=True)

    return (
        lambda t: run(t, q_text),
        lambda t: run(t, d_text),
        {"query": q_text, "document": d_text},
    )


# ------------------------------------------------------------------------------------------
# Reporting


def mean_over_sets(per_set: dict[str, dict]) -> dict:
    """The unweighted mean of each metric over the sets (how the training loop reports)."""
    return {m: float(np.mean([r[m] for r in per_set.values()])) for m in METRICS}


def format_table(per_set: dict[str, dict]) -> str:
    """One row per set (and a mean row when there are several), one column per metric."""
    rows = dict(per_set)
    if len(per_set) > 1:
        rows["mean"] = mean_over_sets(per_set)
    width = max(8, *(len(n) for n in rows))
    lines = [f"{'set':<{width}}  " + "  ".join(f"{m:>10}" for m in METRICS)]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r[m]:>10.4f}" for m in METRICS))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxembed.evaluate",
        description=(
            "Retrieval evaluation on BEIR-layout data (corpus.jsonl, queries.jsonl, "
            "qrels/SPLIT.tsv): encodes corpus and queries, searches exactly, and prints "
            "nDCG@10, MRR@10, MAP@100 and Recall@{1,10,100} (MTEB's definitions; ties by "
            "document id, descending) as a table, and as JSON (OUT/metrics.json, or stdout "
            "without --out). With --mteb, MTEB runs each set as a local retrieval task, "
            "offline, instead of the built-in metrics."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face / sentence-transformers folder, or a jaxembed training "
        "checkpoint directory (anything jaxembed.load accepts)",
    )
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="DIR",
        help="one or more BEIR folders, or folders of BEIR folders (each set is evaluated; "
        "the mean is reported too; sets sharing a corpus encode it once)",
    )
    p.add_argument(
        "--split",
        default="dev",
        help="qrels/SPLIT.tsv to score: dev or test (default: dev; tune on dev only)",
    )
    p.add_argument(
        "--query-prompt",
        metavar="NAME",
        help="the model's prompt for queries (default: its 'query' prompt if it defines "
        "one, else none)",
    )
    p.add_argument(
        "--doc-prompt",
        metavar="NAME",
        help="the model's prompt for documents (default: its 'document', 'passage' or "
        "'corpus' prompt, the first defined, else none)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="texts per forward pass (default: 32)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of the JAX encoder (default: float32)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="max tokens per text (default: the model's max_seq_length); compare models "
        "at one length",
    )
    p.add_argument(
        "--packing",
        action="store_true",
        help="sequence packing in the JAX encoder: several texts per row, attention kept "
        "within each (same embeddings, less padding; --batch-size then counts rows)",
    )
    p.add_argument(
        "--backend",
        default="jax",
        choices=("jax", "sentence-transformers"),
        help="jax: jaxembed's encoder on all devices (default); sentence-transformers: "
        "the PyTorch reference (HF / sentence-transformers folders only)",
    )
    p.add_argument(
        "--mteb",
        action="store_true",
        help="score with MTEB (offline, local data) instead of the built-in metrics; its "
        "result files go to OUT/mteb/results/. Prompts are then looked up per task as MTEB "
        "does (by task name or type first) unless --query-prompt / --doc-prompt name them",
    )
    p.add_argument("--out", metavar="DIR", help="write metrics.json (and MTEB's files) here")
    distributed.add_flags(p)
    return p


def _load_backend(args):
    if args.backend == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
        if args.max_length:
            model.max_seq_length = args.max_length
        return model
    import jaxembed

    return on_mesh(
        jaxembed.load(
            args.model, dtype=args.dtype, packing=args.packing, max_length=args.max_length
        )
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns ``{"sets": {name: metrics}, "mean": metrics, ...}``."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    distributed.initialize_from_args(args)
    return distributed.run(lambda: _main(args))


def _main(args) -> dict:
    # Multi-host: every process encodes (the batches are split over all hosts' devices) and
    # scores; process 0 prints and writes.
    writer = jax.process_index() == 0
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")  # no model hub here: never try to reach it
    try:
        sets = [s for folder in args.data for s in find_sets(folder)]
        if len({s.name for s in sets}) < len(sets):
            raise EvalDataError(f"--data: two sets share a folder name: {[str(s) for s in sets]}")
        data = {p.name: load_beir(p, args.split) for p in sets}
    except (EvalDataError, OSError) as e:
        raise SystemExit(str(e)) from None
    model = _load_backend(args)
    make_fns = encoder_fns if args.backend == "jax" else st_encoder_fns
    try:  # an undefined prompt name stops here, before anything is encoded
        q_fn, d_fn, prompts = make_fns(model, args.query_prompt, args.doc_prompt, args.batch_size)
    except ValueError as e:
        raise SystemExit(f"{args.model}: {e}") from None
    out = Path(args.out) if args.out and writer else None

    if args.mteb:
        from jaxembed import mteb_adapter

        per_set = mteb_adapter.run(
            model,
            sets,
            args.split,
            out,
            batch_size=args.batch_size,
            query_prompt=args.query_prompt,
            doc_prompt=args.doc_prompt,
            data=data,
        )
    else:
        d_fn = reuse_last(d_fn)
        per_set = {
            name: evaluate_beir(q_fn, d_fn, None, args.split, data=d) for name, d in data.items()
        }
    result = {
        "model": str(args.model),
        "data": [str(d) for d in args.data],
        "split": args.split,
        "scorer": "mteb" if args.mteb else "jaxembed",
        "backend": args.backend,
        "prompts": prompts,
        "sets": per_set,
        "mean": mean_over_sets(per_set),
    }
    if not writer:
        return result
    print(format_table(per_set))
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out / 'metrics.json'}")
    else:
        print(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
