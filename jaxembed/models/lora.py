"""LoRA: low-rank adapters on a backbone's linear layers, trained while the weights stay frozen.

A targeted `Linear` gains ``lora``: ``y = x W + b + (alpha / r) * dropout(x) A B`` with
``A`` (in, r) initialised as PEFT does (uniform in +-1/sqrt(in)) and ``B`` (r, out) zero, so
training starts from the base model exactly. Adapters are `nnx.LoRAParam`s: the train state
holds and optimises only those (`split`), the base weights are a separate frozen tree that
the step reads and never updates, donates or copies. In a stacked (scanned) backbone the
adapters stack too: ``A`` (layers, in, r), sliced by the scan like every layer parameter.

`merged` folds the adapters into the kernels (``W + (alpha / r) A B``), so an exported
folder is a plain model that needs no PEFT; `jaxembed.hf.peft` writes them PEFT's way for
those who want adapters alone.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed.models.layers import Linear, dropout
from jaxembed.seeds import fold_seed


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how: rank ``r``, scale ``alpha / r``, input dropout, the targets."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class DropoutSeed(nnx.Variable):
    """The adapter's dropout seed for one call (per layer when stacked); never a parameter."""


class LoRA(nnx.Module):
    """The low-rank update of one `Linear` whose kernel is (..., in, out)."""

    def __init__(self, kernel: nnx.Param, spec: LoRASpec, *, rngs: nnx.Rngs):
        *lead, n_in, n_out = kernel.shape
        *lead_axes, in_axis, out_axis = kernel.get_metadata("axes")
        bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming_uniform(a=sqrt(5)) on A
        a = jax.random.uniform(rngs.params(), (*lead, n_in, spec.rank), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a, axes=(*lead_axes, in_axis, None))
        self.b = nnx.LoRAParam(
            jnp.zeros((*lead, spec.rank, n_out), jnp.float32), axes=(*lead_axes, None, out_axis)
        )
        self.scale = spec.scale
        self.rate = spec.dropout
        self.seed = nnx.data(None)  # a DropoutSeed while training with dropout (`seed_dropout`)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        seed = None if self.seed is None else self.seed[...]
        h = dropout(x, self.rate, seed).astype(dtype)
        h = jnp.dot(h, self.a[...].astype(dtype))
        return jnp.dot(h, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)


def _module(model: nnx.Module, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def add_adapters(model: nnx.Module, kernel_paths, spec: LoRASpec, seed: int = 0) -> None:
    """Gives each `Linear` whose kernel is at one of ``kernel_paths`` ("a.b.kernel") an adapter."""
    rngs = nnx.Rngs(seed)
    for path in kernel_paths:
        linear = _module(model, path.removesuffix(".kernel"))
        if not isinstance(linear, Linear):
            raise TypeError(f"{path}: not the kernel of a Linear layer")
        linear.lora = LoRA(linear.kernel, spec, rngs=rngs)


def adapters(model: nnx.Module) -> list[LoRA]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRA)]


def split(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """``(adapter parameters, everything else)`` of a model with adapters."""
    return nnx.state(model, nnx.LoRAParam, ...)


def join(base: dict, lora: dict) -> dict:
    """The full parameter tree (pure dicts) from the frozen base and the adapters."""
    out = dict(base)
    for key, value in lora.items():
        out[key] = join(base[key], value) if key in base and isinstance(value, dict) else value
    return out


def seed_dropout(model: nnx.Module, seed: jax.Array) -> None:
    """Sets every adapter's dropout seed for one call (a pure function of ``seed``).

    Called on a model merged inside the traced step: each adapter (and, stacked, each
    layer) draws its own masks; the same seed gives the same masks in GradCache's passes.
    ``seed`` is a scalar or one seed per row (`jaxembed.models.layers.dropout`); a stacked
    adapter's seeds get the layer dimension first, which the scan slices.
    """
    for k, lora in enumerate(adapters(model)):
        if lora.rate == 0.0:
            continue
        s = fold_seed(seed, 0x10A0 + k)
        lead = lora.a.shape[:-2]
        if lead:
            layer = jnp.arange(math.prod(lead), dtype=jnp.uint32).reshape(-1, *[1] * s.ndim)
            s = fold_seed(s[None], layer).reshape(*lead, *s.shape)
        lora.seed = DropoutSeed(s)


def merged(model: nnx.Module) -> nnx.Module:
    """``model`` with each adapter folded into its kernel (``W + scale * A B``) and removed.

    Computed with JAX in fp32 at full precision, so sharded (even multi-host) parameters
    merge where they are; the result is a plain backbone, exported like any other.
    """
    for _, linear in nnx.iter_graph(model):
        if isinstance(linear, Linear) and linear.lora is not None:
            lora = linear.lora
            update = jnp.matmul(lora.a[...], lora.b[...], precision=jax.lax.Precision.HIGHEST)
            linear.kernel.set_value(linear.kernel[...] + update * lora.scale)
            linear.lora = None
    return model
