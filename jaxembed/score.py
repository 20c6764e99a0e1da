"""``python -m jaxembed.score``: a teacher's score for each row's positive and negatives.

    python -m jaxembed.score --teacher /models/bge-reranker-base \\
        --input data/mined.jsonl --out data/scored.jsonl
    python -m jaxembed.score --teacher /models/bigger-embedder --input data/mined.jsonl \\
        --out data/scored.jsonl --query-prompt query --passage-prompt document

Writes the records again with ``scores``: the teacher's score of the positive, then of each
negative, in order (`jaxembed.data.records`), which the distillation losses learn from
(``loss.kl_weight``, ``loss.margin_mse_weight``). The teacher is

- a cross-encoder (an HF ``*ForSequenceClassification`` folder of BERT, XLM-R / RoBERTa
  or ModernBERT with one output): the relevance logit of each (query, passage) pair, the
  query and the passage tokenized together as the model was trained;
- any model `jaxembed.load` reads (a bi-encoder): the cosine between the query's and the
  passage's embeddings, each passage encoded once.

(``jaxembed.mine --with-scores`` writes the same field with the mining teacher's cosines,
so mined data is distillation data at no extra cost.)

Work is split over every local device (the batch axis of a data-parallel mesh). The output
is written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import jaxembed
from jaxembed import cli, sharding
from jaxembed.data.readers import open_sources
from jaxembed.files import atomic_open
from jaxembed.hf.cross_encoder import is_cross_encoder, load_cross_encoder
from jaxembed.hf.sentence_transformers import DOC_PROMPTS, QUERY_PROMPTS, pick_prompt
from jaxembed.packing import bucket, length_buckets
from jaxembed.tokenizer import load_tokenizer


def read_records(paths: Sequence[str]) -> list[dict]:
    return [s[i] for s in open_sources(list(paths)) for i in range(len(s))]


def pairs_of(records: list[dict]) -> list[tuple[str, str]]:
    """Every (query, candidate) pair, row by row: the positive, then each negative."""
    return [(r["query"], t) for r in records for t in (r["positive"], *r["negatives"])]


class CrossEncoderScorer:
    """Relevance logits of (query, passage) pairs, padded to length buckets, data-parallel."""

    def __init__(self, path: str, max_length: int, batch_size: int):
        self.model, self.head = load_cross_encoder(path)
        self.tokenizer = load_tokenizer(path)
        limit = self.model.config.max_tokens
        self.max_length = min(max_length, limit, self.tokenizer.model_max_length)
        self.mesh = sharding.make_mesh(devices=jax.local_devices())
        n = sharding.data_parallel_size(self.mesh)
        self.batch_size = -(-batch_size // n) * n
        model_def, model_params = nnx.split(self.model)
        head_def, head_params = nnx.split(self.head)
        self.params = jax.device_put((model_params, head_params), sharding.replicated(self.mesh))

        def score(params, ids, mask, types):
            model = nnx.merge(model_def, params[0])
            hidden = model(ids, mask, types)
            return nnx.merge(head_def, params[1])(hidden, mask)

        self._score = jax.jit(score)

    def __call__(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        enc = self.tokenizer(
            [q for q, _ in pairs],
            [p for _, p in pairs],
            truncation="longest_first",
            max_length=self.max_length,
        )
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        if types is None or getattr(self.model.config, "type_vocab_size", 0) < 2:
            types = [[0] * len(x) for x in ids]  # a model without segment embeddings
        order = np.argsort([-len(x) for x in ids], kind="stable")
        buckets = length_buckets(self.max_length)
        pad = self.tokenizer.pad_token_id or 0
        out = np.zeros(len(pairs), np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = bucket(len(ids[rows[0]]), buckets)
            a = np.full((self.batch_size, length), pad, np.int32)
            t = np.zeros_like(a)
            m = np.zeros_like(a)
            for r, i in enumerate(rows):
                a[r, : len(ids[i])], t[r, : len(ids[i])], m[r, : len(ids[i])] = ids[i], types[i], 1
            placed = [jax.device_put(x, sharding.batch_sharding(self.mesh, 2)) for x in (a, m, t)]
            out[rows] = np.asarray(self._score(self.params, *placed))[: len(rows)]
        return out


def bi_encoder_scores(path: str, records, batch_size, query_prompt, passage_prompt) -> list:
    """Cosine of each query with its positive and negatives (each passage encoded once)."""
    enc = jaxembed.load(path).use_mesh(sharding.make_mesh(devices=jax.local_devices()))
    q_text = pick_prompt(enc.prompts, query_prompt, QUERY_PROMPTS, path)
    p_text = pick_prompt(enc.prompts, passage_prompt, DOC_PROMPTS, path)
    queries = enc.encode([r["query"] for r in records], batch_size=batch_size, prompt=q_text)
    texts = sorted({t for r in records for t in (r["positive"], *r["negatives"])})
    index = {t: i for i, t in enumerate(texts)}
    passages = enc.encode(texts, batch_size=batch_size, prompt=p_text)
    return [
        [float(queries[k] @ passages[index[t]]) for t in (r["positive"], *r["negatives"])]
        for k, r in enumerate(records)
    ]


def score(
    teacher: str,
    inputs: Sequence[str],
    out: str,
    *,
    batch_size: int = 32,
    max_length: int = 512,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
) -> dict:
    """Scores every row of ``inputs`` with ``teacher``; writes ``out`` (JSONL)."""
    t0 = time.perf_counter()
    records = read_records(inputs)
    if (Path(teacher) / "config.json").exists() and is_cross_encoder(teacher):
        kind = "cross-encoder"
        flat = CrossEncoderScorer(teacher, max_length, batch_size)(pairs_of(records))
        cuts = np.cumsum([0] + [1 + len(r["negatives"]) for r in records])
        scores = [flat[a:b].tolist() for a, b in itertools.pairwise(cuts)]
    else:
        kind = "bi-encoder"
        scores = bi_encoder_scores(teacher, records, batch_size, query_prompt, passage_prompt)
    with atomic_open(Path(out), "w") as f:
        for r, s in zip(records, scores, strict=True):
            f.write(json.dumps(dict(r, scores=s), ensure_ascii=False) + "\n")
    pairs = sum(len(s) for s in scores)
    return {
        "teacher": kind,
        "rows": len(records),
        "pairs": pairs,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(
        "jaxembed.score",
        "Score each training row's positive and negatives with a teacher (a cross-encoder "
        "folder or any embedding model), for distillation; writes the records with 'scores'.",
        multihost=False,
    )
    p.add_argument("--teacher", required=True, metavar="DIR", help="teacher model folder or run")
    p.add_argument("--input", required=True, nargs="+", metavar="FILE", help="training records")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512, help="cross-encoder pair tokens")
    p.add_argument("--query-prompt", default=None, help="bi-encoder: the query prompt's name")
    p.add_argument("--passage-prompt", default=None, help="bi-encoder: the passages' prompt")
    return cli.main(p, _main, argv)


def _main(args) -> int:
    info = score(
        args.teacher,
        args.input,
        args.out,
        batch_size=args.batch_size,
        max_length=args.max_length,
        query_prompt=args.query_prompt,
        passage_prompt=args.passage_prompt,
    )
    print(
        f"wrote {args.out}: {info['rows']:,} rows, {info['pairs']:,} pairs scored by the "
        f"{info['teacher']} in {info['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
