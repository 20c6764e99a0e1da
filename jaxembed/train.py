"""Contrastive training: the optimizer, the train state and the jitted, sharded train step.

The step, in one place: encode the query / positive / negative towers with the backbone,
pool, and apply the task's loss from `jaxembed.losses` to the *global* (sharded) embedding
matrices, so in-batch negatives come from every device and host and gradients flow to
every gathered passage. With ``train.gradcache`` the same loss is differentiated through
`jaxembed.gradcache` instead, chunk by chunk.

Batches are dicts of global arrays with a leading batch dimension B:

    query_ids, query_mask        (B, Lq) int32
    pos_ids, pos_mask            (B, Lp) int32
    neg_ids, neg_mask            (B, K, Lp) int32   K hard negatives per row (K may be 0)
    neg_valid                    (B, K) bool        False for padded negatives
    pos_hash, neg_hash           (B,), (B, K) int32 text hashes for false-negative masking
    query_pool_mask (optional)   (B, Lq) int32      pooling mask without instruction tokens

and every batch belongs to one task ("retrieval", "classification", "clustering"), which
selects the loss: one compiled step per task.

With ``train.packing`` the towers come packed (`jaxembed.data.pipeline.Packing`): several
texts share a row of the tower's maximum length, attention and pooling stay within each
text, and a slot per text gathers its embedding back into the (B, dim) order the loss uses:

    query_ids, query_seg, query_pool   (Rq, Lq) int32  ids, segment ids, pooled segments
    pos_ids, pos_seg                   (Rp, Lp) int32
    neg_ids, neg_seg                   (Rn, Lp) int32  (present when K > 0)
    query_slot, pos_slot, neg_slot     (B, 2), (B, 2), (B, K, 2) int32  (row, segment - 1)
    neg_valid, pos_hash, neg_hash      as above
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from jaxembed import distributed, gradcache, hf, losses, sharding
from jaxembed.data import pipeline
from jaxembed.encoder import MAX_SEGMENTS
from jaxembed.models.layers import to_seed
from jaxembed.models.pooling import pool, pool_segments

NO_DECAY = ("bias", "scale")  # LayerNorm / RMSNorm scales and every bias
PACKED_SEGMENTS = MAX_SEGMENTS  # texts per packed row at most (a static shape of the step)


# --- optimizer ------------------------------------------------------------------------------


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine / linear decay to ``min_lr``, or constant."""
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.min_lr / optim.lr)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(optim.lr, optim.min_lr, decay_steps)
    else:
        after = optax.constant_schedule(optim.lr)
    if optim.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def decay_mask(params) -> dict:
    """True for parameters that get weight decay: matrices and embeddings, not norms/biases."""

    def leaf(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        # The HF pooler is exported but unused for embeddings: leave it untouched.
        return keys[0] == "model" and keys[-1] not in NO_DECAY and "pooler" not in keys

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """AdamW with decoupled weight decay (masked), global-norm clipping, warmup + decay."""
    schedule = make_schedule(optim, total_steps)
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


# --- state ----------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"model": pure dict of fp32 arrays, ["log_temperature": scalar]}
    opt_state: optax.OptState
    rng: jax.Array  # base PRNG key data; each step's dropout seed derives from (rng, step)


def init_params(model: nnx.Module, config: ml_collections.ConfigDict) -> tuple:
    """Splits ``model`` into (graphdef, nnx state with axis metadata, trainable params dict)."""
    graphdef, state = nnx.split(model)
    params = {"model": nnx.to_pure_dict(state)}
    if config.loss.learnable_temperature:
        params["log_temperature"] = jnp.log(jnp.float32(config.loss.temperature))
    return graphdef, state, params


def create_state(model: nnx.Module, config: ml_collections.ConfigDict, mesh, tx):
    """The sharded train state for ``model`` (host or device arrays) on ``mesh``.

    Returns ``(graphdef, state, state_shardings)``; parameters are placed directly in their
    shards and the optimizer state is created by a jit whose outputs are already sharded.
    """
    graphdef, _, params = init_params(model, config)
    _, state_sh = abstract_state(model, config, mesh, tx)
    repl = sharding.replicated(mesh)
    params = jax.device_put(params, state_sh.params)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), repl),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)), repl),
    )
    return graphdef, state, state_sh


