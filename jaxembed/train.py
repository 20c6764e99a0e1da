"""``python -m jaxembed.train``: contrastive training, from the config to the saved run.

Read top to bottom: the train state, the step (`make_encode` -> `batch_loss` ->
`make_loss_and_grads` -> `train_step`), then the run (`main`: mesh, data, restore or init,
the loop, evaluation, checkpoints) and the command line.

The step encodes the query / positive / negative towers with the backbone, pools each
text, and applies the task's loss from `jaxembed.losses` to the *global* (sharded)
embedding matrices, so in-batch negatives come from every device and host and gradients
flow to every gathered passage. With ``train.gradcache`` the same loss is differentiated
through `jaxembed.gradcache` instead, chunk by chunk. Every batch belongs to one task
("retrieval", "classification", "clustering"), which selects the loss: one compiled step
per task (and per row shape).

A batch is rows of token ids with segment ids (`jaxembed.packing`; built from a host's
texts by `jaxembed.data.pipeline.Packing` in `agree_on_batch`): attention and pooling stay
within each text, and a slot per text gathers its embedding back into the (B, dim) order
the loss uses. ``train.packing`` puts several texts in a row; without it each text has its
own row, which is a padded batch. B rows of the global batch, K hard negatives each:

    query_ids, query_seg, query_pool   (Rq, Lq) int32  ids, segment ids, pooled segments
    pos_ids, pos_seg                   (Rp, Lp) int32
    neg_ids, neg_seg                   (Rn, Lp) int32  (present when K > 0)
    query_slot, pos_slot, neg_slot     (B, 2), (B, 2), (B, K, 2) int32  (row, segment - 1)
    neg_valid                          (B, K) bool     False for padded negatives
    pos_hash, neg_hash                 (B,), (B, K) int32 text hashes (false negatives)
    teacher                            (B, 1 + K) float32 teacher scores, NaN where none
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging as absl_logging
from flax import nnx

from jaxembed import checkpoint, distributed, gradcache, hf, losses, remine, run, sharding
from jaxembed import cli as jaxembed_cli
from jaxembed import config as config_lib
from jaxembed import dry_run as dry_runs
from jaxembed.config import validate
from jaxembed.data import pipeline, readers
from jaxembed.files import check_local_path
from jaxembed.hf.sentence_transformers import load_head, read_st_config
from jaxembed.models import attention as attention_lib
from jaxembed.models import lora
from jaxembed.models.pooling import pool_segments
from jaxembed.packing import MAX_SEGMENTS
from jaxembed.retrieval import Evaluator, on_mesh
from jaxembed.seeds import to_seed
from jaxembed.tokenizer import load_tokenizer
from jaxembed.train_state import (
    TrainState,
    abstract_state,
    create_state,
    frozen_params,
    make_optimizer,
)

# --- the step -------------------------------------------------------------------------------


def make_encode(graphdef, pooling: str, segments: int) -> Callable:
    """``encode(model_params, ids, seg, pool_seg, seeds) -> (rows, segments, hidden)``, fp32.

    Rows of texts (`jaxembed.packing`): every text is pooled on its own, as if alone in its
    row. ``seeds`` (one per row, or None: no dropout) make each row's dropout masks depend
    only on its own seed (`jaxembed.models.layers.dropout`): identical whatever the chunking
    or the mesh. ``segments`` is the most texts a row holds (1: one per row).
    """

    def encode(model_params, ids, seg, pool_seg, seeds):
        model = nnx.merge(graphdef, model_params)
        if seeds is not None:
            lora.seed_dropout(model, seeds)  # LoRA adapters' dropout, if any
        # One text per row is a padded batch: key lengths, not a mask, for fused kernels.
        packed = seg if segments > 1 else None
        hidden = model(ids, seg > 0, segment_ids=packed, dropout_seed=seeds)
        return pool_segments(hidden, pool_seg, seg, pooling, min(segments, ids.shape[1]))

    return encode


def towers(batch: dict, seed) -> dict[str, tuple]:
    """The encoder's inputs per tower: ``(ids, segment ids, pooled segments, row seeds)``."""
    out = {}
    kinds = (("query", "query_pool"), ("pos", "pos_seg"), ("neg", "neg_seg"))
    for t, (name, pool_key) in enumerate(kinds):
        if f"{name}_ids" in batch:
            ids = batch[f"{name}_ids"]
            seeds = gradcache.row_seeds(seed, t, ids.shape[0])
            out[name] = (ids, batch[f"{name}_seg"], batch[pool_key], seeds)
    return out


