"""``python -m jaxembed.train ... --dry-run tpu:8``: a run's step lowered for a device this host
does not have, before anyone pays for the device.

The model is built from its folder's ``config.json`` only (abstract parameters: no weights,
tokenizer or training data are read), the train step and the encoder are traced for the
run's mesh on N host CPU devices and lowered for the target platform (JAX lowers for
another platform on any host), and each lowering reports what the first real run would
meet: which attention implementation each call chose and why, whether the fused kernel
is in the lowered module (``__cudnn$fmha`` on GPU, ``tpu_custom_call`` on TPU), and the
largest tensor of the module. What would fail at the first compile (a kernel that cannot
be partitioned, a mask a kernel refuses, a batch that does not split over the mesh) fails
here, as one line.

On a GPU, JAX reads the cuDNN version and the compute capability from the device; here
`stand_in_gpu` answers for it (cuDNN 9.10, Hopper), so the checks that depend on them run
as on an H100. XLA partitions cuDNN calls only when it compiles (`custom_partitioning`),
so for ``gpu:N`` with N > 1 the program of one device (its rows) is lowered too, where the
kernel shows.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed import config as config_lib
from jaxembed import hf, sharding, trained_model
from jaxembed import step as step_lib
from jaxembed.data import pipeline
from jaxembed.hf.sentence_transformers import output_settings, read_st_config
from jaxembed.models import attention as attention_lib
from jaxembed.models import lora
from jaxembed.models.head import build_head
from jaxembed.models.pooling import SPLADE

PLATFORMS = ("tpu", "gpu", "cpu")
KERNELS = {"gpu": "__cudnn$fmha", "tpu": "tpu_custom_call"}
LOWER_AS = {"gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}  # JAX's names for lowering
BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i8": 1, "i1": 1}


def parse_target(text: str) -> tuple[str, int]:
    """``"tpu:8"`` -> ("tpu", 8); an error naming the accepted form otherwise."""
    platform, _, count = text.partition(":")
    if platform not in PLATFORMS or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"--dry-run {text!r}: expected PLATFORM:DEVICES with PLATFORM one of "
            f"{', '.join(PLATFORMS)} (e.g. tpu:8, gpu:8)"
        )
    return platform, int(count)


def use_host_devices(count: int) -> list:
    """``count`` CPU devices of this process: asks XLA for them if JAX has not started its
    backends yet, else takes the first ``count`` (it says so if there are fewer)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        flags = os.environ.get("XLA_FLAGS", "")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
        jax.config.update("jax_platforms", "cpu")
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise RuntimeError(
            f"--dry-run needs {count} host CPU devices, but JAX already runs {len(devices)} "
            "in this process"
        )
    return devices[:count]


@contextlib.contextmanager
def stand_in_gpu():
    """JAX's cuDNN checks answered as on an H100 (cuDNN 9.10, compute capability 9.0),
    for lowering cuDNN calls on a host without a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    saved = fa.check_cudnn_version, fa.check_compute_capability
    fa.check_cudnn_version = lambda: 91000
    fa.check_compute_capability = lambda cap: tuple(map(int, cap.split("."))) <= (9, 0)
    try:
        yield
    finally:
        fa.check_cudnn_version, fa.check_compute_capability = saved


def lowered(jitted, args: tuple, platform: str) -> tuple[str, list[tuple[str, str]]]:
    """``jitted(*args)`` traced with the kernels of ``platform`` and lowered for it: the
    module's text and what each attention call chose (`attention.recording`)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(attention_lib.lowering_for(platform))
        if platform == "gpu":
            stack.enter_context(stand_in_gpu())
        calls = stack.enter_context(attention_lib.recording())
        text = jitted.trace(*args).lower(lowering_platforms=(LOWER_AS[platform],)).as_text()
    return text, calls


