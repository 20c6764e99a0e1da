"""``python -m jaxembed.train``: contrastive training, from the config to the saved run.

`main` reads top to bottom: the mesh, the run's model files and data, the step
(`jaxembed.step`: the loss one jump from the loop, in `step.train_step`), the state restored
or initialised, evaluation before, the loop (agree on the batch, step, log, evaluate,
checkpoint, re-mine; preemption and the time limit on ``if`` lines), evaluation after.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging
from flax import nnx

from jaxembed import checkpoint, distributed, hf, mining, remine, retrieval, sharding
from jaxembed import cli as jaxembed_cli
from jaxembed import config as config_lib
from jaxembed import dry_run as dry_runs
from jaxembed import step as step_lib
from jaxembed.config import validate
from jaxembed.data import pipeline, readers
from jaxembed.data.pipeline import NO_STOP, PREEMPTED, TIME_LIMIT
from jaxembed.export_meta import run_meta, trained_prompts
from jaxembed.files import local_copy, run_path
from jaxembed.hf.sentence_transformers import STConfig, read_st_config
from jaxembed.models import attention as attention_lib
from jaxembed.models import lora
from jaxembed.retrieval import Evaluator, on_mesh
from jaxembed.run_log import Progress, RunLog, check_finite
from jaxembed.tokenizer import expansion_token, load_tokenizer
from jaxembed.trained_model import (
    abstract_head,
    abstract_model,
    initial_head,
    lora_spec,
    with_adapters,
)
from jaxembed.workdir import MODEL_DIR, PARAMETERS, base_folder, prepare_model_dir


def main(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains per ``config`` in ``workdir``, resuming from its last checkpoint if any.

    Returns the last logged metrics and the evaluations before and after training.
    """
    started = time.perf_counter()  # train.time_limit_minutes counts from here
    config, workdir = validate(config), shared_workdir(workdir, config)
    log = RunLog(workdir, jax.process_index() == 0, config.log.tensorboard)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    log.print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
              f"{jax.process_count()} processes")  # fmt: skip
    chunk = config.train.gradcache_chunk if config.train.gradcache else 0
    log.print(sharding.rows_per_device(mesh, config.train.global_batch, chunk))
    model_dir, st, pooling, builder, meta = open_run(config, workdir, log)
    started_state = start_state(config, workdir, model_dir, mesh, st, pooling, meta, log)
    step, mngr, state, frozen, data_pos, start = started_state
    packing = step_lib.row_packing(config, mesh)
    count = jax.process_count()
    exchange = distributed.gather if count > 1 else None
    global_rows = (lambda rows: sharding.local_rows(mesh, rows)) if count > 1 else None

    def live(params) -> dict:
        """The live parameters as the encoder takes them (a LoRA run's joined to its base)."""
        return params if frozen is None else {**params, "model": lora.join(frozen, params["lora"])}

    model = nnx.merge(step.graphdef, live(state.params)["model"])
    head = None if step.head is None else nnx.merge(step.head, state.params["head"])
    prompts = trained_prompts(meta)
    evaluator = Evaluator(config, model, load_tokenizer(model_dir), pooling, st, prompts, head)
    batches = Batches(config, workdir, builder, evaluator, mesh, log)
    data_iter = batches.start(data_pos["next_batch"] if data_pos else 0, live(state.params))
    results: dict = {}
    if start == 0 and evaluator.sets:
        results["before"] = log.eval(0, "eval before training", evaluator(live(state.params)))

    # --- the loop -------------------------------------------------------------------------
    progress = Progress(config.train.global_batch, config.train.steps, start)
    at, last, compiled = start, {}, set()  # compiled: the (task, row shapes) met
    time_limit = 60 * config.train.time_limit_minutes or float("inf")
    with stop_signals() as signals, checkpoint.saves_reported(mngr):
        try:
            while at < config.train.steps:
                request = PREEMPTED if signals else NO_STOP
                if time.perf_counter() - started >= time_limit:
                    request = max(request, TIME_LIMIT)
                host = next(data_iter)
                batch, tokens, request = pipeline.agree(
                    host, request, packing, exchange, global_rows
                )
                stopping, out_of_time = request == PREEMPTED, request == TIME_LIMIT
                batch = sharding.from_process_local(batch, mesh)
                state, metrics = run_step(step, state, batch, host["task"], frozen, compiled, log)
                at += 1
                progress.add(host["task"], metrics["loss"], tokens)
                if at % config.log.every == 0 or at == config.train.steps or out_of_time:
                    last = progress.report(at, metrics, log)
                evaluated = None
                if config.eval.every and at % config.eval.every == 0 and evaluator.sets:
                    evaluated = log.eval(at, f"eval at step {at}", evaluator(live(state.params)))
                ending = at == config.train.steps or stopping or out_of_time
                if at % config.ckpt.every == 0 or ending:
                    check_finite(jax.device_get(metrics), at)
                    checkpoint.check_space(mngr, checkpoint.tree_bytes(step.abstract), at)
                    data, force = {"next_batch": at}, stopping or out_of_time
                    log.flush()  # on a bucket, the records up to this step go with it
                    checkpoint.save(mngr, at, state, data, meta, evaluated, force)
                if batches.remining and at % batches.remining.every == 0 and not ending:
                    data_iter = batches.start(at, live(state.params), fresh=True)  # after the save
                if stopping:
                    mngr.wait_until_finished()
                    why = signals[0] if signals else "another host's stop signal"
                    log.print(f"{why}: saved step {at}, exiting")
                    return results | {"stopped": why, "last": last, "step": at}
                if out_of_time:
                    log.print(f"time limit of {config.train.time_limit_minutes:g} min reached: "
                              f"training ends at step {at} of {config.train.steps}")  # fmt: skip
                    results["time_limit_step"] = at
                    break
            if evaluator.sets:
                results["after"] = log.eval(
                    at, "eval after training", evaluator(live(state.params))
                )
            mngr.wait_until_finished()
        finally:
            mngr.close()
            log.close()
    return results | {"last": last, "step": at}