def abstract_state(model: nnx.Module, config: ml_collections.ConfigDict, mesh, tx):
    """``(state, shardings)`` of ShapeDtypeStructs: the train state's shape, no arrays made.

    ``model`` may be abstract (`nnx.eval_shape`); this is what a checkpoint restores into.
    """
    _, nnx_state, params = init_params(model, config)
    repl = sharding.replicated(mesh)
    param_sh = {"model": nnx.to_pure_dict(sharding.state_shardings(nnx_state, mesh))}
    if "log_temperature" in params:
        param_sh["log_temperature"] = repl
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: repl
    )
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=opt_abstract,
        rng=key_data,
    )
    shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)
    with_sh = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    return with_sh, shardings


# --- the step -------------------------------------------------------------------------------


def make_encode(graphdef, pooling: str) -> Callable:
    """``encode(model_params, ids, mask, pool_mask, seeds) -> (rows, hidden)`` pooled, fp32.

    With per-row dropout seeds the backbone is vmapped over rows, so each row's dropout masks
    depend only on its own seed: identical whatever the chunking or the mesh.
    """

    def encode(model_params, ids, mask, pool_mask, seeds):
        model = nnx.merge(graphdef, model_params)
        if seeds is None:
            hidden = model(ids, mask)
        else:
            hidden = jax.vmap(lambda i, m, s: model(i[None], m[None], dropout_seed=s)[0])(
                ids, mask, seeds
            )
        return pool(hidden, pool_mask, pooling, attention_mask=mask)

    return encode


def make_encode_packed(graphdef, pooling: str) -> Callable:
    """``encode(model_params, ids, seg, pool_seg, seeds) -> (rows, segments, hidden)``.

    Packed rows (`jaxembed.data.pipeline.Packing`): every text is pooled on its own, as
    `make_encode` pools a text alone in a row; dropout is seeded per packed row. A row holds
    at most ``min(PACKED_SEGMENTS, length)`` texts (every text has a token).
    """

    def encode(model_params, ids, seg, pool_seg, seeds):
        model = nnx.merge(graphdef, model_params)
        if seeds is None:
            hidden = model(ids, seg > 0, segment_ids=seg)
        else:
            hidden = jax.vmap(
                lambda i, g, s: model(i[None], g[None] > 0, segment_ids=g[None], dropout_seed=s)[0]
            )(ids, seg, seeds)
        return pool_segments(hidden, pool_seg, seg, pooling, min(PACKED_SEGMENTS, ids.shape[1]))

    return encode


def _packed_towers(batch: dict, seed) -> dict[str, tuple]:
    towers = {}
    kinds = (("query", "query_pool"), ("pos", "pos_seg"), ("neg", "neg_seg"))
    for t, (name, pool_key) in enumerate(kinds):
        if f"{name}_ids" not in batch:
            continue
        ids, seg = batch[f"{name}_ids"], batch[f"{name}_seg"]
        pool_seg = batch[pool_key]
        towers[name] = (ids, seg, pool_seg, gradcache.row_seeds(seed, t, ids.shape[0]))
    return towers


def _towers(batch: dict, seed) -> dict[str, tuple]:
    if pipeline.is_packed(batch):
        return _packed_towers(batch, seed)
    b, k = batch["neg_valid"].shape
    q_pool = batch.get("query_pool_mask", batch["query_mask"])
    towers = {
        "query": (batch["query_ids"], batch["query_mask"], q_pool, gradcache.row_seeds(seed, 0, b)),
        "pos": (
            batch["pos_ids"],
            batch["pos_mask"],
            batch["pos_mask"],
            gradcache.row_seeds(seed, 1, b),
        ),
    }
    if k:
        ids = batch["neg_ids"].reshape(b * k, -1)
        mask = batch["neg_mask"].reshape(b * k, -1)
        towers["neg"] = (ids, mask, mask, gradcache.row_seeds(seed, 2, b * k))
    return towers


