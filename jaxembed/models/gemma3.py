"""Gemma3 text models in Flax NNX (Gemma3, EmbeddingGemma), as `transformers` Gemma3TextModel.

Attribute names mirror the Hugging Face modules (``embed_tokens``, ``layers``,
``self_attn.q_proj``, ``mlp.gate_proj``, the four layer norms, ``norm``) so the mapping table
in `jaxembed.hf.gemma3` stays short. What differs from `jaxembed.models.qwen3`:

- RMSNorm scales by ``1 + weight`` (the stored weight starts at zero), in fp32;
- embeddings are multiplied by ``sqrt(hidden_size)``;
- every layer norms its attention and MLP outputs too (four norms per layer);
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, optionally soft-capped;
- local layers see a sliding window, global layers the whole text, each with its own rotary
  theta (and linear rope scaling on the global ones where the config has it);
- ``use_bidirectional_attention`` (EmbeddingGemma) turns the causal mask off: global layers
  see every token, local ones the ``sliding_window // 2 + 1``-wide window on both sides, as
  `transformers` converts it.

Layers are stacked and scanned as in Qwen3; each layer's kind is a scanned flag that picks
its mask and rotary table. Only the text model is ported (no LM head, no vision tower).
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

MODEL_TYPES = ("gemma3_text",)


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Architecture hyperparameters, read from an HF ``config.json`` (`jaxembed.hf.gemma3`)."""

    model_type: str = "gemma3_text"
    vocab_size: int = 262_144
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 24
    num_attention_heads: int = 3
    num_key_value_heads: int = 1
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = None
    sliding_window: int = 512  # as config.json stores it
    use_bidirectional_attention: bool = False
    layer_types: tuple[str, ...] = ()
    global_rope_theta: float = 1_000_000.0
    global_rope_factor: float = 1.0  # linear rope scaling of the global layers
    local_rope_theta: float = 10_000.0
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"unsupported layer_types {sorted(unknown)}")
        activation(self.hidden_activation)  # fail at config time, not inside jit

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def add_pooling_layer(self) -> bool:
        return False


class GemmaRMSNorm(nnx.Module):
    """RMSNorm scaling by ``1 + scale`` in fp32, then cast (Gemma's ``(x * w).to(dtype)``)."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, axes=("norm",)):
        self.scale = param(jnp.zeros((features,), jnp.float32), axes)  # HF's weight, as stored
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...])).astype(self.dtype)


class Gemma3Attention(nnx.Module):
    def __init__(self, cfg: Gemma3Config, *, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(h, nq * d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(h, nkv * d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(h, nkv * d, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(nq * d, h, axes=("heads", "embed"), **kw)
        self.q_norm = GemmaRMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, axes=(None,))
        self.k_norm = GemmaRMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, axes=(None,))
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d
        self.scaling = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping

    def __call__(self, x, cos, sin, masks, is_sliding):
        b, l, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        def attend(mask):
            return lambda q, k, v: attention(
                q, k, v, mask, scale=self.scaling, softcap=self.softcap
            )

        # The layers are scanned, so whether this one slides is a traced value: both masks
        # are compiled, one runs.
        full, local = masks
        return self.o_proj(jax.lax.cond(is_sliding, attend(local), attend(full), q, k, v))


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma3Config, *, dtype, rngs: nnx.Rngs):
        norm = functools.partial(GemmaRMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Gemma3Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation, dtype=dtype, rngs=rngs
        )
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, cos, sin, masks, is_sliding):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, masks, is_sliding)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nnx.Module):
    """The text stack; returns the final-norm hidden states (batch, length, hidden)."""

    def __init__(
        self,
        cfg: Gemma3Config,
        *,
        dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs
        )
        self.layers = stacked_layers(
            lambda r: Gemma3DecoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers, rngs
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.dtype = dtype
        self.remat = remat
        self.attention = "auto"  # `jaxembed.models.attention`: set by model.attention

    def _masks(self, attention_mask, segment_ids) -> tuple[Mask, Mask]:
        """The masks of the global and the local layers."""
        cfg = self.config
        causal = not cfg.use_bidirectional_attention
        full = Mask.of(attention_mask, segment_ids, causal=causal, impl=self.attention)
        # Within a text, row distance is position distance: the window needs no positions.
        if causal:
            return full, full.local((cfg.sliding_window - 1, 0))
        half = cfg.sliding_window // 2
        return full, full.local((half, half))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        dropout_seed: jax.Array | None = None,
    ) -> jax.Array:
        """Runs the text model (the call signature every backbone shares).

        Args:
          input_ids: int (batch, length), right-padded.
          attention_mask: (batch, length), 1 for real tokens, 0 for padding.
          segment_ids: int (batch, length) for packed rows: 1, 2, ... per text, 0 for
            padding; each text attends only to itself, positions restart at 0.
          token_type_ids: ignored (the backbones share one call signature).
          dropout_seed: ignored: Gemma3 trains without dropout (``attention_dropout`` 0).
        """
        del token_type_ids, dropout_seed
        cfg = self.config
        l = input_ids.shape[1]
        x = self.embed_tokens(input_ids) * jnp.asarray(cfg.hidden_size**0.5, self.dtype)
        positions = jnp.arange(l)[None] if segment_ids is None else segment_positions(segment_ids)
        masks = self._masks(attention_mask, segment_ids)
        rope_full = rotary(
            positions / cfg.global_rope_factor, cfg.head_dim, cfg.global_rope_theta, self.dtype
        )
        rope_local = rotary(positions, cfg.head_dim, cfg.local_rope_theta, self.dtype)
        sliding = jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])

        graphdef, state = nnx.split(self.layers)
        layer = functools.partial(merged_call, graphdef)
        if self.remat:
            layer = jax.checkpoint(layer)

        def body(h, xs):
            layer_state, is_sliding = xs
            pick = functools.partial(jnp.where, is_sliding)
            cos, sin = pick(rope_local[0], rope_full[0]), pick(rope_local[1], rope_full[1])
            return layer(layer_state, h, cos, sin, masks, is_sliding), None

        x, _ = jax.lax.scan(body, x, (state, sliding))
        return self.norm(x)
