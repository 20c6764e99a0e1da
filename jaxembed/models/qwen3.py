"""Qwen3 decoders in Flax NNX, used as embedders (F2LLM, Qwen3-Embedding).

Attribute names mirror the Hugging Face PyTorch modules (``embed_tokens``, ``layers``,
``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ``norm``) so the mapping table
in `jaxembed.hf.qwen3` stays short. Unlike `jaxembed.models.bert`, the decoder layers are
*stacked*: ``layers`` is one `Qwen3DecoderLayer` whose parameters carry a leading layer
dimension (logical axis ``layers``), and the forward pass runs them with `jax.lax.scan`, so
compile time does not grow with depth (28 layers for 0.6B, 36 for 4B). ``scan=False`` runs
the same stacked parameters in a Python loop (unrolled); both give the same outputs.

Only the base model is ported: an embedder has no language-model head, so a checkpoint's
``lm_head`` (untied models) is ignored on load and never exported.

Inputs must be right-padded (real tokens first), as every jaxembed batch is: positions are
0..L-1 for every row, which is what Hugging Face computes for right-padded batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed.models.attention import Mask, attention
from jaxembed.models.layers import (
    Embed,
    GatedMLP,
    Linear,
    activation,
    apply_rotary,
    merged_call,
    param,
    rotary,
    segment_positions,
    stacked_layers,
)

MODEL_TYPES = ("qwen3",)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture hyperparameters, read from an HF ``config.json`` (see `jaxembed.hf.qwen3`)."""

    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    # The HF config.json as loaded, kept so export writes back every key we do not model.
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        activation(self.hidden_act)  # fail at config time, not inside jit

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def add_pooling_layer(self) -> bool:  # the BERT pooler question does not arise
        return False


class RMSNorm(nnx.Module):
    """Qwen3's RMSNorm: statistics in fp32, the scale applied in the compute dtype (as HF)."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, axes=("norm",)):
        self.scale = param(jnp.ones((features,), jnp.float32), axes)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(h, nq * d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(h, nkv * d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(h, nkv * d, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(nq * d, h, axes=("heads", "embed"), **kw)
        # Per-head norms over head_dim only (Qwen3's change from Qwen2).
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, axes=(None,))
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, axes=(None,))
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d

    def __call__(self, x, cos, sin, mask):
        b, l, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attention(q, k, v, mask, scale=self.head_dim**-0.5))


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Qwen3Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nnx.Module):
    """The decoder stack; returns the final-norm hidden states (batch, length, hidden)."""

    def __init__(
        self,
        cfg: Qwen3Config,
        *,
        dtype=jnp.float32,
        remat: bool = False,
        scan: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs
        )
        self.layers = stacked_layers(
            lambda r: Qwen3DecoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers, rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.dtype = dtype
        self.remat = remat
        self.scan = scan
        self.attention = "auto"  # `jaxembed.models.attention`: set by model.attention

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        dropout_seed: jax.Array | None = None,
    ) -> jax.Array:
        """Runs the decoder with a causal mask plus the padding mask.

        Args:
          input_ids: int (batch, length), right-padded.
          attention_mask: (batch, length), 1 for real tokens, 0 for padding.
          segment_ids: int (batch, length) for packed rows: 1, 2, ... per text, 0 for
            padding; each text attends (causally) only to itself, positions restart at 0.
          token_type_ids: ignored (the backbones share one call signature).
          dropout_seed: ignored: Qwen3 trains without dropout (``attention_dropout`` 0).

        Returns:
          Hidden states after the final RMSNorm (batch, length, hidden), compute dtype.
        """
        del token_type_ids, dropout_seed
        l = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cfg = self.config
        positions = jnp.arange(l)[None] if segment_ids is None else segment_positions(segment_ids)
        cos, sin = rotary(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        mask = Mask.of(attention_mask, segment_ids, causal=True, impl=self.attention)

        graphdef, state = nnx.split(self.layers)
        layer = functools.partial(merged_call, graphdef)
        if self.remat:
            # Keep only each layer's input for the backward pass and recompute the rest.
            layer = jax.checkpoint(layer)
        if self.scan:

            def body(h, layer_state):
                return layer(layer_state, h, cos, sin, mask), None

            x, _ = jax.lax.scan(body, x, state)
        else:
            for i in range(cfg.num_hidden_layers):
                x = layer(jax.tree.map(lambda a, i=i: a[i], state), x, cos, sin, mask)
        return self.norm(x)
