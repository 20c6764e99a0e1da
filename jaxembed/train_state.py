"""The train state: parameters, the optimizer and its state, step and RNG, placed sharded.

`make_optimizer` is AdamW with masked weight decay, global-norm clipping, warmup then decay;
`create_state` builds the state from a model, `abstract_state` its shape and shardings (what
a checkpoint restores into).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from jaxembed import sharding
from jaxembed.models import lora
from jaxembed.models.sparse import STATS

NO_DECAY = ("bias", "scale")  # LayerNorm / RMSNorm scales and every bias


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine / linear decay to ``min_lr``, or constant.

    Indexed by the optimizer's count (0 at step 1) but evaluated one step on, so step 1
    trains at ``lr / warmup_steps`` rather than 0 and the last step at ``min_lr``.
    """
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    if optim.schedule in ("cosine", "linear"):
        if optim.schedule == "cosine":
            alpha = optim.min_lr / optim.lr
            decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=alpha)
        else:
            decay = optax.linear_schedule(optim.lr, optim.min_lr, decay_steps)
        # Its last value is min_lr up to fp32 rounding (cosine -7.45e-13, linear -2.42e-12
        # for 0): never below.
        after = lambda count: jnp.maximum(decay(count), optim.min_lr)  # noqa: E731
    else:
        after = optax.constant_schedule(optim.lr)
    if optim.warmup_steps:  # the warmup starts below min_lr: the floor is the decay's only
        after = optax.join_schedules([warmup, after], [optim.warmup_steps])
    return lambda count: after(count + 1)


def decay_mask(params) -> dict:
    """True for parameters that get weight decay: matrices and embeddings, not norms/biases."""

    def leaf(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        # The HF pooler is exported but unused for embeddings: leave it untouched.
        decayed = keys[0] in ("model", "lora", "head")
        return decayed and keys[-1] not in NO_DECAY and "pooler" not in keys

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


@struct.dataclass
class TrainState:
    step: jax.Array
    # {"model": pure dict of fp32 arrays (or "lora": the adapters', the base frozen apart),
    #  ["head": the Dense head's], ["log_temperature": ()]}
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # base PRNG key data; each step's dropout seed derives from (rng, step)
    # State the step updates but does not train: a sparse (CSR) head's dead-latent counts
    # ({"stats_last_nonzero": (hidden,) int32}, `jaxembed.models.sparse`); {} otherwise.
    buffers: dict


def init_buffers(head=None) -> dict:
    """The train state's ``buffers`` for ``head`` (concrete or abstract)."""
    if head is None or head.sparse is None:
        return {}
    return {STATS: jnp.zeros((head.sparse.layer.out_features,), jnp.int32)}


def init_params(model: nnx.Module, config: ml_collections.ConfigDict, head=None) -> tuple:
    """Splits ``model`` (and ``head``, the Dense layers after pooling, if any) into
    ``(graphdef, nnx states with axis metadata, trainable params dict)``.

    The graphdef is the whole model's (adapters included), merged with the full tree.
    """
    graphdef, state = nnx.split(model)
    # With LoRA adapters only they train; the rest is `frozen_params`.
    states = {"lora": lora.split(model)[0]} if lora.adapters(model) else {"model": state}
    params = {k: nnx.to_pure_dict(v) for k, v in states.items()}
    if head is not None:
        states["head"] = nnx.state(head)
        params["head"] = nnx.to_pure_dict(states["head"])
    if config.loss.learnable_temperature:
        params["log_temperature"] = jnp.log(jnp.float32(config.loss.temperature))
    return graphdef, states, params


def create_state(model: nnx.Module, config: ml_collections.ConfigDict, mesh, tx, head=None):
    """The sharded train state for ``model`` and ``head`` (host or device arrays) on ``mesh``.

    Returns ``(graphdef, state, state_shardings)``; parameters are placed directly in their
    shards and the optimizer state is created by a jit whose outputs are already sharded.
    """
    graphdef, _, params = init_params(model, config, head)
    _, state_sh = abstract_state(model, config, mesh, tx, head)
    repl = sharding.replicated(mesh)
    params = jax.device_put(params, state_sh.params)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), repl),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)), repl),
        buffers=jax.device_put(init_buffers(head), repl),
    )
    return graphdef, state, state_sh


def abstract_state(model: nnx.Module, config: ml_collections.ConfigDict, mesh, tx, head=None):
    """``(state, shardings)`` of ShapeDtypeStructs: the train state's shape, no arrays made.

    ``model`` and ``head`` may be abstract (`nnx.eval_shape`); this is what a checkpoint
    restores into.
    """
    _, states, params = init_params(model, config, head)
    repl = sharding.replicated(mesh)
    param_sh = {k: nnx.to_pure_dict(sharding.state_shardings(v, mesh)) for k, v in states.items()}
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
        buffers=jax.eval_shape(lambda: init_buffers(head)),
    )
    buffers = jax.tree.map(lambda _: repl, state.buffers)
    shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, buffers=buffers)
    with_sh = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    return with_sh, shardings
