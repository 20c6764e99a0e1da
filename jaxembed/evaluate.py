"""``python -m jaxembed.evaluate``: retrieval metrics of a model on BEIR-layout data, or MTEB.

::

    python -m jaxembed.evaluate --model MODEL --data DIR [--split dev] [--out OUT] [--mteb]
        [--quantization binary|int8 [--rescore-multiplier 4]]

The model is a Hugging Face / sentence-transformers folder or a training run (``jaxembed.
load``), or, with ``--backend sentence-transformers``, the PyTorch reference. Search and
metrics are `jaxembed.retrieval`'s (what the training loop logs too); ``--mteb`` scores
the same rankings with MTEB instead (`jaxembed.mteb_adapter`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxembed import cli, quantization
from jaxembed.beir import EvalDataError, find_sets, load_beir
from jaxembed.choices import DTYPES, QUANTIZATIONS
from jaxembed.encoder import load
from jaxembed.files import atomic_write_text, hf_offline
from jaxembed.hf.sentence_transformers import read_st_config
from jaxembed.retrieval import (
    SPARSITY,
    encoder_fns,
    evaluate_beir,
    format_table,
    is_sparse,
    mean_over_sets,
    on_mesh,
    reuse_last,
    scored_by,
    st_encoder_fns,
)


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(
        "jaxembed.evaluate",
        (
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
        choices=DTYPES,
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
    p.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="also score a quantized index of the same embeddings (jaxembed.quantization): "
        "binary (Hamming) or int8 (ranges from the model folder's "
        f"{quantization.RANGES_FILE} if it has one, else calibrated on each corpus), alone "
        "and rescored by the float queries (default: none)",
    )
    p.add_argument(
        "--rescore-multiplier",
        type=int,
        default=4,
        metavar="M",
        help="with --quantization: rescore the index's best M x 100 candidates (default: 4)",
    )
    p.add_argument("--out", metavar="DIR", help="write metrics.json (and MTEB's files) here")
    return p


def _load_backend(args):
    if args.backend == "sentence-transformers":
        import sentence_transformers

        # A sparse folder is a SparseEncoder: as a SentenceTransformer it would load dense.
        cls = getattr(sentence_transformers, read_st_config(args.model).model_class)
        model = cls(args.model, device="cpu", local_files_only=True)
        if args.max_length:
            model.max_seq_length = args.max_length
        return model
    return on_mesh(
        load(args.model, dtype=args.dtype, packing=args.packing, max_length=args.max_length)
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns ``{"sets": {name: metrics}, "mean": metrics, ...}``."""
    return cli.main(_parser(), _main, argv)


def _main(args) -> dict:
    # Multi-host: every process encodes (the batches are split over all hosts' devices) and
    # scores; process 0 prints and writes.
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    writer = jax.process_index() == 0
    hf_offline()
    sets = [s for folder in args.data for s in find_sets(folder)]
    if len({s.name for s in sets}) < len(sets):
        raise EvalDataError(f"--data: two sets share a folder name: {[str(s) for s in sets]}")
    data = {p.name: load_beir(p, args.split) for p in sets}
    model = _load_backend(args)
    if args.mteb and scored_by(model) == "MaxSim":
        raise ValueError(f"{args.model}: --mteb scores one vector per text; a multi-vector "
                         "model is evaluated without it (exact MaxSim search)")  # fmt: skip
    make_fns = encoder_fns if args.backend == "jax" else st_encoder_fns
    try:  # an undefined prompt name stops here, before anything is encoded
        q_fn, d_fn, prompts = make_fns(model, args.query_prompt, args.doc_prompt, args.batch_size)
    except ValueError as e:
        raise ValueError(f"{args.model}: {e}") from None
    out = Path(args.out) if args.out and writer else None

    if args.mteb:
        # Not at the top: the adapter imports mteb, and with it torch and datasets, which
        # only --mteb needs.
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
        quantized = dict(
            quantization=args.quantization,
            ranges=quantization.load_ranges(args.model),
            rescore_multiplier=args.rescore_multiplier,
            sparse=is_sparse(model),
        )
        per_set = {
            name: evaluate_beir(q_fn, d_fn, None, args.split, data=d, **quantized)
            for name, d in data.items()
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
    q = args.quantization
    if q != "none" and not args.mteb:
        result["quantized"] = {
            how: mean_over_sets(per_set, (q, how)) for how in ("index", "rescored")
        }
    if not writer:
        return result
    print(format_table(per_set))
    if active := {m: v for m, v in result["mean"].items() if m in SPARSITY}:
        print("sparse vectors, mean non-zero dimensions: " + ", ".join(
            f"{m.split('_')[0]} {v:.1f}" for m, v in active.items()))  # fmt: skip
    for how in result.get("quantized", {}):
        print(
            f"\n{q} index" + (f", rescored x{args.rescore_multiplier}" if how == "rescored" else "")
        )
        print(format_table({name: r[q][how] for name, r in per_set.items()}))
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", text + "\n")
        print(f"wrote {out / 'metrics.json'}")
    else:
        print(text)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
