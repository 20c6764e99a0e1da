"""Retrofit all-MiniLM-L6-v2 on Debian data: sentence-transformers vs jaxembed at equal wall time.

    .venv/bin/python -m examples.debian_retrofit.bench [--data data/debian] [--pairs 20000]
        [--out runs/retrofit] [--recipes base,st,jax-st,jax-best]
        [--positives full,body,mix] [--seeds 0,1,2] [--fresh] [--test]

(a) and (c) run once per positives format (``--positives``, default config.py's
``POSITIVES``) and seed; the table gives the mean over seeds and half the spread.

Recipes (each trains from all-MiniLM-L6-v2, on this machine, one after another):

- ``st`` (a): sentence-transformers' standard fine-tune with its own trainer:
  MultipleNegativesRankingLoss, the first ``--pairs`` rows of the positives' file
  (config.py's ``PAIR_FILES``: a translated summary in da/it/fr/de/es/pt_BR -> the English
  description, its body, or a coin per row; train packages only), batch 64, max length
  128, lr 5e-5, 10% warmup then linear decay, one epoch. Its wall time (data set built +
  ``trainer.train()``) is the budget of the jaxembed recipe on the same positives and seed.
- ``jax-st`` (b): the same data and settings in jaxembed (``config.py:st`` here),
  one epoch, once (the first positives and seed): a correctness check, its scores should
  land within +-0.01 of (a), and the speed (c) is sized from.
- ``jax-best`` (c): jaxembed's recipe (``config.py`` here, run through ``retrofit.sh``'s
  pairs, mine and train stages): negatives mined with
  ``jaxembed.mine`` (the base model as teacher, NV-Retriever's positive-aware rule), used
  as the recipe says (as in-batch candidates by grouping linked rows, or as extra
  passages), then training until (a)'s wall time is spent (``train.time_limit_minutes``);
  taking its pairs and mining count in the budget. Its row and step counts are set from
  (b)'s measured time per example so the schedule ends near the budget.
- ``base``: the untrained model.

Every model is scored the same way, with `jaxembed.evaluate`'s exact search and metrics at
max length 256 (the base model's): dev packages only, on both proxies. Zero-shot:
``dev/xling-{cs,ja,ko,pl,ru,uk,zh_CN}`` (queries in languages never trained on -> English
descriptions that open with the synopsis, the query's translation); trained:
``dev/xling-{da,de,es,fr,it,pt_BR}``; "body": the same on ``dev/xling-body-*``, whose
documents are the description body alone (retrieval by what a document says). The table
gives the unweighted mean nDCG@10 over the languages of each group. Results are kept per
recipe, positives and seed in OUT/results.json, so a cell can be rerun alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from examples.debian_retrofit.config import (
    PAIR_FILES,
    POSITIVES,
    TRAINED_LANGS,
    ZERO_SHOT_LANGS,
    get_config,
    minilm_path,
)
from jaxembed.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

BATCH, MAX_LEN, LR, WARMUP = 64, 128, 5e-5, 0.1
EVAL_MAX_LEN = 256
RECIPES = ("base", "st", "jax-st", "jax-best")


def take_rows(src: Path, n: int, dst: Path) -> Path:
    """The first ``n`` rows of ``src`` without instructions (all-MiniLM-L6-v2 has none).

    The Debian builder writes its rows language-balanced, so a prefix is a balanced sample.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    taken = 0
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for line in f:
            if taken == n:
                break
            r = json.loads(line)
            r.pop("instruction", None)
            g.write(json.dumps(r, ensure_ascii=False) + "\n")
            taken += 1
    if taken < n:
        raise SystemExit(f"{src} has {taken} rows, {n} were asked for")
    return dst


def write_pairs(data: Path, n: int, positives: str, out: Path) -> list[dict]:
    """(a)'s and (b)'s pairs: the first ``n`` cross-lingual rows with ``positives``
    (`PAIR_FILES`), written to ``out``."""
    take_rows(data / "train" / f"{PAIR_FILES[positives]}.jsonl", n, out)
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


PROXIES = {"": "xling", "_body": "xling-body"}  # group suffix -> eval set kind