def make_loss_and_grads(graphdef, config: ml_collections.ConfigDict, task: str, pooling: str, mesh):
    """``f(params, batch, seed) -> (loss, grads, temperature)`` for one task's batches.

    ``seed`` (uint32, or a PRNG key) None turns dropout off. This is the differentiable core
    of the train step, exposed on its own so tests can compare gradients across meshes and
    with GradCache.
    """
    loss_fn = losses.task_loss(task, config.loss.style)
    if config.loss.matryoshka_dims:
        loss_fn = losses.matryoshka(
            loss_fn, config.loss.matryoshka_dims, config.loss.matryoshka_weights or None
        )
    encode = make_encode(graphdef, pooling)
    encode_packed = make_encode_packed(graphdef, pooling)
    mask_fn = config.loss.false_negative_masking

    def constrain(x):
        # Keep each GradCache chunk spread over the data-parallel devices.
        if x is None:
            return x
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))

    def temperature(extra):
        if "log_temperature" in extra:
            return jnp.exp(extra["log_temperature"])
        return jnp.float32(config.loss.temperature)

    def unpack(emb, batch):
        # Packed towers give (rows, segments, dim): each text's slot picks its embedding.
        out = {}
        for name, e in emb.items():
            slot = batch[f"{name}_slot"].reshape(-1, 2)
            out[name] = constrain(e[slot[:, 0], slot[:, 1]])
        return out

    def loss_of_embeddings(emb, extra, batch):
        if pipeline.is_packed(batch):
            emb = unpack(emb, batch)
        b, k = batch["neg_valid"].shape
        d = emb["query"].shape[-1]
        n = emb["neg"].reshape(b, k, d) if k else jnp.zeros((b, 0, d), emb["query"].dtype)
        return loss_fn(
            emb["query"],
            emb["pos"],
            n,
            temperature=temperature(extra),
            neg_mask=batch["neg_valid"],
            pos_hash=batch["pos_hash"] if mask_fn else None,
            neg_hash=batch["neg_hash"] if mask_fn else None,
            symmetric=config.loss.symmetric,
        )

    def loss_and_grads(params, batch, seed):
        towers = _towers(batch, to_seed(seed))
        extra = {name: v for name, v in params.items() if name != "model"}
        objective = functools.partial(loss_of_embeddings, batch=batch)
        enc = encode_packed if pipeline.is_packed(batch) else encode
        if config.train.gradcache:
            loss, (g_model, g_extra) = gradcache.value_and_grad(
                enc,
                objective,
                params["model"],
                towers,
                extra,
                config.train.gradcache_chunk,
                constrain,
            )
        else:

            def full(model_params, extra):
                emb = {name: enc(model_params, *inputs) for name, inputs in towers.items()}
                return objective(emb, extra)

            loss, (g_model, g_extra) = jax.value_and_grad(full, argnums=(0, 1))(
                params["model"], extra
            )
        return loss, {"model": g_model, **g_extra}, temperature(extra)

    return loss_and_grads


