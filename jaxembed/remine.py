"""Hard negatives re-mined during training, with the live parameters, on the training mesh.

Negatives mined once with a frozen teacher go stale as the student learns (ANCE re-mines
for this reason). With ``train.remine_every=N``, every N steps `train.main` encodes the
corpus (``train.remine_corpus``, default: the distinct positives of the retrieval
datasets, plus every positive) and each retrieval dataset's queries with the current
parameters, searches exactly (`retrieval.nearest_non_positives`: a query's own positives,
by text, are never candidates; rows sharing a query share their positives) and selects
negatives with `jaxembed.mine`'s rules (`retrieval.select_negatives`: skip the top
``remine_skip_top``, drop those within ``remine_relative_margin`` of the positive's score,
keep the best ``remine_num_negatives``). The batches from that step on draw their
negatives from this pool (`pipeline.BatchBuilder.remined`); classification and clustering
datasets keep their stored negatives, which are labels rather than retrieval results.

The pool is written to ``WORKDIR/remine/STEP.npz`` (process 0, atomically): a run resumed
between two re-minings reads the last one back, so it draws exactly the negatives an
uninterrupted run draws. Every process computes the same pool (the encoder returns every
embedding to every host and the search is deterministic), so hosts need not exchange it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from jaxembed import retrieval
from jaxembed.data.pipeline import text_hash
from jaxembed.files import atomic_open

POOL_DIR = "remine"


@dataclasses.dataclass(frozen=True)
class Settings:
    every: int
    corpus: tuple[str, ...]
    top_k: int
    skip_top: int
    relative_margin: float | None
    num_negatives: int

    @classmethod
    def from_config(cls, config) -> Settings | None:
        t = config.train
        if not t.remine_every:
            return None
        margin = t.remine_relative_margin
        return cls(
            int(t.remine_every),
            tuple(t.remine_corpus),
            int(t.remine_top_k),
            int(t.remine_skip_top),
            None if margin < 0 else float(margin),
            int(t.remine_num_negatives),
        )


@dataclasses.dataclass
class Pool:
    """One re-mining: the candidate texts and, per re-mined source, (rows, K) indices."""

    step: int
    texts: list[str]
    negatives: dict[int, np.ndarray]

    def save(self, workdir: Path) -> Path:
        path = workdir / POOL_DIR / f"{self.step}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"source_{d}": a for d, a in self.negatives.items()}
        with atomic_open(path, "wb") as f:
            np.savez(f, texts=np.asarray(self.texts, dtype=object), **arrays)
        return path

    @classmethod
    def load(cls, workdir: Path, step: int) -> Pool | None:
        path = workdir / POOL_DIR / f"{step}.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=True) as z:
            negatives = {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("source_")}
            return cls(step, z["texts"].tolist(), negatives)


def last_remine_step(step: int, every: int) -> int:
    """The step of the last re-mining at or before ``step`` (0: none yet)."""
    return (step // every) * every


def candidate_texts(settings: Settings, records: dict[int, list[dict]]) -> list[str]:
    """The corpus (files, else the retrieval datasets' distinct positives), then every
    positive not in it: each positive has an embedding, and other rows' are candidates."""
    texts: list[str] = []
    for path in settings.corpus:
        texts += retrieval.read_corpus(path)[0]
    seen = set(texts)
    for rows in records.values():
        for r in rows:
            if r["positive"] not in seen:
                seen.add(r["positive"])
                texts.append(r["positive"])
    return texts


def remine(encoder, builder, settings: Settings, step: int, batch_size: int, log) -> Pool:
    """A fresh pool from ``encoder``'s live parameters (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = builder.cfg
    sources = builder.sources
    # Each retrieval dataset's records, read once for the candidates and the queries.
    records = {
        d: [s[i] for i in range(len(s))] for d, s in enumerate(sources) if s.task == "retrieval"
    }
    texts = candidate_texts(settings, records)
    index = {t: j for j, t in enumerate(texts)}
    encoder.max_length = cfg.max_passage_length
    docs = encoder.encode(texts, batch_size=batch_size, prompt=cfg.passage_prefix)
    hashes = np.asarray([text_hash(t) for t in texts], np.int64)
    negatives, n_queries = {}, 0
    for d, rows in records.items():
        negatives[d] = _mine_source(
            encoder, builder, rows, docs, hashes, index, settings, batch_size
        )
        n_queries += len(rows)
    log.print(
        f"re-mined negatives at step {step}: {n_queries:,} queries against {len(texts):,} "
        f"passages in {time.perf_counter() - t0:.1f}s (training paused meanwhile)"
    )
    return Pool(step, texts, negatives)


def _mine_source(encoder, builder, records, docs, hashes, index, settings, batch_size):
    """(rows, K) indices into the pool: each row's selected negatives, -1 padded."""
    cfg = builder.cfg
    groups: dict[str, list[int]] = {}
    for n, r in enumerate(records):
        groups.setdefault(builder.query_text(r), []).append(n)
    queries = list(groups)
    encoder.max_length = cfg.max_query_length
    q_emb = encoder.encode(queries, batch_size=batch_size, prompt="")
    most = max(len(rows) for rows in groups.values())
    pos_hash = np.full((len(queries), most), -1, np.int64)
    for g, rows in enumerate(groups.values()):
        pos_hash[g, : len(rows)] = [text_hash(records[n]["positive"]) for n in rows]
    cand_s, cand_i = retrieval.nearest_non_positives(
        [q_emb], [docs], hashes, pos_hash, settings.top_k
    )
    k = settings.num_negatives
    out = np.full((len(records), k), -1, np.int32)
    for g, rows in enumerate(groups.values()):
        for n in rows:
            positive = float(q_emb[g] @ docs[index[records[n]["positive"]]])
            take, _ = retrieval.select_negatives(
                cand_s[g],
                cand_i[g] >= 0,
                positive,
                skip_top=settings.skip_top,
                max_score=None,
                relative_margin=settings.relative_margin,
                num_negatives=k,
                sampling="top",
                rng_seed=[0],
            )
            out[n, : len(take)] = cand_i[g][take]
    return out
