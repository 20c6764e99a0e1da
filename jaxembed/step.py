"""The train step: encode the towers, the task's loss on the global batch, its gradients, AdamW.

`make_step` builds a run's `Step` once, from its config, mesh and (abstract or loaded)
model: the optimizer, the state's shardings, each task's loss (`losses.make_loss`) and the
row layout (`row_packing`); ``state, metrics = step(state, batch, task)`` runs `train_step`
jitted for the task. `train_step` is the whole step on one screen: every tower (queries,
positives, hard negatives) is encoded by the backbone and pooled per text, each text's slot
picks its embedding, the Dense head maps it, and the task's loss compares the (B, dim)
queries with the positives of the whole *global* batch (sharded: in-batch negatives come
from every device and host, gradients flow to every gathered passage) and each row's hard
negatives. With ``train.gradcache`` the same loss is differentiated chunk by chunk
(`jaxembed.gradcache`), with the same result. A sparse model's terms join it there, on the
same gathered vectors, scored by dot product: CSR's reconstructions (`csr_reconstruction`,
its dead-latent counts returned as the state's new ``buffers``) or SPLADE's FLOPS
regularisers (`splade_flops`). A multi-vector model (pooling `TOKENS`) keeps every token:
each text's token vectors out of its row (`text_tokens`), the head applied per token, the
loss's MaxSim over them (`search.maxsim`).

A batch is rows of token ids with segment ids (`jaxembed.packing`; packed from a host's
texts by `jaxembed.data.pipeline.Packing`): attention and pooling stay within each text,
and a slot per text gathers its embedding back into the (B, dim) order the loss uses.
B rows of the global batch, K hard negatives each:

    query_ids, query_seg, query_pool   (Rq, Lq) int32  ids, segment ids, pooled segments
    query_keys                         (Rq, Lq) int32  the segment ids attended to (present
                                       when ColBERT's query expansion is not attended)
    pos_ids, pos_seg                   (Rp, Lp) int32
    neg_ids, neg_seg                   (Rn, Lp) int32  (present when K > 0)
    query_slot, pos_slot, neg_slot     (B, 2), (B, 2), (B, K, 2) int32  (global row, segment - 1)
    neg_valid                          (B, K) bool     False for padded negatives
    pos_hash, neg_hash                 (B,), (B, K) int32 text hashes (false negatives)
    teacher                            (B, 1 + K) float32 teacher scores, NaN where none
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxembed import gradcache, losses, search, sharding
from jaxembed.choices import TASKS
from jaxembed.data import pipeline
from jaxembed.models import lora, sparse
from jaxembed.models.head import HeadLayer
from jaxembed.models.pooling import SPLADE, TOKENS, pool_segments, splade_inputs
from jaxembed.packing import MAX_SEGMENTS
from jaxembed.seeds import to_seed
from jaxembed.train_state import TrainState, abstract_state, create_state, make_optimizer


def train_step(state: TrainState, batch: dict, frozen, *, step: Step, task: str, update=True):
    """One optimizer step: ``(state, metrics)``; with ``update=False`` only ``(loss,
    gradients, temperature)`` (what tests compare across meshes, packings and GradCache).

    ``frozen``: a LoRA run's base weights (read, never updated; only the adapters train),
    else None. Dropout draws one seed per row from the step's seed (`gradcache.row_seeds`),
    so the masks are the same however the rows are chunked or sharded.
    """
    config = step.config
    params, trained = state.params, "lora" if "lora" in state.params else "model"
    extra = {name: v for name, v in params.items() if name != trained}
    seed = None
    if config.train.dropout:
        seed = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    inputs = towers(batch, to_seed(seed))

    def encode(p, *tower):  # (rows, segments, dim) pooled per text; (rows, L, dim) tokens
        return step.encode(p if frozen is None else lora.join(frozen, p), *tower)

    def objective(emb: dict, extra: dict) -> tuple[jax.Array, dict]:
        """The loss of the towers' embeddings, and the updated ``buffers``."""
        slots = {t: batch[f"{t}_slot"].reshape(-1, 2) for t in emb}  # (row, segment) per text
        if step.pooling == TOKENS:  # each text's token vectors, its row's other texts masked
            real = {t: text_tokens(batch[f"{t}_seg"], slots[t]) for t in emb}
            emb = {t: e[slots[t][:, 0]] for t, e in emb.items()}
        else:
            emb = {t: e[slots[t][:, 0], slots[t][:, 1]] for t, e in emb.items()}
        head = None if step.head is None else nnx.merge(step.head, extra["head"])
        if head is not None:
            emb = {t: head.before_sparse(e) for t, e in emb.items()}
        if step.pooling == TOKENS:
            emb = {t: search.token_sets(e, real[t], query=t == "query") for t, e in emb.items()}
        emb = {t: step.constrain(e) for t, e in emb.items()}
        b, k = batch["neg_valid"].shape
        if step.csr:  # CSR: the reconstructions of the dense inputs, then the top-k
            recon, stats = csr_reconstruction(head.sparse, emb, batch, state.buffers, config)
            emb = {t: step.constrain(head.sparse(e)) for t, e in emb.items()}
        shape = emb["pos"].shape[1:]  # (dim,) or (L, dim)
        negatives = emb["neg"].reshape(b, k, *shape) if k else jnp.zeros((b, 0, *shape))
        loss = step.losses[task](
            emb["query"], emb["pos"], negatives,
            temperature=losses.temperature(extra, config.loss), neg_mask=batch["neg_valid"],
            pos_hash=batch["pos_hash"], neg_hash=batch["neg_hash"], teacher=batch["teacher"],
        )  # fmt: skip
        if step.csr:
            return config.loss.csr_gamma * loss + recon, {sparse.STATS: stats}
        if step.pooling == SPLADE:
            loss = loss + splade_flops(emb["query"], emb["pos"], negatives, batch, state, config)
        return loss, {}

    if config.train.gradcache:
        chunk = config.train.gradcache_chunk
        (loss, buffers), (g_trained, g_extra) = gradcache.value_and_grad(
            encode, objective, params[trained], inputs, extra, chunk, step.constrain
        )
    else:

        def full(p, extra):
            return objective({t: encode(p, *x) for t, x in inputs.items()}, extra)

        (loss, buffers), (g_trained, g_extra) = jax.value_and_grad(full, (0, 1), has_aux=True)(
            params[trained], extra
        )
    grads = {trained: g_trained, **g_extra}
    temperature = losses.temperature(extra, config.loss)
    if not update:
        return loss, grads, temperature
    updates, opt_state = step.tx.update(grads, state.opt_state, params)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": step.schedule(state.step),
        "temperature": temperature,
    }
    if step.csr:  # latents that have not fired for dead_threshold forward passes
        dead = buffers[sparse.STATS] > step.csr.dead_threshold
        metrics["dead_latents"] = jnp.sum(dead).astype(jnp.float32)
    params = optax.apply_updates(params, updates)
    state = state.replace(params=params, opt_state=opt_state, buffers=buffers)
    return state.replace(step=state.step + 1), metrics