def evaluate(
    model: str, data: Path, quantization: str = "none", split: str = "dev", zero_shot_only=False
) -> dict:
    """nDCG@10 per language on the ``split`` sets of both proxies, and the group means:
    ``zero_shot`` / ``trained`` on ``xling-*`` (documents open with the English synopsis,
    the query's translation: translation matching), ``zero_shot_body`` / ``trained_body``
    on ``xling-body-*`` (the description body alone: retrieval by what it says). With
    ``quantization`` (binary / int8) also the same groups of a quantized index, alone
    (``GROUP/index``) and rescored by the float queries (``GROUP/rescored``). With
    ``zero_shot_only``, the zero-shot languages alone (a multi-vector model's exact
    MaxSim over 4,000 documents costs minutes a language on this host's 2 cores)."""
    import jaxembed
    from jaxembed.retrieval import encoder_fns, evaluate_beir, reuse_last

    enc = jaxembed.load(model, max_length=EVAL_MAX_LEN)
    queries, docs, _ = encoder_fns(enc, batch_size=64)
    hows = ("", "/index", "/rescored") if quantization != "none" else ("",)
    out = {f"ndcg@10{how}": {} for how in hows}
    for suffix, kind in PROXIES.items():
        corpus = reuse_last(docs)  # every set of a kind searches the same English corpus
        for lang in ZERO_SHOT_LANGS + (() if zero_shot_only else TRAINED_LANGS):
            r = evaluate_beir(
                queries, corpus, data / split / f"{kind}-{lang}", split, quantization=quantization
            )
            for how in hows:
                m = r[quantization][how[1:]] if how else r
                out[f"ndcg@10{how}"][f"{kind}-{lang}"] = m["ndcg@10"]
        groups = {"zero_shot": ZERO_SHOT_LANGS, "trained": TRAINED_LANGS}
        for group, langs in list(groups.items())[: 1 if zero_shot_only else 2]:
            for how in hows:
                scores = [out[f"ndcg@10{how}"][f"{kind}-{lang}"] for lang in langs]
                out[group + suffix + how] = sum(scores) / len(scores)
    return out


def run_st(pairs: list[dict], out: Path, seed: int) -> dict:
    """(a): sentence-transformers' trainer, one epoch; returns its time and examples."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    t0 = time.perf_counter()
    model = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    model.max_seq_length = MAX_LEN
    dataset = Dataset.from_list([{"anchor": r["query"], "positive": r["positive"]} for r in pairs])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        warmup_steps=WARMUP,  # a float: the ratio of the steps
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_steps=20,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=MultipleNegativesRankingLoss(model, scale=20.0),
    )
    trainer.train()
    seconds = time.perf_counter() - t0
    model.max_seq_length = EVAL_MAX_LEN  # saved as the base model's, like the jaxembed runs
    model.save(str(out / "model"))
    steps = trainer.state.global_step
    return {
        "seconds": seconds,
        "steps": steps,
        "examples": steps * BATCH,
        "torch_threads": torch.get_num_threads(),
        "model": str(out / "model"),
    }


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Runs ``cmd`` with its output in ``log``; returns its wall time; fails loudly."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False
        )
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}), {log}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def last_metrics(workdir: Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"loss"' in x][-1]


def run_jax_st(pairs_file: Path, n_pairs: int, out: Path, seed: int) -> dict:
    """(b): config.py:st on (a)'s pairs, one epoch, through the CLI."""
    steps = n_pairs // BATCH
    workdir = out / "run"
    cmd = [
        sys.executable,
        "-m",
        "jaxembed.train",
        f"--config={HERE / 'config.py'}:st",
        f"--workdir={workdir}",
        f"--config.data.train=('{pairs_file}',)",
        f"--config.train.steps={steps}",
        f"--config.optim.warmup_steps={math.ceil(WARMUP * steps)}",  # as the HF Trainer
        f"--config.train.seed={seed}",
    ]
    seconds = run_logged(cmd, out / "train.log")
    m = last_metrics(workdir)
    return {
        "seconds": seconds,
        "steps": int(m["step"]),
        "examples": int(m["step"]) * BATCH,
        "tokens_per_s": m["tokens_per_s"],
        "model": str(workdir),
    }