def texts_per_row(config) -> int:
    """How many texts a row of the step holds: several with ``train.packing``, else one."""
    return MAX_SEGMENTS if config.train.packing else 1


def batch_loss(
    emb: dict, extra: dict, batch: dict, config, task: str, constrain, head=None
) -> jax.Array:
    """The task's contrastive loss (`jaxembed.losses`) on the batch's embeddings.

    ``emb`` holds each tower's (rows, segments, dim) pooled output; every text's slot picks
    its embedding, the Dense head (graphdef ``head``, parameters ``extra["head"]``) maps it
    when the model has one, and the loss compares the (B, dim) queries with the positives
    of the whole global batch and each row's K hard negatives. The head sits here, after
    the encoder, so GradCache caches pooled vectors and differentiates the head with the
    loss.
    """
    loss_fn = losses.task_loss(task, config.loss.style)
    distill = distillation_weights(config, task)
    if distill is not None:
        loss_fn = losses.with_distillation(loss_fn, *distill)
    if config.loss.matryoshka_dims:
        loss_fn = losses.matryoshka(
            loss_fn, config.loss.matryoshka_dims, config.loss.matryoshka_weights or None
        )
    emb = {
        name: e[slot[:, 0], slot[:, 1]]
        for name, e in emb.items()
        for slot in [batch[f"{name}_slot"].reshape(-1, 2)]
    }
    if head is not None:
        emb = {name: nnx.merge(head, extra["head"])(e) for name, e in emb.items()}
    emb = {name: constrain(e) for name, e in emb.items()}
    b, k = batch["neg_valid"].shape
    d = emb["query"].shape[-1]
    n = emb["neg"].reshape(b, k, d) if k else jnp.zeros((b, 0, d), emb["query"].dtype)
    fn_mask = config.loss.false_negative_masking
    return loss_fn(
        emb["query"],
        emb["pos"],
        n,
        temperature=temperature(extra, config),
        neg_mask=batch["neg_valid"],
        pos_hash=batch["pos_hash"] if fn_mask else None,
        neg_hash=batch["neg_hash"] if fn_mask else None,
        symmetric=config.loss.symmetric,
        **({"teacher": batch["teacher"]} if distill is not None else {}),
    )


def distillation_weights(config, task: str) -> tuple | None:
    """``(infonce, kl, margin_mse, teacher temperature)`` of ``task``; None: InfoNCE alone."""
    loss = config.loss
    weights = (loss.infonce_weight[task], loss.kl_weight[task], loss.margin_mse_weight[task])
    if weights == (1.0, 0.0, 0.0):
        return None
    return (*weights, loss.teacher_temperature)


def temperature(extra: dict, config) -> jax.Array:
    if "log_temperature" in extra:
        return jnp.exp(extra["log_temperature"])
    return jnp.float32(config.loss.temperature)


