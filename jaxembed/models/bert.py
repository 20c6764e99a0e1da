"""BERT-family encoders in Flax NNX: BERT, RoBERTa and XLM-RoBERTa (and CamemBERT).

Attribute names mirror the Hugging Face PyTorch modules (``embeddings.word_embeddings``,
``encoder.layer[i].attention.self.query``, ...) so the mapping table in
`jaxembed.hf.bert` stays a list of near-identical names. The families differ only in how
position ids are built: BERT counts 0..L-1; RoBERTa/XLM-R count from ``pad_token_id + 1``
over non-padding tokens and give padding the ``pad_token_id`` position.
"""

from __future__ import annotations

import dataclasses
import math
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
    call_layer,
    dropout,
    param,
    segment_positions,
)
from jaxembed.seeds import split_rng, to_seed

# model_type -> whether positions start after the padding index (RoBERTa-style).
FAMILIES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyperparameters, read from an HF ``config.json`` (see `jaxembed.hf.bert`)."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooling_layer: bool = True
    # The masked-language-model head (HF *ForMaskedLM), loaded only for SPLADE.
    add_mlm_head: bool = False
    # The HF config.json as loaded, kept so export writes back every key we do not model.
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(
                f"BertConfig.model_type={self.model_type!r}; supported: {sorted(FAMILIES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        activation(self.hidden_act)  # fail at config time, not inside jit

    @property
    def roberta_positions(self) -> bool:
        return FAMILIES[self.model_type]

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 rows)."""
        if self.roberta_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.word_embeddings = Embed(
            cfg.vocab_size, h, axes=("vocab", "embed"), dtype=dtype, rngs=rngs
        )
        self.position_embeddings = Embed(
            cfg.max_position_embeddings, h, axes=(None, "embed"), dtype=dtype, rngs=rngs
        )
        self.token_type_embeddings = Embed(
            cfg.type_vocab_size, h, axes=(None, "embed"), dtype=dtype, rngs=rngs
        )
        self.LayerNorm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dtype)
        self.dropout_rate = cfg.hidden_dropout_prob
        self.roberta_positions = cfg.roberta_positions
        self.pad_token_id = cfg.pad_token_id

    def __call__(self, input_ids, token_type_ids, rng, positions=None):
        if positions is not None:  # packed rows: positions restart in every segment
            if self.roberta_positions:
                real = input_ids != self.pad_token_id
                position_ids = jnp.where(real, positions + self.pad_token_id + 1, self.pad_token_id)
            else:
                position_ids = positions
        elif self.roberta_positions:
            # HF create_position_ids_from_input_ids: padding tokens sit at pad_token_id,
            # real tokens count up from pad_token_id + 1.
            real = (input_ids != self.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(real, axis=1) * real + self.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return dropout(self.LayerNorm(x), self.dropout_rate, rng)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.query = Linear(h, h, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.key = Linear(h, h, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.value = Linear(h, h, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.dropout_rate = cfg.attention_probs_dropout_prob

    def __call__(self, x, mask, rng):
        b, l, _ = x.shape
        q, k, v = (
            t(x).reshape(b, l, self.num_heads, self.head_dim)
            for t in (self.query, self.key, self.value)
        )
        return attention(
            q, k, v, mask, scale=1 / math.sqrt(self.head_dim),
            dropout_rate=self.dropout_rate, rng=rng,
        )  # fmt: skip


class BertSelfOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.dense = Linear(h, h, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dtype)
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, x, residual, rng):
        return self.LayerNorm(dropout(self.dense(x), self.dropout_rate, rng) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = BertSelfOutput(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask, rng):
        r_attn, r_out = split_rng(rng, 2)
        return self.output(self.self(x, mask, r_attn), x, r_out)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(
            cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), dtype=dtype, rngs=rngs
        )
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class BertOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(
            cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs
        )
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, x, residual, rng):
        return self.LayerNorm(dropout(self.dense(x), self.dropout_rate, rng) + residual)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, dtype=dtype, rngs=rngs)
        self.output = BertOutput(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask, rng):
        r_attn, r_out = split_rng(rng, 2)
        a = self.attention(x, mask, r_attn)
        return self.output(self.intermediate(a), a, r_out)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, remat: bool, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [BertLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.remat = remat

    def __call__(self, x, mask, rng):
        rngs = split_rng(rng, len(self.layer))
        for layer, r in zip(self.layer, rngs, strict=True):
            x = call_layer(layer, x, mask, r, remat=self.remat)
        return x


class BertPooler(nnx.Module):
    """HF's tanh pooler. Unused for embeddings; kept so an export round-trips every tensor."""

    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.dense = Linear(h, h, axes=("embed", None), dtype=dtype, rngs=rngs)


class BertMLMHead(nnx.Module):
    """HF's MLM head (BERT's ``cls.predictions``, RoBERTa's ``lm_head``): dense, activation,
    LayerNorm, then the word embeddings (tied, as every HF BERT-family checkpoint ties
    them) plus a bias: a logit per vocabulary entry and token."""

    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.dense = Linear(h, h, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dtype)
        self.bias = param(jnp.zeros((cfg.vocab_size,), jnp.float32), ("vocab",))
        self.act = activation(cfg.hidden_act)

    def __call__(self, hidden: jax.Array, embedding: jax.Array) -> jax.Array:
        x = self.LayerNorm(self.act(self.dense(hidden)))
        return jnp.einsum("blh,vh->blv", x, embedding.astype(x.dtype)) + self.bias[...]


class BertModel(nnx.Module):
    """The encoder stack; returns the last hidden states (batch, length, hidden)."""

    def __init__(
        self,
        cfg: BertConfig,
        *,
        dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = BertEncoder(cfg, dtype=dtype, remat=remat, rngs=rngs)
        self.pooler = BertPooler(cfg, dtype=dtype, rngs=rngs) if cfg.add_pooling_layer else None
        self.mlm = BertMLMHead(cfg, dtype=dtype, rngs=rngs) if cfg.add_mlm_head else None
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
        """Runs the encoder.

        Args:
          input_ids: int (batch, length).
          attention_mask: (batch, length), 1 for real tokens, 0 for padding.
          token_type_ids: int (batch, length); zeros when None.
          segment_ids: int (batch, length) for packed rows: 1, 2, ... per text, 0 for
            padding (`jaxembed.models.layers`); each text then attends only to itself and
            its positions start at 0, exactly as alone in a row.
          dropout_seed: a uint32 seed (or a PRNG key) turns dropout on (training); None is
            deterministic. The same seed gives the same masks.

        Returns:
          Last hidden states (batch, length, hidden) in the compute dtype.
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        r_emb, r_enc = split_rng(to_seed(dropout_seed), 2)
        positions = None if segment_ids is None else segment_positions(segment_ids)
        x = self.embeddings(input_ids, token_type_ids, r_emb, positions)
        mask = Mask.of(attention_mask, segment_ids, impl=self.attention)
        return self.encoder(x, mask, r_enc)

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """The MLM head's logits (batch, length, vocab) of the last hidden states."""
        if self.mlm is None:
            raise ValueError(
                "this model was loaded without its MLM head (hf.load_model(mlm_head=True))"
            )
        return self.mlm(hidden, self.embeddings.word_embeddings.embedding[...])