def lower(jitted, args: tuple, platform: str, what: str, impl: str = "auto") -> list[str]:
    """The report's lines for `lowered`: what attention ``impl`` (model.attention) chose in
    each call, the fused kernel found or not, the largest tensor."""
    text, calls = lowered(jitted, args, platform)
    with attention_lib.lowering_for(platform):
        chosen = attention_lib.describe(impl, calls) if calls else "attention: none traced"
    lines = [f"  {what}", f"    {chosen}"]
    if kernel := KERNELS.get(platform):
        found = text.count(kernel)
        status = f"{found} {kernel} calls" if found else f"no {kernel} in the module"
        if not found and (partitioned := text.count("CustomSPMDPartitioning")):
            status += f" ({partitioned} calls partitioned by XLA when it compiles)"
        lines.append(f"    fused kernel: {status}")
    shape, size = largest_tensor(text)
    kib = len(text) / 2**10
    lines.append(f"    largest tensor: {shape} ({size / 2**20:,.1f} MiB); module {kib:,.0f} KiB")
    return lines


def largest_tensor(module_text: str) -> tuple[str, int]:
    """The largest tensor type in a lowered module and its bytes (per device inside a
    manual computation, global elsewhere)."""
    best = ("-", 0)
    for dims, dtype in re.findall(r"tensor<((?:\d+x)+)(\w+)>", module_text):
        n = math.prod(int(d) for d in dims.rstrip("x").split("x")) * BYTES.get(dtype, 4)
        if n > best[1]:
            best = (f"{dims}{dtype}", n)
    return best


def abstract_model(config) -> tuple[nnx.Module, nnx.Module | None]:
    """The backbone (adapters and attention as configured) and its Dense head (None if
    none), shapes only, from ``config.model.path``'s config.json and sentence-transformers
    files: no weights read."""
    folder = Path(config.model.path)
    hf_cfg = hf.read_config(folder)
    fam = hf.family(hf_cfg["model_type"])
    st = run_settings(config)
    # The MLM head's presence in the weights is checked when the run starts: none read here.
    mlm_head = st.pooling == SPLADE
    cfg = hf.model_config(hf_cfg, mlm_head=mlm_head, source=folder)

    def build():
        dtype = jnp.dtype(config.model.dtype)
        model = fam.build(cfg, dtype=dtype, remat=config.model.remat, rngs=nnx.Rngs(0))
        model.attention = config.model.attention
        return trained_model.with_adapters(model, trained_model.lora_spec(config))

    layers = st.head
    head = nnx.eval_shape(lambda: build_head(layers, cfg.hidden_size)) if layers else None
    return nnx.eval_shape(build), head


def run_settings(config):
    """The sentence-transformers settings the run will have (its model type applied)."""
    folder = Path(config.model.path)
    hidden = hf.read_config(folder)["hidden_size"]
    return output_settings(read_st_config(folder), hidden, **config_lib.output_type(config))


def abstract(tree, shardings):
    """ShapeDtypeStructs of ``tree`` with ``shardings`` (a tree of them, or one for all)."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def host_batch(
    config, length_q: int, length_p: int, seed: int = 0, hidden_expansion: bool = False
) -> dict:
    """A host batch (`jaxembed.data.pipeline`) of a global batch of random texts at full
    ``length_q`` / ``length_p`` tokens: the step's largest rows at those lengths.
    ``hidden_expansion``: the queries end in a query expansion that is not attended."""
    rng = np.random.default_rng(seed)
    b = config.train.global_batch
    k = int(dict(config.data.num_negatives).get("retrieval", 0))

    def texts(n, length):
        return [rng.integers(5, 100, length).tolist() for _ in range(n)]

    return dict(
        query=texts(b, length_q),
        query_hidden=[length_q // 2] * b if hidden_expansion else None,
        pos=texts(b, length_p),
        neg=texts(b * k, length_p),
        neg_valid=np.ones((b, k), bool),
        pos_hash=np.arange(b, dtype=np.int32),
        neg_hash=np.arange(b * k, dtype=np.int32).reshape(b, k),
        pad_id=np.int32(0),
    )


def frozen(model: nnx.Module, mesh) -> dict | None:
    """A LoRA model's frozen base weights as sharded ShapeDtypeStructs; None without LoRA."""
    if not lora.adapters(model):
        return None
    base = lora.split(model)[1]
    shardings = nnx.to_pure_dict(sharding.state_shardings(base, mesh))
    return abstract(nnx.to_pure_dict(base), shardings)


