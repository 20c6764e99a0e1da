"""Retrieval: the standard metrics, encoders as functions, prompt choice, in-training eval.

The library under `jaxembed.evaluate` (the CLI), `jaxembed.mteb_adapter` and the training
loop's dev evaluation (`Evaluator`), so that all of them read (`jaxembed.beir`), search
(`jaxembed.search`) and score the same way. Search is exact: blocked matrix products keep
a running top-k, so memory is bounded by the block sizes, not by the corpus.

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
- A corpus text is MTEB's title/text join (`jaxembed.beir.corpus_text`).

Encoders here produce unit vectors, so the inner product is the cosine similarity MTEB uses.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import scipy.sparse

from jaxembed import quantization as quantization_lib
from jaxembed import search, sharding
from jaxembed.beir import EvalDataError, load_beir
from jaxembed.encoder import Encoder
from jaxembed.hf.sentence_transformers import DOC_PROMPTS, QUERY_PROMPTS, pick_prompt
from jaxembed.models.sparse import active_dims
from jaxembed.search import padded_tokens, sparse_top_k, top_k

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100")
# Where MTEB stores the same numbers in its result files.
MTEB_KEYS = {m: m.replace("@", "_at_") for m in METRICS}
K = 100  # ranks kept per query: the deepest cut-off in METRICS
# A sparse model's statistics: the mean count of non-zero dimensions per query, per document.
SPARSITY = ("query_active_dims", "corpus_active_dims")

EncodeFn = Callable[[list[str]], np.ndarray]


# ------------------------------------------------------------------------------------------
# Search and metrics


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
    quantization: str = "none",
    ranges: np.ndarray | None = None,
    rescore_multiplier: int = 4,
    sparse: bool = False,
) -> dict:
    """Encodes a BEIR set with the two callables (texts -> unit vectors, or a multi-vector
    model's token vectors, `search.token_sets`'s layout, scored by MaxSim) and scores it.

    ``data`` may pass an already loaded `load_beir` result (the training loop keeps it).
    Returns the `METRICS` and the query and document counts; with ``quantization``
    (``int8`` / ``binary``, `jaxembed.quantization.search`) also, under
    ``quantization``, the metrics of the quantized index alone and rescored by the float
    queries (``rescore_multiplier * k`` candidates); int8 codes use ``ranges``, else ranges
    calibrated on this corpus. A ``sparse`` model's vectors (scored exactly, by dot product
    over every document) also report `SPARSITY`.
    """
    corpus, queries, qrels = data if data is not None else load_beir(folder, split)
    # Sorted by id, descending: search breaks ties by lower index, i.e. by greater id, as
    # trec_eval does.
    doc_ids = sorted(corpus, reverse=True)
    qids = list(qrels)
    d = _check_embeddings(encode_docs([corpus[i] for i in doc_ids]), len(doc_ids), "corpus")
    q = _check_embeddings(encode_queries([queries[i] for i in qids]), len(qids), "queries")

    def metrics(idx: np.ndarray) -> dict:
        ranked = {qid: [doc_ids[j] for j in row] for qid, row in zip(qids, idx, strict=True)}
        return retrieval_metrics(ranked, qrels)

    search = sparse_top_k if scipy.sparse.issparse(d) else top_k
    out = {**metrics(search(q, d, k)[1]), "queries": len(qids), "corpus": len(doc_ids)}
    if sparse:
        out.update(zip(SPARSITY, (active_dims(q), active_dims(d)), strict=True))
    if quantization != "none":
        if scipy.sparse.issparse(d) or d.ndim == 3:
            kind = "multi-vector" if d.ndim == 3 else "sparse"
            raise ValueError(
                f"--quantization {quantization}: a {kind} model's vectors are not quantized"
            )
        if quantization == "int8" and ranges is None:
            ranges = quantization_lib.int8_ranges(d)
        # One index search: its first k are the index's ranking, all of them the candidates.
        wide = k * max(rescore_multiplier, 1)
        _, cand = quantization_lib.index_search(q, d, wide, quantization, ranges)
        rescored = cand[:, :k]
        if rescore_multiplier:
            rescored = quantization_lib.rescore(q, d, cand, k, quantization, ranges)[1]
        out[quantization] = {"index": metrics(cand[:, :k]), "rescored": metrics(rescored)}
    return out


def reuse_last(encode: EncodeFn) -> EncodeFn:
    """``encode`` that reuses the vectors of the texts it encoded in its previous call (of
    documents: a multi-vector model's are padded as documents).

    Evaluation sets often share a corpus (Debian's ``xling-*`` sets all search the same
    English descriptions): consecutive sets then encode it once. Only the last call's
    vectors are kept, so memory stays that of one corpus.
    """
    last: dict[str, np.ndarray] = {}

    def cached(texts: list[str]) -> np.ndarray:
        nonlocal last
        new = list(dict.fromkeys(t for t in texts if t not in last))
        out = encode(new) if new else None
        sparse = scipy.sparse.issparse(out)  # a sparse model's: rows of a sparse matrix
        rows = [out[i] for i in range(len(new))] if sparse else np.asarray(out)
        vectors = dict(zip(new, rows, strict=True)) if new else {}
        known = {t: last[t] for t in texts if t in last}
        last = known | vectors
        if not texts:
            return encode([])
        kept = [last[t] for t in texts]
        if scipy.sparse.issparse(kept[0]):
            return scipy.sparse.vstack(kept, format="csr")
        if kept[0].ndim == 2:  # documents' token vectors of calls padded to their own longest
            width = max(len(x) for x in kept)
            return np.concatenate([search.widen(x[None], width, query=False) for x in kept])
        return np.stack(kept)

    return cached


def _check_embeddings(x: np.ndarray, n: int, what: str) -> np.ndarray:
    """Vectors (n, dim), a sparse model's matrix, or token vectors (n, length, dim)."""
    sparse = scipy.sparse.issparse(x)
    x = scipy.sparse.csr_matrix(x, dtype=np.float32) if sparse else np.asarray(x, np.float32)
    if x.ndim not in (2, 3) or x.shape[0] != n:
        raise ValueError(f"encoding the {what}: expected {n} rows, got shape {x.shape}")
    if not np.isfinite(x.data if sparse else x).all():
        raise FloatingPointError(f"encoding the {what}: non-finite embeddings")
    return x


# ------------------------------------------------------------------------------------------
# Encoders: prompts and the device mesh


def on_mesh(encoder, mesh=None):
    """``encoder`` with its forward passes data-parallel over ``mesh`` (see `Encoder.use_mesh`).

    The default mesh is every device on the ``data`` axis, on every host of a multi-host
    run (each process then encodes the same texts and receives every embedding).
    """
    if mesh is None:
        mesh = sharding.make_mesh()
    return encoder.use_mesh(mesh)


def is_sparse(model) -> bool:
    """A sparse model: jaxembed's sparse `Encoder`, or sentence-transformers' SparseEncoder."""
    return getattr(model, "sparse", False) is True or type(model).__name__ == "SparseEncoder"


def encode_fn(
    encoder, prompt: str, *, query: bool, batch_size: int, max_length: int | None = None
) -> EncodeFn:
    """texts -> what the search takes from a `jaxembed.Encoder` (`Encoder.encode_for_search`;
    a sparse model's kept as a sparse matrix)."""
    kw = dict(
        query=query, batch_size=batch_size, max_length=max_length, as_sparse=is_sparse(encoder)
    )
    return lambda texts: encoder.encode_for_search(texts, prompt, **kw)


def scored_by(model) -> str:
    """How ``model`` scores a query and a document: "cosine", "dot product" (a sparse
    model) or "MaxSim" (a multi-vector model: a sum over the query's tokens)."""
    if getattr(model, "multi_vector", False) or type(model).__name__ == "MultiVectorEncoder":
        return "MaxSim"
    return "dot product" if is_sparse(model) else "cosine"


def encoder_fns(
    encoder, query_prompt: str | None = None, doc_prompt: str | None = None, batch_size: int = 32
) -> tuple[EncodeFn, EncodeFn, dict]:
    """``(encode_queries, encode_docs, prompts used)`` for a `jaxembed.Encoder`.

    ``query_prompt`` / ``doc_prompt`` are prompt *names* (see `pick_prompt`); both are
    checked before anything is encoded.
    """
    q_text = pick_prompt(encoder.prompts, query_prompt, QUERY_PROMPTS, encoder.name)
    d_text = pick_prompt(encoder.prompts, doc_prompt, DOC_PROMPTS, encoder.name)
    return (
        encode_fn(encoder, q_text, query=True, batch_size=batch_size),
        encode_fn(encoder, d_text, query=False, batch_size=batch_size),
        {"query": q_text, "document": d_text},
    )


def st_encoder_fns(
    model, query_prompt: str | None = None, doc_prompt: str | None = None, batch_size: int = 32
) -> tuple[EncodeFn, EncodeFn, dict]:
    """The same for a ``sentence_transformers.SentenceTransformer`` (PyTorch reference)."""
    prompts = {k: v for k, v in model.prompts.items() if v is not None}
    q_text = pick_prompt(prompts, query_prompt, QUERY_PROMPTS)
    d_text = pick_prompt(prompts, doc_prompt, DOC_PROMPTS)

    def run(texts, prompt, query=False):
        if type(model).__name__ == "MultiVectorEncoder":  # token vectors, laid out as ours
            encode = model.encode_query if query else model.encode_document
            out = encode(texts, prompt=prompt, batch_size=batch_size)
            return padded_tokens([x.float().numpy() for x in out], query)
        if is_sparse(model):  # a SparseEncoder: its sparse tensor as a scipy matrix
            out = model.encode(texts, prompt=prompt, batch_size=batch_size, convert_to_tensor=True)
            out = out.to_sparse_coo().coalesce()
            (rows, cols), values = out.indices().numpy(), out.values().float().numpy()
            return scipy.sparse.csr_matrix((values, (rows, cols)), shape=tuple(out.shape))
        return model.encode(texts, prompt=prompt, batch_size=batch_size, normalize_embeddings=True)

    return (
        lambda t: run(t, q_text, query=True),
        lambda t: run(t, d_text),
        {"query": q_text, "document": d_text},
    )


# ------------------------------------------------------------------------------------------
# Reporting


def mean_over_sets(per_set: dict[str, dict], where: tuple[str, ...] = ()) -> dict:
    """The unweighted mean of each metric over the sets (how the training loop reports),
    and of a sparse model's `SPARSITY`; ``where``: of the metrics nested under these keys
    (e.g. ``("binary", "rescored")``)."""

    def at(r: dict) -> dict:
        for key in where:
            r = r[key]
        return r

    first = at(next(iter(per_set.values())))
    names = METRICS + tuple(m for m in SPARSITY if m in first)
    return {m: float(np.mean([at(r)[m] for r in per_set.values()])) for m in names}


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
# In training


class Evaluator:
    """The training loop's dev evaluation: metrics with the live parameters (no export).

    A run trained for a quantized index (``loss.quantization``) also logs that index's
    metrics, alone and rescored by the float queries (``eval/binary_index/ndcg@10``,
    ``eval/binary_rescored/...``, and per group), as ``jaxembed.evaluate --quantization``
    gives them on the checkpoint (int8 ranges calibrated on each corpus)."""

    def __init__(
        self, config, model, tokenizer, pooling: str, st, prompts: dict[str, str], head=None
    ):
        self.sets = {Path(p).name: load_beir(p, config.eval.split) for p in config.eval.data}
        self.groups = {g: tuple(members) for g, members in config.eval.groups.items()}
        max_len = max(config.data.max_query_length, config.data.max_passage_length)
        # Training pools over prompt tokens too, whatever the source folder's include_prompt.
        st = dataclasses.replace(st, include_prompt=True)
        self.encoder = Encoder(
            model, tokenizer, pooling=pooling, max_length=max_len, st=st, head=head
        )
        self.batch_size = config.eval.batch_size
        # ``prompts``: those the exported folder will carry (`jaxembed.export_meta.trained_prompts`,
        # e.g. F2LLM's one instruction), so the numbers logged here are what
        # `jaxembed.evaluate` gives on the checkpoint.
        self.query_prompt, self.passage_prompt = prompts["query"], prompts["document"]
        self.q_len, self.p_len = config.data.max_query_length, config.data.max_passage_length
        self.quantization = config.loss.quantization
        self.sparse = self.encoder.sparse

    @staticmethod
    def _mesh_of(params):
        """The mesh the live parameters are sharded on (it may span several hosts)."""
        leaf = jax.tree.leaves(params)[0]
        return getattr(getattr(leaf, "sharding", None), "mesh", None)

    def __call__(self, params) -> dict:
        if not self.sets:
            return {}
        self.encoder.set_params(params)
        enc = self.encoder
        mesh = self._mesh_of(params["model"])
        if mesh is not None:
            # Eval batches split over the training mesh's data axes, like `jaxembed.evaluate`
            # on its own mesh; the parameters stay where training keeps them.
            on_mesh(enc, mesh)

        b = self.batch_size
        queries = encode_fn(enc, self.query_prompt, query=True, batch_size=b, max_length=self.q_len)
        docs = encode_fn(enc, self.passage_prompt, query=False, batch_size=b, max_length=self.p_len)
        docs = reuse_last(docs)  # sets sharing a corpus encode it once
        q = self.quantization
        per_set = {
            name: evaluate_beir(queries, docs, None, data=data, quantization=q, sparse=self.sparse)
            for name, data in self.sets.items()
        }
        names = METRICS + (SPARSITY if self.sparse else ())
        out = {f"eval/{name}/{m}": r[m] for name, r in per_set.items() for m in names}
        kinds = {"": ()}  # the float index, and a quantized one's metrics under their names
        if q != "none":
            kinds |= {f"{q}_{how}/": (q, how) for how in ("index", "rescored")}
        for kind, where in kinds.items():
            out.update({f"eval/{kind}{m}": v for m, v in mean_over_sets(per_set, where).items()})
            for group, members in self.groups.items():
                means = mean_over_sets({name: per_set[name] for name in members}, where)
                out.update({f"eval/{group}/{kind}{m}": v for m, v in means.items()})
        return out