def run_jax_best(out: Path, budget_s: float, jax_st: dict, positives: str, seed: int) -> dict:
    """(c): retrofit.sh's pairs -> mine -> train, all inside ``budget_s``."""
    recipe = get_config().data
    negatives = recipe.num_negatives.retrieval
    mined = negatives > 0 or recipe.group_size > 0
    # Sized from (b)'s measured time per example: each hard negative adds ~0.9x (b)'s
    # tokens to an example, and mining costs about a forward pass per row (~0.4x).
    per_example = jax_st["seconds"] / jax_st["examples"]
    cost = 1 + 0.9 * negatives
    mine_cost = 0.4 if mined else 0.0
    rows = int(budget_s / (per_example * (cost + mine_cost)))
    steps = max(10, rows // BATCH)  # one epoch of the rows
    env = {
        **os.environ,
        "PY": sys.executable,
        "SEED": str(seed),
        "POSITIVES": positives,
        "ROWS": str(rows),
        "STEPS": str(steps),
        # The script's training invocation gets what is left of the budget after mining.
        "STAGES": "pairs mine" if mined else "pairs",
        "TRAIN_DATA": str(out / ("mined.jsonl" if mined else "pairs.jsonl")),
    }
    t0 = time.perf_counter()
    run_logged(["bash", str(HERE / "retrofit.sh"), str(out)], out / "prepare.log", env)
    mine_s = time.perf_counter() - t0
    left = budget_s - mine_s
    # Less the ~20 s that the final checkpoint and the process exit take after the limit.
    env |= {"STAGES": "train", "TIME_LIMIT": f"{max((left - 20) / 60, 0.1):.3f}"}
    run_logged(["bash", str(HERE / "retrofit.sh"), str(out)], out / "train.log", env)
    done = int(last_metrics(out / "run")["step"])
    return {
        "seconds": time.perf_counter() - t0,
        "data_seconds": mine_s,
        "rows": rows,
        "steps": done,
        "planned_steps": steps,
        "train_args": os.environ.get("TRAIN_ARGS", ""),  # a variant's flags (retrofit.sh)
        "examples": done * BATCH,
        "model": str(out / "run"),
    }


def key_of(recipe: str, positives: str = "", seed: int = 0) -> str:
    """A result's key: ``base``, or ``recipe/positives/seed`` (e.g. ``st/mix/1``)."""
    return recipe if recipe == "base" else f"{recipe}/{positives}/{seed}"


GROUPS = ("zero_shot", "trained", "zero_shot_body", "trained_body")
NAMES = {
    "base": "all-MiniLM-L6-v2 (no training)",
    "st": "(a) sentence-transformers, MNRL",
    "jax-st": "(b) jaxembed, (a)'s data and settings",
    "jax-best": "(c) jaxembed recipe",
}


def mean_spread(xs: list[float]) -> str:
    """The mean, and with two or more seeds the spread (max - min)."""
    m = sum(xs) / len(xs)
    return f"{m:.4f}" if len(xs) == 1 else f"{m:.4f} ±{(max(xs) - min(xs)) / 2:.4f}"


def fmt_table(results: dict, split: str = "eval") -> str:
    """One row per recipe and positives: the mean over seeds (± half the spread) of each
    group's nDCG@10 on both proxies, on dev (``eval``) or on test (``test``)."""
    rows = [
        "| recipe | positives | seeds | wall time | examples | zero-shot | trained "
        "| zero-shot body | trained body |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells: dict[tuple[str, str], list[dict]] = {}
    for key, r in results.items():
        if isinstance(r, dict) and split in r:
            recipe, positives = [*key.split("/"), "-"][:2]
            cells.setdefault((recipe, positives), []).append(r)
    for (recipe, positives), runs in sorted(cells.items(), key=lambda c: RECIPES.index(c[0][0])):
        wall = "-" if "seconds" not in runs[0] else (
            f"{sum(r['seconds'] for r in runs) / len(runs) / 60:.1f} min"
        )  # fmt: skip
        seen = "-" if "examples" not in runs[0] else f"{runs[0]['examples']:,}"
        scores = [mean_spread([r[split][g] for r in runs]) for g in GROUPS]
        rows.append(
            f"| {NAMES[recipe]} | {positives} | {len(runs)} | {wall} | {seen} | "
            + " | ".join(scores)
            + " |"
        )
    return "\n".join(rows)


def budget_of(results: dict, positives: str, seed: int) -> float:
    """(c)'s budget: the wall time of (a) on the same positives and seed, else (a)'s mean."""
    if (st := results.get(key_of("st", positives, seed))) is not None:
        return st["seconds"]
    times = [r["seconds"] for k, r in results.items() if k.startswith("st/")]
    if not times:
        raise SystemExit("jax-best needs an st result (its budget): add st to --recipes")
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "debian")
    p.add_argument("--pairs", type=int, default=20000, help="(a)'s and (b)'s training pairs")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "retrofit")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"subset of {','.join(RECIPES)}")
    p.add_argument(
        "--positives",
        default=POSITIVES,
        help="comma-separated positive formats for (a) and (c): full (English synopsis + "
        "body), body (the body alone), mix (a coin per row); (b) runs on the first",
    )
    p.add_argument("--seeds", default="0", help="comma-separated training seeds of (a) and (c)")
    p.add_argument("--fresh", action="store_true", help="rerun recipes that have results")
    p.add_argument(
        "--test",
        action="store_true",
        help="then read the test split, once: score every finished model without a test "
        "figure on the test sets (a model's figure is never recomputed) and print their "
        "table; only when the recipe is fixed, and nothing may be chosen on it",
    )
    args = p.parse_args()
    chosen = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if bad := sorted(set(chosen) - set(RECIPES)):
        raise SystemExit(f"--recipes: unknown {bad}; choose from {list(RECIPES)}")
    formats = [x.strip() for x in args.positives.split(",") if x.strip()]
    if bad := sorted(set(formats) - set(PAIR_FILES)):
        raise SystemExit(f"--positives: unknown {bad}; choose from {list(PAIR_FILES)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if results.get("pairs", args.pairs) != args.pairs:
        raise SystemExit(
            f"{results_file} holds results for --pairs {results['pairs']}; use another --out"
        )
    if any(k in results for k in ("st", "jax-st", "jax-best")):
        raise SystemExit(f"{results_file}: results of an older bench (one seed); use another --out")
    results["pairs"] = args.pairs

    def run(key: str, out: Path, positives: str, seed: int) -> dict:
        pairs_file = args.out / f"pairs-{positives}.jsonl"
        if key == "base":
            return {"model": minilm_path()}
        if key == "st":
            return run_st(write_pairs(args.data, args.pairs, positives, pairs_file), out, seed)
        if key == "jax-st":
            write_pairs(args.data, args.pairs, positives, pairs_file)
            return run_jax_st(pairs_file, args.pairs, out, seed)
        speed = next((r for k, r in results.items() if k.startswith("jax-st/")), None)
        if speed is None:
            raise SystemExit("jax-best needs a jax-st result (its speed): add jax-st to --recipes")
        return run_jax_best(out, budget_of(results, positives, seed), speed, positives, seed)

    todo = []
    for recipe in chosen:
        if recipe == "base":
            todo.append(("base", "", 0))
        elif recipe == "jax-st":  # a correctness check and the speed (c) is sized from
            todo.append((recipe, formats[0], seeds[0]))
        else:
            todo += [(recipe, f, s) for f in formats for s in seeds]
    for recipe, positives, seed in todo:
        key = key_of(recipe, positives, seed)
        if key in results and not args.fresh:
            print(f"{key}: kept from {results_file}")
            continue
        print(f"{key}: running", flush=True)
        out = args.out / key
        out.mkdir(parents=True, exist_ok=True)
        r = run(recipe, out, positives, seed)
        r["eval"] = evaluate(r["model"], args.data)
        results[key] = r
        atomic_write_text(results_file, json.dumps(results, indent=1) + "\n")
        print(f"{key}: {json.dumps({k: v for k, v in r.items() if k != 'eval'})}")
        print(f"{key}: " + " ".join(f"{g} {r['eval'][g]:.4f}" for g in GROUPS), flush=True)
    if args.test:
        for key, r in results.items():
            if isinstance(r, dict) and "eval" in r and "test" not in r:
                print(f"{key}: reading the test split", flush=True)
                r["test"] = evaluate(r["model"], args.data, split="test")
                atomic_write_text(results_file, json.dumps(results, indent=1) + "\n")
    print()
    print(fmt_table(results))
    if any(isinstance(r, dict) and "test" in r for r in results.values()):
        print("\nTest split (read once; nothing chosen on it):\n")
        print(fmt_table(results, "test"))
    print(
        f"\nbudget of (c): (a)'s wall time on the same positives and seed; (a)/(b) pairs: "
        f"{args.pairs}"
    )


if __name__ == "__main__":
    main()
