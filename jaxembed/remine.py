"""Hard negatives re-mined during training, with the live parameters, on the training mesh.

Negatives mined once with a frozen teacher go stale as the student learns (ANCE re-mines
for this reason). With ``mine.every=N``, every N steps `train.main` encodes the candidate
pool (``mine.corpus``, default: the distinct positives of the retrieval datasets, plus
every positive) and each retrieval dataset's queries with the current parameters, and runs
`jaxembed.mining` on them: the same pool, query grouping, exact search and rules as
``python -m jaxembed.mine`` (the config's ``mine`` group holds the rules). The batches
from that step on draw their negatives from this pool (`pipeline.BatchBuilder.remined`);
classification and clustering datasets keep their stored negatives, which are labels
rather than retrieval results.

The pool is written to ``WORKDIR/remine/STEP.npz`` (process 0, atomically): a run resumed
between two re-minings reads the last one back, so it draws exactly the negatives an
uninterrupted run draws. Every process computes the same pool (the encoder returns every
embedding to every host and the search is deterministic), so hosts need not exchange it.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np

from jaxembed import config as config_lib
from jaxembed import mining, search
from jaxembed.files import atomic_open, is_url

POOL_DIR = "remine"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Re-mining of a run: how often, against which corpus files, by which rules."""

    every: int
    corpus: tuple[str, ...]
    rules: mining.Rules

    @classmethod
    def from_config(cls, config) -> Settings | None:
        m = config.mine
        if not m.every:
            return None
        return cls(int(m.every), tuple(m.corpus), config_lib.mining_rules(config))


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
        source = io.BytesIO(path.read_bytes()) if is_url(path) else path  # gs:// or local
        with np.load(source, allow_pickle=True) as z:
            negatives = {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("source_")}
            return cls(step, z["texts"].tolist(), negatives)


def last_remine_step(step: int, every: int) -> int:
    """The step of the last re-mining at or before ``step`` (0: none yet)."""
    return (step // every) * every


def remine(encoder, builder, settings: Settings, step: int, batch_size: int, log) -> Pool:
    """A fresh pool from ``encoder``'s live parameters (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = builder.cfg
    # Each retrieval dataset's records, read once: one pool for all, queries per dataset.
    sources = builder.sources
    records = {
        d: [s[i] for i in range(len(s))] for d, s in enumerate(sources) if s.task == "retrieval"
    }
    corpus = [t for path in settings.corpus for t in mining.read_corpus(path)[0]] or None
    every = [r for rows in records.values() for r in rows]
    pool = mining.candidate_pool(corpus, every)
    docs = encoder.encode_for_search(pool.texts, cfg.passage_prefix, batch_size=batch_size,
                                     max_length=cfg.max_passage_length)  # fmt: skip
    negatives, start = {}, 0
    for d, rows in records.items():
        mine_pool = dataclasses.replace(pool, positive=pool.positive[start : start + len(rows)])
        start += len(rows)
        negatives[d] = _negatives(
            encoder, builder, rows, mine_pool, docs, settings.rules, batch_size
        )
    log.print(
        f"re-mined negatives at step {step}: {len(every):,} queries against {len(pool.texts):,} "
        f"passages in {time.perf_counter() - t0:.1f}s (training paused meanwhile)"
    )
    return Pool(step, pool.texts, negatives)


def _negatives(encoder, builder, records, pool, docs, rules: mining.Rules, batch_size: int):
    """(rows, K) indices into the pool: each row's selected negatives, -1 padded."""
    cfg = builder.cfg
    queries = mining.group_queries(records, pool, lambda r: ("", builder.query_text(r)))
    q_emb = encoder.encode_for_search(queries.texts, "", query=True, batch_size=batch_size,
                                      max_length=cfg.max_query_length)  # fmt: skip
    top_k = min(rules.top_k, len(pool.texts))
    candidates = search.nearest_non_positives([q_emb], [docs], pool.hashes,
                                              queries.positive_hashes, top_k)  # fmt: skip
    pos_score = mining.positive_scores(q_emb.__getitem__, docs.__getitem__, queries, pool,
                                       max(1, len(records)))  # fmt: skip
    out = np.full((len(records), rules.num_negatives), -1, np.int32)
    for n, choice in enumerate(mining.choose(records, queries, candidates, pos_score, rules)):
        out[n, : len(choice.negatives)] = choice.negatives
    return out