def make_loss_and_grads(
    graphdef, config: ml_collections.ConfigDict, task: str, pooling: str, mesh, head=None
):
    """``f(params, batch, seed) -> (loss, grads, temperature)`` for one task's batches.

    Encodes every tower and differentiates `batch_loss`: in one pass, or with
    ``train.gradcache`` chunk by chunk (`jaxembed.gradcache`), with the same result.
    ``seed`` (uint32, or a PRNG key) None turns dropout off. ``head`` is the graphdef of the
    Dense head, if the model has one. With LoRA, ``params`` holds the adapters ("lora"),
    ``frozen`` the base weights (`train_state.frozen_params`), and only the adapters are
    differentiated. Exposed on its own so tests can compare gradients across meshes,
    packings and GradCache.
    """
    losses.task_loss(task, config.loss.style)  # an unknown task fails here, before tracing
    encode = make_encode(graphdef, pooling, texts_per_row(config))

    def constrain(x):
        # Keep each GradCache chunk spread over the data-parallel devices.
        if x is None:  # the row seeds when dropout is off
            return x
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))

    def loss_and_grads(params, batch, seed, frozen=None):
        inputs = towers(batch, to_seed(seed))
        trained = "lora" if "lora" in params else "model"
        extra = {name: v for name, v in params.items() if name != trained}

        def encode_trained(p, *tower):
            return encode(p if frozen is None else lora.join(frozen, p), *tower)

        def objective(emb, extra):
            return batch_loss(emb, extra, batch, config, task, constrain, head)

        if config.train.gradcache:
            chunk = config.train.gradcache_chunk
            loss, (g_model, g_extra) = gradcache.value_and_grad(
                encode_trained, objective, params[trained], inputs, extra, chunk, constrain
            )
        else:

            def full(p, extra):
                return objective({t: encode_trained(p, *x) for t, x in inputs.items()}, extra)

            loss, (g_model, g_extra) = jax.value_and_grad(full, argnums=(0, 1))(
                params[trained], extra
            )
        return loss, {trained: g_model, **g_extra}, temperature(extra, config)

    return loss_and_grads