class TrainStep:
    """The jitted train step, compiled once per task: ``state, metrics = step(state, batch, task)``.

    The state is donated (updated in place) and keeps its shardings; ``batch`` arrays must
    already be global arrays sharded over the batch axes (`jaxembed.sharding.shard_batch`).
    """

    def __init__(self, graphdef, config, mesh, tx, schedule, state_shardings, pooling: str):
        sharding.check_global_batch(config.train.global_batch, mesh)
        if config.train.gradcache:
            sharding.check_global_batch(config.train.gradcache_chunk, mesh, "gradcache_chunk")
        self.graphdef, self.config, self.mesh = graphdef, config, mesh
        self.tx, self.schedule, self.state_shardings = tx, schedule, state_shardings
        self.pooling = pooling
        self._compiled: dict[str, Callable] = {}

    def _build(self, task: str) -> Callable:
        core = make_loss_and_grads(self.graphdef, self.config, task, self.pooling, self.mesh)
        dropout = self.config.train.dropout

        def step(state: TrainState, batch: dict):
            seed = None
            if dropout:
                seed = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            loss, grads, temp = core(state.params, batch, seed)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
                "param_norm": optax.tree.norm(state.params),
                "lr": self.schedule(state.step),
                "temperature": temp,
            }
            new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            return new, metrics

        return jax.jit(
            step,
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def __call__(self, state: TrainState, batch: dict, task: str = "retrieval"):
        if task not in self._compiled:
            if task not in losses.TASKS:
                raise ValueError(f"unknown task {task!r}; allowed: {', '.join(losses.TASKS)}")
            self._compiled[task] = self._build(task)
        b = batch["neg_valid"].shape[0]
        if b != self.config.train.global_batch:
            raise ValueError(
                f"batch has {b} rows but config.train.global_batch={self.config.train.global_batch}"
            )
        return self._compiled[task](state, batch)


# --- the training run -----------------------------------------------------------------------


class Logger:
    """Scalars to stdout (process 0), ``metrics.jsonl`` and TensorBoard event files."""

    def __init__(self, workdir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.jsonl = open(workdir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def print(self, *args):
        if self.enabled:
            print(*args, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                # TensorBoard tag names allow no "@": "ndcg@10" becomes "ndcg_at_10".
                self.tb.add_scalar(k.replace("@", "_at_"), v, step)
            self.tb.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def prepare_model_dir(source: str, target: Path, pooling: str = "") -> Path:
    """The run's own copy of the backbone's non-weight files (config, tokenizer, ST files).

    A resumed run, the exporter and `jaxembed.load(workdir)` read this copy, so the original
    folder is only needed for the first initialisation. With last-token pooling (``pooling``,
    else the folder's own) the copied tokenizer is saved appending EOS (`encoder.append_eos`),
    so the data pipeline, evaluation and the exported folder all tokenize the same way.
    """
    from jaxembed.encoder import append_eos, load_tokenizer
    from jaxembed.hf.sentence_transformers import read_st_config

    if (target / "config.json").exists():
        return target
    if not source:
        raise ValueError("config.model.path is empty: name a local Hugging Face model folder")
    src = Path(source)
    hf.read_config(src)  # fails early, naming the folder, if it is not a model folder
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in src.iterdir():
        if item.name in hf.io.WEIGHT_FILES or item.suffix in (".safetensors", ".bin", ".pt"):
            continue
        if item.is_dir():
            if item.name.startswith(".") or not any(item.iterdir()):
                continue
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    tensors = hf.io.read_weights(src)
    fam = hf.family(hf.read_config(src)["model_type"])
    info = {
        "source": str(src.absolute()),
        "has_pooler": hf.has_pooler(fam, tensors),
    }
    (tmp / "jaxembed.json").write_text(json.dumps(info, indent=2))
    if (pooling or read_st_config(tmp).pooling) == "lasttoken":
        tokenizer = load_tokenizer(tmp)
        before = tokenizer("a")["input_ids"]
        if append_eos(tokenizer, "lasttoken")("a")["input_ids"] != before:
            tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def build_abstract_model(model_dir: Path, config):
    hf_cfg = hf.read_config(model_dir)
    fam = hf.family(hf_cfg["model_type"])
    info = json.loads((model_dir / "jaxembed.json").read_text())
    cfg = fam.config_from_hf(hf_cfg, has_pooler=info["has_pooler"])
    dtype = jnp.dtype(config.model.dtype)
    return nnx.eval_shape(
        lambda: fam.build(cfg, dtype=dtype, remat=config.model.remat, rngs=nnx.Rngs(0))
    )


class Evaluator:
    """Dev retrieval metrics with the live parameters (no export), averaged over datasets."""

    def __init__(self, config, model, tokenizer, pooling: str, st, meta: dict):
        from jaxembed.convert import trained_prompts
        from jaxembed.encoder import Encoder
        from jaxembed.evaluate import load_beir

        self.sets = {Path(p).name: load_beir(p, config.eval.split) for p in config.eval.data}
        self.groups = {g: tuple(members) for g, members in config.eval.groups.items()}
        max_len = max(config.data.max_query_length, config.data.max_passage_length)
        # Training pools over prompt tokens too, whatever the source folder's include_prompt.
        st = dataclasses.replace(st, include_prompt=True)
        self.encoder = Encoder(model, tokenizer, pooling=pooling, max_length=max_len, st=st)
        self.batch_size = config.eval.batch_size
        # The prompts the exported folder will carry (e.g. F2LLM's one instruction), so the
        # numbers logged here are what `jaxembed.evaluate` gives on the checkpoint.
        prompts = trained_prompts(meta)
        self.query_prompt, self.passage_prompt = prompts["query"], prompts["passage"]
        self.q_len, self.p_len = config.data.max_query_length, config.data.max_passage_length

    @staticmethod
    def _mesh_of(params):
        """The mesh the live parameters are sharded on (it may span several hosts)."""
        leaf = jax.tree.leaves(params)[0]
        return getattr(getattr(leaf, "sharding", None), "mesh", None)

    def __call__(self, params) -> dict:
        from jaxembed.evaluate import METRICS, evaluate_beir, mean_over_sets, on_mesh, reuse_last

        if not self.sets:
            return {}
        self.encoder.set_params(params["model"])
        enc = self.encoder
        mesh = self._mesh_of(params["model"])
        if mesh is not None:
            # Eval batches split over the training mesh's data axes, like `jaxembed.evaluate`
            # on its own mesh; the parameters stay where training keeps them.
            on_mesh(enc, mesh)

        def queries(texts):
            enc.max_length = self.q_len
            return enc.encode(texts, batch_size=self.batch_size, prompt=self.query_prompt)

        def docs(texts):
            enc.max_length = self.p_len
            return enc.encode(texts, batch_size=self.batch_size, prompt=self.passage_prompt)

        docs = reuse_last(docs)  # sets sharing a corpus encode it once
        per_set = {
            name: evaluate_beir(queries, docs, None, data=data) for name, data in self.sets.items()
        }
        out = {f"eval/{name}/{m}": r[m] for name, r in per_set.items() for m in METRICS}
        out.update({f"eval/{m}": v for m, v in mean_over_sets(per_set).items()})
        for group, members in self.groups.items():
            means = mean_over_sets({name: per_set[name] for name in members})
            out.update({f"eval/{group}/{m}": means[m] for m in METRICS})
        return out


INSTRUCTION_SAMPLE = 64  # rows per dataset read to record its instructions


def dataset_instructions(source, sample: int = INSTRUCTION_SAMPLE) -> list[str]:
    """The distinct query instructions of ``sample`` evenly spaced rows of a dataset.

    Instructions are per record, but datasets (F2LLM's, the Debian builder's) use one each;
    a sample finds it without reading a large dataset whole.
    """
    n = len(source)
    rows = np.unique(np.linspace(0, n - 1, min(sample, n)).astype(np.int64)) if n else []
    found = [source[int(i)].get("instruction") or "" for i in rows]
    return sorted({x for x in found if x})


def run_meta(config, model_dir: Path, pooling: str, sources) -> dict:
    """The checkpoint's JSON ``meta`` item: what the exporter and `jaxembed.load` rebuild from."""
    datasets = {}
    for s in sources:
        d = datasets.setdefault(s.name, {"task": s.task, "rows": 0, "instructions": []})
        d["rows"] += len(s)
        d["instructions"] = sorted({*d["instructions"], *dataset_instructions(s)})
    return {
        "model_dir": str(model_dir.absolute()),
        "pooling": pooling,
        # Training pools over every query token, prompt included: batches carry no
        # ``query_pool_mask`` (see `_towers`), so an export must say include_prompt=True.
        "include_prompt": True,
        "query_prefix": config.data.query_prefix,
        "passage_prefix": config.data.passage_prefix,
        "instruction_template": config.data.instruction_template,
        "config": config.to_json_best_effort(),
        "datasets": datasets,
    }


def pipeline_config(config) -> pipeline.PipelineConfig:
    d = config.data
    return pipeline.PipelineConfig(
        global_batch=config.train.global_batch,
        seed=config.train.seed,
        mixing=d.mixing,
        mixing_temperature=d.mixing_temperature,
        num_negatives=tuple(d.num_negatives.items()),
        negatives=d.negatives,
        group_size=d.group_size,
        query_noise=d.query_noise,
        max_query_length=d.max_query_length,
        max_passage_length=d.max_passage_length,
        query_buckets=tuple(d.query_buckets),
        passage_buckets=tuple(d.passage_buckets),
        query_prefix=d.query_prefix,
        passage_prefix=d.passage_prefix,
        instruction_template=d.instruction_template,
    )


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def main(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains per ``config`` in ``workdir``, resuming from its last checkpoint if any.

    Returns the last logged metrics and the evaluations before and after training.
    """
    from jaxembed import checkpoint
    from jaxembed.config import validate
    from jaxembed.data import readers
    from jaxembed.encoder import load_tokenizer
    from jaxembed.hf.sentence_transformers import read_st_config

    started = time.perf_counter()  # train.time_limit_minutes counts from here
    config = validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_dir(workdir)
    distributed.check_same("the run config", config.to_json_best_effort(sort_keys=True))
    log = Logger(workdir, jax.process_index() == 0, config.log.tensorboard)

    # --- mesh ---------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    log.print(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
        f"{jax.process_count()} processes"
    )

    # --- model files and data -----------------------------------------------------------------
    model_dir = workdir / "model"
    if jax.process_index() == 0:
        prepare_model_dir(config.model.path, model_dir, config.model.pooling)
    distributed.barrier("prepare_model_dir")
    st = read_st_config(model_dir)
    pooling = config.model.pooling or st.pooling or "mean"
    sources = readers.open_sources(list(config.data.train), skip_bad=config.data.skip_bad)
    if not sources:
        raise ValueError("config.data.train names no training data")
    distributed.check_same(
        "the training data", "; ".join(f"{s.name} {s.task} {len(s)} rows {s.path}" for s in sources)
    )
    builder = pipeline.BatchBuilder(
        sources,
        str(model_dir),
        pipeline_config(config),
        config.train.steps,
        jax.process_index(),
        jax.process_count(),
    )
    for s in sources:
        log.print(f"data: {s.name} ({s.task}) {len(s):,} rows from {s.path}")
    log.print(f"      {builder.schedule.steps_per_epoch:,} global batches per epoch")

    # --- abstract state, shardings, restore or init -------------------------------------------
    abstract_model = build_abstract_model(model_dir, config)
    graphdef = nnx.graphdef(abstract_model)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    abstract, state_sh = abstract_state(abstract_model, config, mesh, tx)
    # Built before any weights load: it checks the batch against the mesh.
    step_fn = TrainStep(graphdef, config, mesh, tx, schedule, state_sh, pooling)
    packing = make_packing(config, mesh)
    mngr = checkpoint.manager(
        workdir,
        keep=config.ckpt.keep,
        keep_best=config.ckpt.keep_best,
        best_metric=f"eval/{config.eval.best_metric}" if config.ckpt.keep_best else "",
        async_save=config.ckpt.async_save,
    )

    def init():
        model = hf.load_model(
            config.model.path, dtype=jnp.dtype(config.model.dtype), remat=config.model.remat
        )
        return create_state(model, config, mesh, tx)[1]

    state, data_pos, start = checkpoint.restore_or_init(mngr, init, abstract)
    # Batches are a pure function of their index: resuming is starting the dataset there.
    data_iter = pipeline.make_iterator(
        pipeline.make_dataset(builder, data_pos["next_batch"] if data_pos else 0),
        config.data.workers,
        config.data.prefetch,
    )
    log.print("resumed from step" if start else "initialised from", start or config.model.path)
    log.print(
        sharding.describe(
            nnx.state(abstract_model), sharding.state_shardings(nnx.state(abstract_model), mesh)
        )
    )
    meta = run_meta(config, model_dir, pooling, sources)

    tokenizer = load_tokenizer(model_dir)
    evaluator = Evaluator(
        config, nnx.merge(graphdef, state.params["model"]), tokenizer, pooling, st, meta
    )
    results: dict = {}
    if start == 0 and evaluator.sets:
        results["before"] = evaluator(state.params)
        log.print("eval before training: " + _fmt_metrics(results["before"]))
        log.scalars(0, results["before"])

    # --- preemption: finish the step, save, exit cleanly --------------------------------------
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def save(step_no: int, metrics=None, force=False):
        data = {"next_batch": step_no}
        checkpoint.save(mngr, step_no, state, data, meta, metrics=metrics, force=force)

    # --- the loop -----------------------------------------------------------------------------
    t0, seen, tokens, last = time.perf_counter(), 0, 0, {}
    window = {"loss": [], "tasks": {}}
    step = start
    time_limit = 60 * config.train.time_limit_minutes or float("inf")
    try:
        while step < config.train.steps:
            request = PREEMPTED if stop["signal"] else NO_STOP
            if time.perf_counter() - started >= time_limit:
                request = max(request, TIME_LIMIT)
            batch, batch_tokens, request = agree_on_batch(next(data_iter), request, packing, mesh)
            stopping, out_of_time = request == PREEMPTED, request == TIME_LIMIT
            task = batch["task"]
            state, metrics = step_fn(state, pipeline.to_global(batch, mesh), task)
            step += 1
            seen += config.train.global_batch
            tokens += batch_tokens
            window["tasks"].setdefault(task, []).append(metrics["loss"])
            if step % config.log.every == 0 or step == config.train.steps or out_of_time:
                metrics = jax.device_get(metrics)
                check_finite(metrics, step)
                elapsed = time.perf_counter() - t0
                last = {k: float(v) for k, v in metrics.items()}
                for t, values in window["tasks"].items():
                    last[f"loss/{t}"] = float(np.mean(jax.device_get(values)))
                window["tasks"] = {}
                last["examples_per_s"] = seen / elapsed
                last["tokens_per_s"] = tokens / elapsed
                eta = (config.train.steps - step) * elapsed / max(step - start, 1)
                log.scalars(step, last)
                pct = 100 * step / config.train.steps
                log.print(
                    f"step {step}/{config.train.steps} [{pct:5.1f}%] loss {last['loss']:.4f} "
                    f"lr {last['lr']:.2e} |g| {last['grad_norm']:.3f} "
                    f"{last['examples_per_s']:.1f} ex/s {last['tokens_per_s']:.0f} tok/s "
                    f"ETA {_fmt_time(eta)}"
                )
            eval_metrics = None
            if config.eval.every and step % config.eval.every == 0 and evaluator.sets:
                eval_metrics = evaluator(state.params)
                log.scalars(step, eval_metrics)
                log.print(f"eval at step {step}: " + _fmt_metrics(eval_metrics))
            ending = step == config.train.steps or stopping or out_of_time
            if step % config.ckpt.every == 0 or ending:
                check_finite(jax.device_get(metrics), step)
                save(step, eval_metrics, force=stopping or out_of_time)
            if stopping:
                mngr.wait_until_finished()
                why = stop["signal"] or "another host's stop signal"
                log.print(f"{why}: saved step {step}, exiting")
                results["stopped"] = why
                return results | {"last": last, "step": step}
            if out_of_time:
                log.print(
                    f"time limit of {config.train.time_limit_minutes:g} min reached: "
                    f"training ends at step {step} of {config.train.steps}"
                )
                results["time_limit_step"] = step
                break
        if evaluator.sets:
            results["after"] = evaluator(state.params)
            log.scalars(step, results["after"])
            log.print("eval after training:  " + _fmt_metrics(results["after"]))
        mngr.wait_until_finished()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        mngr.close()
        log.close()
    return results | {"last": last, "step": step}


def make_packing(config, mesh) -> pipeline.Packing | None:
    """The train step's packing (``train.packing``), or None.

    Rows are the towers' maximum lengths long; a tower's global row count is a multiple of
    ``train.packing_rows`` (0: a sixteenth of the global batch), rounded up to what the mesh,
    the process count and the GradCache chunk divide.
    """
    if not config.train.packing:
        return None
    hosts = jax.process_count()
    divide = math.lcm(
        sharding.data_parallel_size(mesh),
        hosts,
        config.train.gradcache_chunk if config.train.gradcache else 1,
    )
    granule = config.train.packing_rows or max(1, config.train.global_batch // 16)
    granule = -(-granule // divide) * divide
    return pipeline.Packing(
        config.data.max_query_length,
        config.data.max_passage_length,
        granule // hosts,
        min(PACKED_SEGMENTS, config.data.max_query_length, config.data.max_passage_length),
    )


# Why a run stops early, as exchanged between hosts: the largest request wins, so a
# preemption (save and exit) overrides a spent time limit (finish: eval after, save).
NO_STOP, TIME_LIMIT, PREEMPTED = 0, 1, 2


def agree_on_batch(
    batch: dict, stop_request: int, packing: pipeline.Packing | None = None, mesh=None
) -> tuple[dict, int, int]:
    """What every host must agree on before a step: ``(batch, global tokens, stop request)``.

    Hosts exchange their batch's index, source and padded lengths, its real token count,
    their stop request (``PREEMPTED``: SIGTERM on one preempted host; ``TIME_LIMIT``:
    ``train.time_limit_minutes`` spent) and, when packing, the rows each tower needs. All
    pad to the largest lengths (or pack into the most rows), and all stop after the same
    step for the same reason, so none is left waiting in a collective. On one process
    nothing is exchanged.
    """
    lq, lp = pipeline.lengths(batch)
    plans = packing.plan(batch) if packing else {}
    towers = ("query", "pos", "neg")
    need = [len(plans.get(t, ())) for t in towers]
    local = [batch["step"], batch["source"], lq, lp, batch["num_tokens"], stop_request]
    hosts = distributed.gather(np.asarray(local + need, np.int64))
    if (hosts[:, :2] != hosts[0, :2]).any():
        raise RuntimeError(
            "hosts disagree on the global batch (index, dataset) per process: "
            f"{hosts[:, :2].tolist()}; the input pipelines are out of step"
        )
    if packing:
        most = dict(zip(towers, hosts[:, 6:].max(0).tolist(), strict=True))
        rows = {t: packing.rows(most[t]) for t in plans}
        count = jax.process_count()
        offsets = {t: sharding.local_rows(mesh, r * count).start for t, r in rows.items()}
        batch = packing.pack(batch, plans, rows, offsets)
    else:
        batch = pipeline.pad_lengths(batch, int(hosts[:, 2].max()), int(hosts[:, 3].max()))
    return batch, int(hosts[:, 4].sum()), int(hosts[:, 5].max())


def check_finite(metrics: dict, step: int) -> None:
    for key in ("loss", "grad_norm"):
        if not np.isfinite(metrics[key]):
            raise FloatingPointError(
                f"non-finite {key} ({metrics[key]}) at step {step}; "
                "the last good checkpoint is kept"
            )


def _fmt_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if k.count("/") == 1]
    return " ".join(f"{k.split('/')[1]} {metrics[k]:.4f}" for k in keys)


def cli(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    flags_def = flags.FLAGS
    config_flags.DEFINE_config_file(
        "config", None, "Python config file (get_config()).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, the model's files.")
    flags.DEFINE_string("coordinator", None, distributed.HELP["coordinator"])
    flags.DEFINE_integer("num_processes", None, distributed.HELP["num_processes"])
    flags.DEFINE_integer("process_id", None, distributed.HELP["process_id"])
    flags.DEFINE_integer("heartbeat_timeout", None, distributed.HELP["heartbeat_timeout"])
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_argv):
        from absl import logging as absl_logging

        # Orbax and Grain log every save and prefetch at INFO; the run's own lines suffice.
        absl_logging.set_verbosity(absl_logging.WARNING)
        f = flags_def
        distributed.initialize(f.coordinator, f.num_processes, f.process_id, f.heartbeat_timeout)
        results = distributed.run(lambda: main(f.config, f.workdir))
        if "before" in results and "after" in results and jax.process_index() == 0:
            b, a = results["before"], results["after"]
            print(
                f"dev nDCG@10: {b['eval/ndcg@10']:.4f} before -> "
                f"{a['eval/ndcg@10']:.4f} after training"
            )
            for group in f.config.eval.groups:
                key = f"eval/{group}/ndcg@10"
                print(
                    f"  {group}: {b[key]:.4f} before -> {a[key]:.4f} after ({a[key] - b[key]:+.4f})"
                )

    app.run(run, argv=argv)


if __name__ == "__main__":
    cli()
