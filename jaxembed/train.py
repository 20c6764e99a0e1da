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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from jaxembed import gradcache, losses, sharding
from jaxembed.models.layers import to_seed
from jaxembed.models.pooling import pool

NO_DECAY = ("bias", "scale")  # LayerNorm / RMSNorm scales and every bias


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
        return keys[0] == "model" and keys[-1] not in NO_DECAY

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
    graphdef, nnx_state, params = init_params(model, config)
    repl = sharding.replicated(mesh)
    param_sh = {"model": nnx.to_pure_dict(sharding.state_shardings(nnx_state, mesh))}
    if "log_temperature" in params:
        param_sh["log_temperature"] = repl
    params = jax.device_put(params, param_sh)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: repl
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), repl),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)), repl),
    )
    state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)
    return graphdef, state, state_sh


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


def _towers(batch: dict, seed) -> dict[str, tuple]:
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
    mask_fn = config.loss.false_negative_masking

    def constrain(x):
        # Keep each GradCache chunk spread over the data-parallel devices.
        if x is None:
            return x
        spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    def temperature(extra):
        if "log_temperature" in extra:
            return jnp.exp(extra["log_temperature"])
        return jnp.float32(config.loss.temperature)

    def loss_of_embeddings(emb, extra, batch):
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
        if config.train.gradcache:
            loss, (g_model, g_extra) = gradcache.value_and_grad(
                encode,
                objective,
                params["model"],
                towers,
                extra,
                config.train.gradcache_chunk,
                constrain,
            )
        else:

            def full(model_params, extra):
                emb = {name: encode(model_params, *inputs) for name, inputs in towers.items()}
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
        b = batch["query_ids"].shape[0]
        if b != self.config.train.global_batch:
            raise ValueError(
                f"batch has {b} rows but config.train.global_batch={self.config.train.global_batch}"
            )
        return self._compiled[task](state, batch)


def num_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