def csr_reconstruction(sae, emb: dict, batch: dict, buffers: dict, config):
    """CSR's reconstruction terms of the towers' dense embeddings and the updated
    dead-latent counts (`jaxembed.models.sparse`), over sentence-transformers' columns in
    its order: queries, positives, then each row's first, second, ... hard negative
    (padded negatives left out). A dict through jax.grad comes back with sorted keys:
    the order is spelled out here."""
    b, k = batch["neg_valid"].shape
    columns = [(emb["query"], jnp.ones(b, bool)), (emb["pos"], jnp.ones(b, bool))]
    if k:
        negatives = emb["neg"].reshape(b, k, -1)
        columns += [(negatives[:, j], batch["neg_valid"][:, j]) for j in range(k)]
    return sparse.reconstruction_loss(sae, columns, buffers[sparse.STATS], config.loss.csr_beta)


def splade_flops(queries, positives, negatives, batch: dict, state, config) -> jax.Array:
    """SPLADE's FLOPS regularisers on the queries and on the documents (positives and real
    hard negatives), their weights ramped up quadratically (sentence-transformers' rule:
    ``(step / warmup) ** 2``, the step counted from 0)."""
    b, k, d = negatives.shape
    docs = jnp.concatenate([positives, negatives.reshape(b * k, d)])
    real = jnp.concatenate([jnp.ones(b, bool), batch["neg_valid"].reshape(-1)])
    warmup = config.loss.splade_warmup_steps or max(config.train.steps // 3, 1)
    ramp = jnp.minimum(state.step / warmup, 1.0) ** 2
    return ramp * (
        config.loss.splade_query_weight * losses.flops(queries)
        + config.loss.splade_document_weight * losses.flops(docs, real)
    )


@dataclasses.dataclass(eq=False)
class Step:
    """A run's trainable step (`make_step` builds it): ``state, metrics = step(state, batch,
    task, frozen)`` runs `train_step`, jitted once per task, the state donated and kept in its
    shardings. ``batch`` arrays are global arrays sharded over the batch axes."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    head: nnx.GraphDef | None  # the Dense head's, if the model has one
    csr: HeadLayer | None  # a CSR model's autoencoder (`jaxembed.models.sparse`)
    pooling: str
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState  # ShapeDtypeStructs with shardings: what a checkpoint restores into
    shardings: TrainState
    losses: dict[str, Callable] = dataclasses.field(init=False)  # per task, built once
    encode: Callable = dataclasses.field(init=False)  # `make_encode`'s
    _jitted: dict = dataclasses.field(init=False, default_factory=dict)

    def __post_init__(self):
        sparse = self.csr is not None or self.pooling == SPLADE
        similarity = "dot" if sparse else "cosine"  # a sparse model's vectors: never normalised
        self.losses = {t: losses.make_loss(self.config.loss, t, similarity) for t in TASKS}
        self.encode = make_encode(self.graphdef, self.pooling, texts_per_row(self.config))

    def constrain(self, x):
        """Keeps each GradCache chunk (and every embedding) spread over the data axes."""
        if x is None:  # the row seeds when dropout is off
            return x
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(self.mesh, x.ndim))

    def init(self, model: nnx.Module, head: nnx.Module | None = None) -> TrainState:
        """The sharded train state of a loaded ``model`` (and ``head``)."""
        return create_state(model, self.config, self.mesh, self.tx, head)[1]

    def frozen(self, model: nnx.Module) -> dict | None:
        """A LoRA model's frozen base weights (pure dict) in their shards, which the step
        reads as an argument of their own: never donated, copied or held by the optimizer;
        None without adapters."""
        if not lora.adapters(model):
            return None
        base = lora.split(model)[1]
        shardings = nnx.to_pure_dict(sharding.state_shardings(base, self.mesh))
        return jax.device_put(nnx.to_pure_dict(base), shardings)

    def jitted(self, task: str, update: bool = True) -> Callable:
        """`train_step` for ``task`` jitted (built on first use)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
        if (task, update) not in self._jitted:
            fn = functools.partial(train_step, step=self, task=task, update=update)
            outs = (self.shardings, sharding.replicated(self.mesh)) if update else None
            self._jitted[task, update] = jax.jit(
                fn, out_shardings=outs, donate_argnums=(0,) if update else ()
            )
        return self._jitted[task, update]

    def __call__(self, state: TrainState, batch: dict, task: str = "retrieval", frozen=None):
        b = batch["neg_valid"].shape[0]
        if b != self.config.train.global_batch:
            raise ValueError(
                f"batch has {b} rows but config.train.global_batch={self.config.train.global_batch}"
            )
        return self.jitted(task)(state, batch, frozen)

    def loss_and_grads(self, state: TrainState, batch: dict, task="retrieval", frozen=None):
        """``(loss, gradients, temperature)`` of `train_step` without the update."""
        return self.jitted(task, update=False)(state, batch, frozen)


def make_step(config, mesh, model: nnx.Module, head=None, pooling: str = "mean") -> Step:
    """The trainable step of ``model`` and its Dense ``head`` (concrete, or abstract from
    `nnx.eval_shape`: nothing is read or placed) on ``mesh``, per ``config`` (validated):
    AdamW with its schedule, the state's shapes and shardings, each task's loss. It checks the
    global batch (and GradCache chunk) against the mesh."""
    sharding.check_global_batch(config.train.global_batch, mesh)
    if config.train.gradcache:
        sharding.check_global_batch(config.train.gradcache_chunk, mesh, "gradcache_chunk")
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    abstract, shardings = abstract_state(model, config, mesh, tx, head)
    head_def = None if head is None else nnx.graphdef(head)
    csr = None if head is None or head.sparse is None else head.sparse.layer
    sparse = csr is not None or pooling == SPLADE
    if sparse and (config.loss.matryoshka_dims or config.loss.quantization != "none"):
        raise ValueError(
            "a sparse model's vectors are neither truncated nor quantized: set "
            "config.loss.matryoshka_dims=() and config.loss.quantization=none"
        )
    if pooling == TOKENS and config.loss.quantization != "none":
        raise ValueError(
            "a multi-vector model's token vectors are not quantized: set "
            "config.loss.quantization=none"
        )
    return Step(
        config, mesh, nnx.graphdef(model), head_def, csr, pooling, tx, schedule, abstract, shardings
    )


# --- the towers ------------------------------------------------------------------------------


def texts_per_row(config) -> int:
    """How many texts a row of the step holds: several with ``train.packing``, else one."""
    return MAX_SEGMENTS if config.train.packing else 1


def make_encode(graphdef, pooling: str, segments: int) -> Callable:
    """``encode(model_params, ids, seg, pool_seg, seeds, keys=None) -> (rows, segments,
    hidden)``, fp32; with `TOKENS` pooling (late interaction) every token's: ``(rows,
    length, hidden)``. ``keys``: the segment ids of the tokens attended to (None: ``seg``).

    Rows of texts (`jaxembed.packing`): every text is pooled on its own, as if alone in its
    row. ``seeds`` (one per row, or None: no dropout) make each row's dropout masks depend
    only on its own seed (`jaxembed.models.layers.dropout`): identical whatever the chunking
    or the mesh. ``segments`` is the most texts a row holds (1: one per row).
    """

    def encode(model_params, ids, seg, pool_seg, seeds, keys=None):
        model = nnx.merge(graphdef, model_params)
        if seeds is not None:
            lora.seed_dropout(model, seeds)  # LoRA adapters' dropout, if any
        # One text per row is a padded batch: key lengths, not a mask, for fused kernels.
        packed = seg if segments > 1 else None
        attended = (seg if keys is None else keys) > 0
        hidden = model(ids, attended, segment_ids=packed, dropout_seed=seeds)
        if pooling == TOKENS:  # late interaction: every token's vector
            return hidden.astype(jnp.float32)
        hidden = splade_inputs(model, hidden, pooling)  # SPLADE pools the MLM logits
        return pool_segments(hidden, pool_seg, seg, pooling, min(segments, ids.shape[1]))

    return encode


def text_tokens(seg: jax.Array, slots: jax.Array) -> jax.Array:
    """(texts, L) bool: each text's tokens in its row (``slots``: (row, segment - 1) per
    text), prompt tokens included, as sentence-transformers' MultiVectorMask scores them."""
    return seg[slots[:, 0]] == slots[:, 1:] + 1


def towers(batch: dict, seed) -> dict[str, tuple]:
    """The encoder's inputs per tower: ``(ids, segment ids, pooled segments, row seeds,
    attended segment ids or None)``."""
    out = {}
    kinds = (("query", "query_pool"), ("pos", "pos_seg"), ("neg", "neg_seg"))
    for t, (name, pool_key) in enumerate(kinds):
        if f"{name}_ids" in batch:
            ids = batch[f"{name}_ids"]
            seeds = gradcache.row_seeds(seed, t, ids.shape[0])
            keys = batch.get(f"{name}_keys")
            out[name] = (ids, batch[f"{name}_seg"], batch[pool_key], seeds, keys)
    return out


def row_packing(config, mesh) -> pipeline.Packing:
    """How the step lays out its rows (`jaxembed.data.pipeline.Packing`).

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