def train_step(
    state: TrainState, batch: dict, frozen, *, loss_and_grads, tx, schedule, dropout: bool
):
    """One optimizer step: dropout seed of the step, loss and gradients, AdamW update.

    ``frozen``: a LoRA run's base weights (read, never updated), else None.
    """
    seed = None
    if dropout:
        seed = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads, temp = loss_and_grads(state.params, batch, seed, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params),
        "lr": schedule(state.step),
        "temperature": temp,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class TrainStep:
    """`train_step` jitted once per task: ``state, metrics = step(state, batch, task)``.

    The state is donated (updated in place) and keeps its shardings; ``batch`` arrays must
    already be global arrays sharded over the batch axes (`jaxembed.sharding`). A LoRA
    run passes its frozen base weights as ``frozen``: an argument that is not donated.
    """

    def __init__(
        self, graphdef, config, mesh, tx, schedule, state_shardings, pooling: str, head=None
    ):
        sharding.check_global_batch(config.train.global_batch, mesh)
        if config.train.gradcache:
            sharding.check_global_batch(config.train.gradcache_chunk, mesh, "gradcache_chunk")
        self.graphdef, self.config, self.mesh = graphdef, config, mesh
        self.tx, self.schedule, self.state_shardings = tx, schedule, state_shardings
        self.pooling, self.head = pooling, head
        self._compiled: dict[str, Callable] = {}

    def jitted(self, task: str) -> Callable:
        """The jitted step of ``task`` (built on first use)."""
        if task not in self._compiled:
            core = make_loss_and_grads(
                self.graphdef, self.config, task, self.pooling, self.mesh, self.head
            )
            step = functools.partial(
                train_step,
                loss_and_grads=core,
                tx=self.tx,
                schedule=self.schedule,
                dropout=self.config.train.dropout,
            )
            self._compiled[task] = jax.jit(
                step,
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._compiled[task]

    def __call__(self, state: TrainState, batch: dict, task: str = "retrieval", frozen=None):
        step = self.jitted(task)
        b = batch["neg_valid"].shape[0]
        if b != self.config.train.global_batch:
            raise ValueError(
                f"batch has {b} rows but config.train.global_batch={self.config.train.global_batch}"
            )
        return step(state, batch, frozen)


# --- the training run -----------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def main(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains per ``config`` in ``workdir``, resuming from its last checkpoint if any.

    Returns the last logged metrics and the evaluations before and after training.
    """
    started = time.perf_counter()  # train.time_limit_minutes counts from here
    config = validate(config)
    check_local_path(workdir, "--workdir")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_dir(workdir)
    distributed.check_same("the run config", config.to_json_best_effort(sort_keys=True))
    log = run.RunLog(workdir, jax.process_index() == 0, config.log.tensorboard)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    devices, hosts = jax.device_count(), jax.process_count()
    log.print(f"mesh {dict(mesh.shape)} over {devices} devices, {hosts} processes")
    chunk = config.train.gradcache_chunk if config.train.gradcache else 0
    log.print(sharding.rows_per_device(mesh, config.train.global_batch, chunk))

    # --- the run's model files and data -------------------------------------------------------
    model_dir = workdir / "model"
    if jax.process_index() == 0:
        run.prepare_model_dir(config.model.path, model_dir, config.model.pooling)
    distributed.barrier("prepare_model_dir")
    st = read_st_config(model_dir)
    pooling = config.model.pooling or st.pooling or "mean"
    sources, builder = open_data(config, model_dir, log)
    meta = run.run_meta(config, model_dir, pooling, sources)

    # --- the step, then the state: restored, else initialised from the model folder -----------
    adapters = run.lora_spec(config)
    abstract_model = run.abstract_model(
        model_dir, config.model.dtype, config.model.remat, adapters, config.model.attention
    )
    check_lengths(config, abstract_model.config.max_tokens, config.model.path)
    model_cfg = abstract_model.config
    dropout = config.train.dropout and attention_lib.probs_dropout(model_cfg)
    buckets = pipeline.PipelineConfig.from_config(config)
    lengths = (*buckets.buckets("query"), *buckets.buckets("passage"))
    packed = texts_per_row(config) > 1
    log.print(attention_lib.describe_model(abstract_model, lengths, packed, dropout))
    # The Dense layers after pooling, if any.
    abstract_head = run.abstract_head(model_dir, abstract_model.config.hidden_size)
    graphdef = nnx.graphdef(abstract_model)
    head_def = None if abstract_head is None else nnx.graphdef(abstract_head)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    abstract, state_sh = abstract_state(abstract_model, config, mesh, tx, abstract_head)
    # Built before any weights load: it checks the batch against the mesh.
    step_fn = TrainStep(graphdef, config, mesh, tx, schedule, state_sh, pooling, head_def)
    packing = make_packing(config, mesh)
    mngr = checkpoint.manager(
        workdir,
        keep=config.ckpt.keep,
        keep_best=config.ckpt.keep_best,
        best_metric=f"eval/{config.eval.best_metric}" if config.ckpt.keep_best else "",
        async_save=config.ckpt.async_save,
    )

    def load_model():
        dtype = jnp.dtype(config.model.dtype)
        model = hf.load_model(config.model.path, dtype=dtype, remat=config.model.remat)
        return run.with_adapters(model, adapters, config.train.seed)

    # LoRA: the frozen base weights are read from the model folder on every start (the
    # checkpoints hold the adapters only); without LoRA only a first start reads them.
    model = load_model() if adapters else None
    frozen = frozen_params(model, mesh) if adapters else None

    def init():
        source = model or load_model()
        head = load_head(config.model.path, st, source.config.hidden_size)
        return create_state(source, config, mesh, tx, head)[1]

    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    state, data_pos, saved_meta, start = checkpoint.restore_or_init(
        mngr, init, abstract, config.ckpt.fallback
    )
    del model
    if start:
        check_resumable(saved_meta, config, workdir, log)
    log.forget_after(start)
    log.print("resumed from step" if start else "initialised from", start or config.model.path)
    shapes = nnx.state(abstract_model)
    table = sharding.describe(shapes, sharding.state_shardings(shapes, mesh))
    if jax.process_index() == 0:
        (workdir / "parameters.txt").write_text(table + "\n")
    log.print(f"{table.splitlines()[-1]}; every tensor's shape and sharding: parameters.txt")

    def live(params) -> dict:
        """The live parameters as the encoder takes them (a LoRA run's joined to its base)."""
        if frozen is None:
            return params
        return {**params, "model": lora.join(frozen, params["lora"])}

    model = nnx.merge(graphdef, live(state.params)["model"])
    head = None if head_def is None else nnx.merge(head_def, state.params["head"])
    prompts = run.trained_prompts(meta)
    evaluator = Evaluator(config, model, load_tokenizer(model_dir), pooling, st, prompts, head)
    remining = remine.Settings.from_config(config)

    def data_from(step: int, fresh: bool = False):
        """The batches from ``step`` on (a pure function of their index, so resuming is
        starting there), with the negatives of the last re-mining if any: mined now when
        ``fresh``, or when a run resumes at a re-mining step before its pool was saved."""
        if remining is not None and step >= remining.every:
            mined_at = remine.last_remine_step(step, remining.every)
            pool = None if fresh else remine.Pool.load(workdir, mined_at)
            if pool is None and mined_at != step:
                raise FileNotFoundError(
                    f"{workdir}/{remine.POOL_DIR}/{mined_at}.npz: the negatives re-mined at "
                    f"step {mined_at} are missing, so step {step} cannot resume exactly"
                )
            if pool is None:
                on_mesh(evaluator.encoder, mesh).set_params(live(state.params))
                pool = remine.remine(
                    evaluator.encoder, builder, remining, step, config.eval.batch_size, log
                )
                if jax.process_index() == 0:
                    pool.save(workdir)
            builder.remined = (pool.texts, pool.negatives)
        dataset = pipeline.make_dataset(builder, step)
        return pipeline.make_iterator(dataset, config.data.workers, config.data.prefetch)

    data_iter = data_from(data_pos["next_batch"] if data_pos else 0)
    results: dict = {}
    if start == 0 and evaluator.sets:
        results["before"] = log.eval(0, "eval before training", evaluator(live(state.params)))

    # --- the loop -----------------------------------------------------------------------------
    progress = Progress(config, start)
    step, last = start, {}
    compiled: set[tuple] = set()  # (task, row shapes) the step has been compiled for
    time_limit = 60 * config.train.time_limit_minutes or float("inf")
    with stop_signals() as signals, checkpoint.saves_reported(mngr):
        try:
            while step < config.train.steps:
                request = PREEMPTED if signals else NO_STOP
                if time.perf_counter() - started >= time_limit:
                    request = max(request, TIME_LIMIT)
                host = next(data_iter)
                batch, tokens, request = agree_on_batch(host, request, packing, mesh)
                stopping, out_of_time = request == PREEMPTED, request == TIME_LIMIT
                batch = sharding.from_process_local(batch, mesh)
                state, metrics = run_step(
                    step_fn, state, batch, host["task"], frozen, compiled, log
                )
                step += 1
                progress.add(host["task"], metrics["loss"], tokens)
                if step % config.log.every == 0 or step == config.train.steps or out_of_time:
                    last = progress.report(step, metrics, log)
                eval_metrics = None
                if config.eval.every and step % config.eval.every == 0 and evaluator.sets:
                    eval_metrics = log.eval(
                        step, f"eval at step {step}", evaluator(live(state.params))
                    )
                ending = step == config.train.steps or stopping or out_of_time
                if step % config.ckpt.every == 0 or ending:
                    check_finite(jax.device_get(metrics), step)
                    checkpoint.check_space(mngr, state_bytes, step)
                    data = {"next_batch": step}
                    force = stopping or out_of_time
                    checkpoint.save(mngr, step, state, data, meta, eval_metrics, force)
                if remining and step % remining.every == 0 and not ending:
                    data_iter = data_from(step, fresh=True)  # after the checkpoint: see data_from
                if stopping:
                    mngr.wait_until_finished()
                    why = signals[0] if signals else "another host's stop signal"
                    log.print(f"{why}: saved step {step}, exiting")
                    return results | {"stopped": why, "last": last, "step": step}
                if out_of_time:
                    log.print(
                        f"time limit of {config.train.time_limit_minutes:g} min reached: "
                        f"training ends at step {step} of {config.train.steps}"
                    )
                    results["time_limit_step"] = step
                    break
            if evaluator.sets:
                results["after"] = log.eval(
                    step, "eval after training", evaluator(live(state.params))
                )
            mngr.wait_until_finished()
        finally:
            mngr.close()
            log.close()
    return results | {"last": last, "step": step}


# What a resumed run must share with the run that wrote the checkpoint: the model, and what
# decides which rows, texts and negatives each step sees. Anything else (steps, learning
# rate, mesh, packing, GradCache, evaluation) may change between invocations.
RESUME_KEYS = (
    "model.path",
    "model.pooling",
    "model.lora",
    "data.train",
    "data.num_negatives",
    "data.negatives",
    "data.group_size",
    "data.mixing",
    "data.max_query_length",
    "data.max_passage_length",
    "data.query_prefix",
    "data.passage_prefix",
    "data.instruction_template",
    "train.global_batch",
    "train.seed",
    "train.remine_every",
)


def check_resumable(saved_meta: dict, config, workdir: Path, log) -> None:
    """Refuses to resume with a config that changes the model or the data of the run,
    naming every changed key, unless ``train.allow_config_change`` (then it warns)."""
    saved = saved_meta.get("config", {})
    saved = json.loads(saved) if isinstance(saved, str) else saved
    current = json.loads(config.to_json_best_effort())
    changed = []
    for key in RESUME_KEYS:
        group, name = key.split(".")
        if group not in saved or name not in saved[group]:
            continue  # a checkpoint written before the key existed
        was, now = saved[group][name], current[group][name]
        if json.dumps(was, sort_keys=True) != json.dumps(now, sort_keys=True):
            changed.append(f"config.{key}={was!r} -> {now!r}")
    if changed and config.train.allow_config_change:
        log.print(f"warning: resuming {workdir} with changed {'; '.join(changed)}")
    elif changed:
        raise ValueError(
            f"{workdir} holds a run with other settings ({'; '.join(changed)}): resuming "
            "would silently change the run; use a new --workdir, the old values, or "
            "--config.train.allow_config_change=true"
        )


def run_step(step_fn, state, batch: dict, task: str, frozen, compiled: set, log):
    """``step_fn(...)``; the first step of each (task, row shapes) compiles, which can take
    minutes on an accelerator: it is announced, with the shapes, and timed."""
    towers = [t for t in ("query", "pos", "neg") if f"{t}_ids" in batch]
    shape = (task, *(batch[f"{t}_ids"].shape for t in towers))
    if shape in compiled:
        return step_fn(state, batch, task, frozen)
    rows = ", ".join(f"{t} {s[0]}x{s[1]}" for t, s in zip(towers, shape[1:], strict=True))
    log.print(f"compiling the train step for {task} (rows x tokens: {rows}) ...")
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, task, frozen)
    jax.block_until_ready(metrics["loss"])
    compiled.add(shape)
    log.print(f"  compiled and ran in {time.perf_counter() - t0:.1f}s")
    return state, metrics


def open_data(config, model_dir: Path, log) -> tuple[list, pipeline.BatchBuilder]:
    """The training sources (checked the same on every host) and this host's batch builder."""
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
        pipeline.PipelineConfig.from_config(config),
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


class Progress:
    """Examples, tokens and per-task losses since the start: the periodic log line."""

    def __init__(self, config, start: int):
        self.config, self.start = config, start
        self.t0, self.seen, self.tokens = time.perf_counter(), 0, 0
        self.task_losses: dict[str, list] = {}

    def add(self, task: str, loss, tokens: int) -> None:
        self.seen += self.config.train.global_batch
        self.tokens += tokens
        self.task_losses.setdefault(task, []).append(loss)  # device values: no sync here

    def report(self, step: int, metrics: dict, log) -> dict:
        """Logs the step's metrics and rates; returns them as floats."""
        metrics = jax.device_get(metrics)
        check_finite(metrics, step)
        elapsed = time.perf_counter() - self.t0
        last = {k: float(v) for k, v in metrics.items()}
        for t, values in self.task_losses.items():
            last[f"loss/{t}"] = float(np.mean(jax.device_get(values)))
        self.task_losses = {}
        last["examples_per_s"] = self.seen / elapsed
        last["tokens_per_s"] = self.tokens / elapsed
        total = self.config.train.steps
        eta = (total - step) * elapsed / max(step - self.start, 1)
        log.scalars(step, last)
        log.print(
            f"step {step}/{total} [{100 * step / total:5.1f}%] loss {last['loss']:.4f} "
            f"lr {last['lr']:.2e} |g| {last['grad_norm']:.3f} "
            f"{last['examples_per_s']:.1f} ex/s {last['tokens_per_s']:.0f} tok/s "
            f"ETA {_fmt_time(eta)}"
        )
        return last


def make_packing(config, mesh) -> pipeline.Packing:
    """How the train step lays out its rows (`jaxembed.data.pipeline.Packing`).

    Row lengths are the data's buckets (``data.query_buckets`` / ``passage_buckets``). With
    ``train.packing`` a row holds several texts and a tower's global row count is a multiple
    of ``train.packing_rows`` (0: a sixteenth of the global batch); without, one text per
    row and as many rows as texts. Either way the count is rounded up to what the mesh, the
    process count and the GradCache chunk divide; packed, ``train.packing_shapes="few"``
    rounds it further to a few counts per tower (one compile each).
    """
    hosts = jax.process_count()
    divide = math.lcm(
        sharding.data_parallel_size(mesh),
        hosts,
        config.train.gradcache_chunk if config.train.gradcache else 1,
    )
    granule = divide
    if config.train.packing:
        granule = config.train.packing_rows or max(1, config.train.global_batch // 16)
        granule = -(-granule // divide) * divide
    data = pipeline.PipelineConfig.from_config(config)
    segments = min(texts_per_row(config), data.max_query_length, data.max_passage_length)
    few = config.train.packing and config.train.packing_shapes == "few"
    return pipeline.Packing(
        data.buckets("query"), data.buckets("passage"), granule // hosts, segments, few
    )


# Why a run stops early, as exchanged between hosts: the largest request wins, so a
# preemption (save and exit) overrides a spent time limit (finish: eval after, save).
NO_STOP, TIME_LIMIT, PREEMPTED = 0, 1, 2


def agree_on_batch(
    batch: dict, stop_request: int, packing: pipeline.Packing, mesh=None
) -> tuple[dict, int, int]:
    """What every host must agree on before a step: ``(step batch, global tokens, stop)``.

    Hosts exchange their batch's index and source, their row lengths (the bucket of their
    longest text per kind) and the rows each tower needs, their real token count and their
    stop request (``PREEMPTED``: SIGTERM on one preempted host; ``TIME_LIMIT``:
    ``train.time_limit_minutes`` spent). All pack into the longest lengths and the most
    rows, and all stop after the same step for the same reason, so none is left waiting in
    a collective. On one process nothing is exchanged.
    """
    lengths = packing.lengths(batch)
    plans = packing.plan(batch, lengths)
    towers = ("query", "pos", "neg")
    need = [len(plans.get(t, ())) for t in towers]
    local = [batch["step"], batch["source"], lengths["query"], lengths["passage"]]
    local += [batch["num_tokens"], stop_request, *need]
    hosts = distributed.gather(np.asarray(local, np.int64))
    if (hosts[:, :2] != hosts[0, :2]).any():
        raise RuntimeError(
            "hosts disagree on the global batch (index, dataset) per process: "
            f"{hosts[:, :2].tolist()}; the input pipelines are out of step"
        )
    lengths = {"query": int(hosts[:, 2].max()), "passage": int(hosts[:, 3].max())}
    most = dict(zip(towers, hosts[:, 6:].max(0).tolist(), strict=True))
    rows = {t: packing.rows(most[t]) for t in plans}
    count = jax.process_count()
    global_rows = {
        t: sharding.local_rows(mesh, r * count) if count > 1 else np.arange(r)
        for t, r in rows.items()
    }
    batch = packing.pack(batch, plans, lengths, rows, global_rows)
    return batch, int(hosts[:, 4].sum()), int(hosts[:, 5].max())


def check_lengths(config, limit: int, model: str) -> None:
    """Texts longer than the model's position table would read past it (NaN embeddings)."""
    for key in ("max_query_length", "max_passage_length"):
        if config.data[key] > limit:
            raise ValueError(
                f"config.data.{key}={config.data[key]} exceeds the {limit} tokens {model} "
                f"takes; set --config.data.{key}={limit} or less"
            )


def check_finite(metrics: dict, step: int) -> None:
    for key in ("loss", "grad_norm"):
        if not np.isfinite(metrics[key]):
            raise FloatingPointError(
                f"non-finite {key} ({metrics[key]}) at step {step}; "
                "the last good checkpoint is kept"
            )


def dry_run(config, target: str) -> list[str]:
    """``--dry-run PLATFORM:N`` (`jaxembed.dry_run`): the run's train step, at its longest and
    shortest buckets, and its encoder, lowered for N devices of PLATFORM on this host's CPU
    devices, from the model's config.json alone; the report's lines."""
    platform, count = dry_runs.parse_target(target)
    devices = dry_runs.use_host_devices(count)
    config = validate(config)
    model, head = dry_runs.abstract_model(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    pooling = config.model.pooling or read_st_config(Path(config.model.path)).pooling or "mean"
    dp = sharding.data_parallel_size(mesh)
    impl = config.model.attention

    def step_on(mesh, c):  # (jitted step, abstract state, abstract frozen base or None)
        tx, schedule = make_optimizer(c.optim, c.train.steps)
        state, sh = abstract_state(model, c, mesh, tx, head)
        head_def = None if head is None else nnx.graphdef(head)
        step = TrainStep(nnx.graphdef(model), c, mesh, tx, schedule, sh, pooling, head_def)
        return step.jitted("retrieval"), state, dry_runs.frozen(model, mesh)

    step, state, frozen = step_on(mesh, config)
    lines = dry_runs.header(platform, count, mesh, config, state, frozen)
    data = pipeline.PipelineConfig.from_config(config)
    query, passage = data.buckets("query"), data.buckets("passage")
    for lq, lp in dict.fromkeys([(max(query), max(passage)), (min(query), min(passage))]):
        arrays = make_packing(config, mesh).pack_local(dry_runs.host_batch(config, lq, lp))
        what = "train step (rows x tokens: " + dry_runs.rows(arrays) + ")"
        lines += dry_runs.lower(
            step, (state, dry_runs.on(arrays, mesh), frozen), platform, what, impl
        )
        if platform == "gpu" and dp > 1:  # XLA partitions cuDNN calls only when it compiles
            one = config.copy_and_resolve_references()
            one.train.global_batch //= dp
            one.train.gradcache_chunk = max(1, one.train.gradcache_chunk // dp)
            args = step_on(sharding.make_mesh(1, 1, 1, devices[:1]), validate(one))
            share = dry_runs.on(arrays, None, dp)
            lines += dry_runs.lower(
                *args[:1], (args[1], share, args[2]), platform, "  on one device", impl
            )
    encode = jax.jit(make_encode(nnx.graphdef(model), pooling, texts_per_row(config)))
    rows = -(-config.eval.batch_size // dp) * dp
    ids = dry_runs.on({"ids": np.zeros((rows, max(passage)), np.int32)}, mesh)["ids"]
    params = dry_runs.abstract(nnx.to_pure_dict(nnx.state(model)), sharding.replicated(mesh))
    what = f"encoder ({rows} rows x {max(passage)} tokens)"
    return lines + dry_runs.lower(encode, (params, ids, ids, ids, None), platform, what, impl)


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
        help="a Python config "
        "file whose get_config() (or get_config(ARG)) returns the run's config",
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
            print("\n".join(dry_run(config, args.dry_run)), flush=True)
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