def dry_run(config, target: str) -> list[str]:
    """The report of ``--dry-run PLATFORM:N`` for a validated ``config``: the run's train step,
    at its longest and shortest buckets, and its encoder, lowered for N devices of PLATFORM on
    this host's CPU devices, from the model's config.json alone."""
    platform, count = parse_target(target)
    devices = use_host_devices(count)
    model, head = abstract_model(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    settings = run_settings(config)
    pooling = config.model.pooling or settings.pooling or "mean"
    hidden = bool(settings.query_expansion) and not settings.query_expansion_attend
    dp, impl = sharding.data_parallel_size(mesh), config.model.attention
    step = step_lib.make_step(config, mesh, model, head, pooling)
    lines = header(platform, count, mesh, config, step.abstract, frozen(model, mesh))
    data = pipeline.PipelineConfig.from_config(config)
    query, passage = data.buckets("query"), data.buckets("passage")
    for lq, lp in dict.fromkeys([(max(query), max(passage)), (min(query), min(passage))]):
        batch = host_batch(config, lq, lp, hidden_expansion=hidden)
        arrays = step_lib.row_packing(config, mesh).pack_local(batch)
        args = (step.abstract, on(arrays, mesh), frozen(model, mesh))
        what = f"train step (rows x tokens: {rows(arrays)})"
        lines += lower(step.jitted("retrieval"), args, platform, what, impl)
        if platform == "gpu" and dp > 1:  # XLA partitions cuDNN calls only when it compiles
            one = config.copy_and_resolve_references()
            one.train.global_batch //= dp
            one.train.gradcache_chunk = max(1, one.train.gradcache_chunk // dp)
            mesh1 = sharding.make_mesh(1, 1, 1, devices[:1])
            step1 = step_lib.make_step(one, mesh1, model, head, pooling)
            args = (step1.abstract, on(arrays, None, dp), frozen(model, mesh1))
            what = "train step on one device (its rows)"
            lines += lower(step1.jitted("retrieval"), args, platform, what, impl)
    encode = jax.jit(
        step_lib.make_encode(nnx.graphdef(model), pooling, step_lib.texts_per_row(config))
    )
    n = -(-config.eval.batch_size // dp) * dp
    ids = on({"ids": np.zeros((n, max(passage)), np.int32)}, mesh)["ids"]
    params = abstract(nnx.to_pure_dict(nnx.state(model)), sharding.replicated(mesh))
    what = f"encoder ({n} rows x {max(passage)} tokens)"
    return lines + lower(encode, (params, ids, ids, ids, None), platform, what, impl)


def on(arrays: dict, mesh, share: int = 1) -> dict:
    """ShapeDtypeStructs of a step batch's arrays, batch-sharded over ``mesh`` (None: one
    device's ``1 / share`` of the rows, unsharded)."""
    if mesh is None:
        return {
            k: jax.ShapeDtypeStruct((a.shape[0] // share, *a.shape[1:]), a.dtype)
            for k, a in arrays.items()
        }
    return {k: abstract(a, sharding.batch_sharding(mesh, a.ndim)) for k, a in arrays.items()}


def rows(arrays: dict) -> str:
    """ "query 64x32, pos 64x128": each tower's rows x tokens."""
    towers = [(k.removesuffix("_ids"), a.shape) for k, a in arrays.items() if k.endswith("_ids")]
    return ", ".join(f"{t} {r}x{n}" for t, (r, n) in towers)


def header(platform: str, count: int, mesh, config, state, frozen) -> list[str]:
    """The report's first lines: the mesh, rows per device, state bytes per device."""
    gib = per_device_bytes(state) / 2**30
    chunk = config.train.gradcache_chunk if config.train.gradcache else 0
    base = f" (frozen base weights {per_device_bytes(frozen) / 2**30:.2f} GiB)" if frozen else ""
    return [
        f"dry run for {count} {platform.upper()} devices on this host's CPU: mesh "
        f"{dict(mesh.shape)}",
        f"  {sharding.rows_per_device(mesh, config.train.global_batch, chunk)}",
        f"  parameters and optimizer state: {gib:.2f} GiB per device{base}",
    ]
