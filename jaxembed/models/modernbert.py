"""ModernBERT encoders in Flax NNX (ModernBERT, mmBERT, gte-modernbert), as in `transformers`.

Attribute names mirror the Hugging Face PyTorch modules (``embeddings.tok_embeddings``,
``layers.{i}.attn.Wqkv``, ``mlp.Wi``, ``final_norm``) so the mapping table in
`jaxembed.hf.modernbert` stays short. What differs from BERT:

- no position embeddings: rotary embeddings in every layer, with one theta for the global
  (full-attention) layers and another for the local ones;
- alternating attention: every ``global_attn_every_n_layers``-th layer (from the first)
  attends to the whole text, the others to a window of ``local_attention // 2`` tokens on
  each side (HF's inclusive distance rule);
- pre-LayerNorm (none before the first layer's attention, a final norm after the last),
  LayerNorms and projections without biases unless the config asks for them;
- a GeGLU MLP: ``Wi`` projects to twice the intermediate size, ``act(input) * gate``.

Layers are a list, as in `jaxembed.models.bert` (the first layer has no attention norm, so
they are not all the same shape). Inputs are right-padded, or packed with segment ids:
positions restart in each text and the window is measured inside it.
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
    LayerNorm,
    Linear,
    activation,
    apply_rotary,
    call_layer,
    dropout,
    rotary,
    segment_positions,
)
from jaxembed.seeds import split_rng, to_seed

MODEL_TYPES = ("modernbert",)


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """Architecture hyperparameters, read from an HF ``config.json`` (`jaxembed.hf.modernbert`)."""

    model_type: str = "modernbert"
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    # "full_attention" or "sliding_attention" per layer.
    layer_types: tuple[str, ...] = ()
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_attention: int = 128  # the whole window; each side sees half of it
    pad_token_id: int = 50283
    # The HF config.json as loaded, kept so export writes back every key we do not model.
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
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
    def add_pooling_layer(self) -> bool:  # no BERT-style pooler
        return False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class ModernBertEmbeddings(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        self.tok_embeddings = Embed(
            cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs
        )
        self.norm = LayerNorm(
            cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=dtype
        )
        self.dropout_rate = cfg.embedding_dropout

    def __call__(self, input_ids, rng):
        return dropout(self.norm(self.tok_embeddings(input_ids)), self.dropout_rate, rng)


class ModernBertAttention(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.Wqkv = Linear(h, 3 * h, axes=("embed", "heads"), **kw)
        self.Wo = Linear(h, h, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.dropout_rate = cfg.attention_dropout

    def __call__(self, x, cos, sin, mask, rng):
        b, l, _ = x.shape
        r_probs, r_out = split_rng(rng, 2)
        qkv = self.Wqkv(x).reshape(b, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(
            q, k, v, mask, scale=self.head_dim**-0.5, dropout_rate=self.dropout_rate, rng=r_probs
        )
        return dropout(self.Wo(out), self.dropout_rate, r_out)


class ModernBertMLP(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.Wi = Linear(h, 2 * m, axes=("embed", "mlp"), **kw)
        self.Wo = Linear(m, h, axes=("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_activation)
        self.dropout_rate = cfg.mlp_dropout

    def __call__(self, x, rng):
        inputs, gate = jnp.split(self.Wi(x), 2, axis=-1)
        return self.Wo(dropout(self.act(inputs) * gate, self.dropout_rate, rng))


class ModernBertLayer(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, index: int, *, dtype, rngs: nnx.Rngs):
        norm = functools.partial(
            LayerNorm, cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=dtype
        )
        # The embeddings end with a norm: the first layer's attention reads them as they are.
        self.attn_norm = norm() if index > 0 else None
        self.attn = ModernBertAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = ModernBertMLP(cfg, dtype=dtype, rngs=rngs)
        self.sliding = cfg.layer_types[index] == "sliding_attention"

    def __call__(self, x, rope, masks, rng):
        r_attn, r_mlp = split_rng(rng, 2)
        cos, sin = rope[self.sliding]
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = x + self.attn(h, cos, sin, masks[self.sliding], r_attn)
        return x + self.mlp(self.mlp_norm(x), r_mlp)


class ModernBertModel(nnx.Module):
    """The encoder stack; returns the final-norm hidden states (batch, length, hidden)."""

    def __init__(
        self,
        cfg: ModernBertConfig,
        *,
        dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.embeddings = ModernBertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [ModernBertLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_hidden_layers)]
        )
        self.final_norm = LayerNorm(
            cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=dtype
        )
        self.dtype = dtype
        self.remat = remat
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
        """Runs the encoder (the call signature every backbone shares).

        Args:
          input_ids: int (batch, length), right-padded.
          attention_mask: (batch, length), 1 for real tokens, 0 for padding.
          token_type_ids: ignored (ModernBERT has none).
          segment_ids: int (batch, length) for packed rows: 1, 2, ... per text, 0 for
            padding; each text attends only to itself, positions restart at 0.
          dropout_seed: a uint32 seed (or a PRNG key) turns dropout on; None is deterministic.

        Returns:
          Hidden states after the final LayerNorm (batch, length, hidden), compute dtype.
        """
        del token_type_ids
        cfg = self.config
        l = input_ids.shape[1]
        r_emb, r_layers = split_rng(to_seed(dropout_seed), 2)
        x = self.embeddings(input_ids, r_emb)
        positions = jnp.arange(l)[None] if segment_ids is None else segment_positions(segment_ids)
        mask = Mask.of(attention_mask, segment_ids, impl=self.attention)
        # Within a text, row distance is position distance: the window needs no positions.
        half = cfg.local_attention // 2
        masks = {False: mask, True: mask.local((half, half))}
        rope = {
            False: rotary(positions, cfg.head_dim, cfg.global_rope_theta, self.dtype),
            True: rotary(positions, cfg.head_dim, cfg.local_rope_theta, self.dtype),
        }
        for layer, r in zip(self.layers, split_rng(r_layers, len(self.layers)), strict=True):
            x = call_layer(layer, x, rope, masks, r, remat=self.remat)
        return self.final_norm(x)