def shared_workdir(workdir, config):
    """``workdir``, made, a folder every host sees (a local path or gs://BUCKET/PATH),
    holding the same config everywhere."""
    workdir = run_path(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_dir(workdir)
    distributed.check_same("the run config", config.to_json_best_effort(sort_keys=True))
    return workdir


def open_run(config, workdir, log: RunLog):
    """The run's own copy of the model's files (local: on a bucket, this host's copy of
    it), its sentence-transformers settings and pooling, this host's batch builder and the
    run's meta (what an export needs)."""
    if jax.process_index() == 0:
        m, output = config.model, config_lib.output_type(config)
        prepare_model_dir(m.path, workdir / MODEL_DIR, m.pooling, **output)
    distributed.barrier("prepare_model_dir")
    model_dir = local_copy(workdir / MODEL_DIR)
    st = read_st_config(model_dir)
    pooling = config.model.pooling or st.pooling or "mean"
    if st.query_expansion:  # before any batch: a tokenizer without a mask token stops here
        expansion_token(load_tokenizer(model_dir))
    if st.query_expansion and config.data.max_query_length != st.query_expansion:
        raise ValueError(
            f"config.data.max_query_length={config.data.max_query_length}: queries are "
            f"{st.query_expansion} tokens with the model's query expansion; set it to that"
        )
    sources, builder = open_data(config, model_dir, log, st)
    return model_dir, st, pooling, builder, run_meta(config, model_dir, pooling, sources)


def start_state(config, workdir, model_dir: Path, mesh, st, pooling: str, meta: dict, log):
    """``(step, checkpoint manager, state, frozen base, data position, start step)``: the step
    built from the model's shape, the state restored from the latest checkpoint or
    initialised from the model folder (the weights are read only then; a LoRA run reads its
    frozen base on every start, its checkpoints hold the adapters only)."""
    adapters = lora_spec(config)
    model = abstract_model(model_dir, config.model.dtype, config.model.remat, adapters,
                               config.model.attention)  # fmt: skip
    check_lengths(config, model.config.max_tokens, config.model.path)
    buckets = pipeline.PipelineConfig.from_config(config)
    dropout = config.train.dropout and attention_lib.probs_dropout(model.config)
    lengths, packed = (*buckets.buckets("query"), *buckets.buckets("passage")), config.train.packing
    log.print(attention_lib.describe_model(model, lengths, packed, dropout))
    head = abstract_head(model_dir, model.config.hidden_size)  # Dense layers, if any
    step = step_lib.make_step(config, mesh, model, head, pooling)  # checks batch vs mesh

    def load_model():  # from the folder the run started from, as a restore reads a LoRA base
        dtype = jnp.dtype(config.model.dtype)
        mlm_head = getattr(model.config, "add_mlm_head", False)  # SPLADE's (the run's folder)
        loaded = hf.load_model(
            base_folder(model_dir), dtype=dtype, remat=config.model.remat, mlm_head=mlm_head
        )
        return with_adapters(loaded, adapters, config.train.seed)

    loaded = load_model() if adapters else None
    frozen = step.frozen(loaded) if adapters else None

    def init():
        source = loaded or load_model()
        head = initial_head(model_dir, st, source.config.hidden_size, config.train.seed)
        return step.init(source, head)

    mngr = checkpoint.manager(
        workdir, keep=config.ckpt.keep, keep_best=config.ckpt.keep_best,
        best_metric=f"eval/{config.eval.best_metric}" if config.ckpt.keep_best else "",
        async_save=config.ckpt.async_save,
    )  # fmt: skip
    state, data_pos, saved_meta, start = checkpoint.restore_or_init(
        mngr, init, step.abstract, config.ckpt.fallback
    )
    if start:
        current, keys = json.loads(config.to_json_best_effort()), config_lib.RESUME_KEYS
        allow = config.train.allow_config_change
        if warning := checkpoint.check_resumable(saved_meta, current, keys, allow, workdir):
            log.print(warning)
    log.forget_after(start)
    log.print("resumed from step" if start else "initialised from", start or config.model.path)
    shapes = nnx.state(model)
    table = sharding.describe(shapes, sharding.state_shardings(shapes, mesh))
    if jax.process_index() == 0:
        (workdir / PARAMETERS).write_text(table + "\n")
    log.print(f"{table.splitlines()[-1]}; every tensor's shape and sharding: {PARAMETERS}")
    return step, mngr, state, frozen, data_pos, start


class Batches:
    """The run's batches from a step on: a pure function of their index (resuming is starting
    there), with the negatives of the last re-mining, if the run re-mines."""

    def __init__(self, config, workdir, builder, evaluator, mesh, log):
        self.config, self.workdir, self.builder = config, workdir, builder
        self.evaluator, self.mesh, self.log = evaluator, mesh, log
        self.remining = remine.Settings.from_config(config)
        if self.remining is not None:  # a sparse or multi-vector model: no cosine threshold
            rules, scores = self.remining.rules, retrieval.scored_by(evaluator.encoder)
            mining.check_scores(rules, scores, config.model.path, "config.mine.max_score")

    def start(self, step: int, live_params: dict, fresh: bool = False):
        """The iterator from ``step``; the pool of the last re-mining is read back, or mined
        now (``fresh``, or a resume at a re-mining step whose pool was never saved)."""
        if self.remining is not None and step >= self.remining.every:
            mined_at = remine.last_remine_step(step, self.remining.every)
            pool = None if fresh else remine.Pool.load(self.workdir, mined_at)
            if pool is None and mined_at != step:
                raise FileNotFoundError(
                    f"{self.workdir}/{remine.POOL_DIR}/{mined_at}.npz: the negatives re-mined "
                    f"at step {mined_at} are missing, so step {step} cannot resume exactly"
                )
            if pool is None:
                on_mesh(self.evaluator.encoder, self.mesh).set_params(live_params)
                pool = remine.remine(self.evaluator.encoder, self.builder, self.remining, step,
                                     self.config.eval.batch_size, self.log)  # fmt: skip
                if jax.process_index() == 0:
                    pool.save(self.workdir)
            self.builder.remined = (pool.texts, pool.negatives)
        dataset = pipeline.make_dataset(self.builder, step)
        return pipeline.make_iterator(dataset, self.config.data.workers, self.config.data.prefetch)


def run_step(step, state, batch: dict, task: str, frozen, compiled: set, log):
    """``step(...)``; the first step of each (task, row shapes) compiles, which can take
    minutes on an accelerator: it is announced, with the shapes, and timed."""
    towers = [t for t in ("query", "pos", "neg") if f"{t}_ids" in batch]
    shape = (task, *(batch[f"{t}_ids"].shape for t in towers))
    if shape in compiled:
        return step(state, batch, task, frozen)
    rows = ", ".join(f"{t} {s[0]}x{s[1]}" for t, s in zip(towers, shape[1:], strict=True))
    log.print(f"compiling the train step for {task} (rows x tokens: {rows}) ...")
    t0 = time.perf_counter()
    state, metrics = step(state, batch, task, frozen)
    jax.block_until_ready(metrics["loss"])
    compiled.add(shape)
    log.print(f"  compiled and ran in {time.perf_counter() - t0:.1f}s")
    return state, metrics


def open_data(
    config, model_dir: Path, log, st: STConfig | None = None
) -> tuple[list, pipeline.BatchBuilder]:
    """The training sources (checked the same on every host) and this host's batch builder
    (queries expanded as the model's settings ``st`` say, a multi-vector model's)."""
    sources = readers.open_sources(
        list(config.data.train), skip_bad=config.data.skip_bad, columns=dict(config.data.columns)
    )
    if not sources:
        raise ValueError("config.data.train names no training data")
    for s in sources:
        if not len(s):
            raise ValueError(f"{s.path}: no training records (an empty file?)")
        k = dict(config.data.num_negatives).get(s.task, 0)
        stored = max(len(s[int(i)]["negatives"]) for i in np.linspace(0, len(s) - 1, 8))
        if k == 0 and stored:
            log.print(
                f"data: {s.name} carries hard negatives, but config.data.num_negatives."
                f"{s.task}=0 leaves them unused (set it to use up to {stored})"
            )
    distributed.check_same(
        "the training data", "; ".join(f"{s.name} {s.task} {len(s)} rows {s.path}" for s in sources)
    )
    builder = pipeline.BatchBuilder(
        sources,
        str(model_dir),
        dataclasses.replace(
            pipeline.PipelineConfig.from_config(config),
            query_expansion=st.query_expansion if st else 0,
            query_expansion_attend=st.query_expansion_attend if st else False,
        ),
        config.train.steps,
        jax.process_index(),
        jax.process_count(),
    )
    for s in sources:
        log.print(f"data: {s.name} ({s.task}) {len(s):,} rows from {s.path}")
    log.print(f"      {builder.schedule.steps_per_epoch:,} global batches per epoch")
    return sources, builder


@contextlib.contextmanager
def stop_signals():
    """The names of SIGTERM / SIGINT received meanwhile (a preemption: save, then exit)."""
    received: list[str] = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def check_lengths(config, limit: int, model: str) -> None:
    """Texts longer than the model's position table would read past it (NaN embeddings)."""
    for key in ("max_query_length", "max_passage_length"):
        if config.data[key] > limit:
            raise ValueError(
                f"config.data.{key}={config.data[key]} exceeds the {limit} tokens {model} "
                f"takes; set --config.data.{key}={limit} or less"
            )


def cli(argv=None) -> dict:
    """``python -m jaxembed.train --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]``."""
    p = jaxembed_cli.parser(
        "jaxembed.train",
        "Contrastive training of a text-embedding model from a local Hugging Face / "
        "sentence-transformers folder; resumes from WORKDIR's last checkpoint if any.",
        epilog="Config fields, with their defaults (jaxembed/config.py), each settable as "
        "--config.KEY=VALUE:\n  " + "\n  ".join(config_lib.describe(config_lib.default_config())),
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="a Python config file whose get_config() (or get_config(ARG)) returns the "
        "run's config",
    )
    p.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="run directory: checkpoints, logs, the model's files",
    )
    p.add_argument(
        "--dry-run",
        metavar="PLATFORM:N",
        help="lower the train step and the encoder for N devices of PLATFORM (tpu, gpu, cpu) "
        "on this host, from the model's config.json alone (no weights or data), print what "
        "each would run, and exit; nothing is written",
    )

    def run_training(args) -> dict:
        # Orbax and Grain log every save and prefetch at INFO; the run's own lines suffice.
        absl_logging.set_verbosity(absl_logging.WARNING)
        config = config_lib.load(args.config)
        for key, text in config_lib.parse_overrides(args.extra):
            config_lib.override(config, key, text)
        if args.dry_run:
            print("\n".join(dry_runs.dry_run(validate(config), args.dry_run)), flush=True)
            return {}
        results = main(config, args.workdir)
        if "before" in results and "after" in results and jax.process_index() == 0:
            _print_before_after(results, config.eval.groups)
        return results

    return jaxembed_cli.main(p, run_training, argv, extra=True)


def _print_before_after(results: dict, groups) -> None:
    b, a = results["before"], results["after"]
    print(f"dev nDCG@10: {b['eval/ndcg@10']:.4f} before -> {a['eval/ndcg@10']:.4f} after training")
    for group in groups:
        key = f"eval/{group}/ndcg@10"
        print(f"  {group}: {b[key]:.4f} before -> {a[key]:.4f} after ({a[key] - b[key]:+.4f})")


if __name__ == "__main__":
    cli()
