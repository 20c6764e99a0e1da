"""ModernBERT (mmBERT, gte-modernbert): the HF mapping table and config conversion, both ways.

Checkpoints are usually ``ModernBertForMaskedLM`` (keys under ``model.``, plus an MLM head
that an embedder does not use and that is not exported); the base ``ModernBertModel``
tensors are what we read and write.
"""

from __future__ import annotations

from typing import Any

from jaxembed.hf.mapping import Row
from jaxembed.models.modernbert import MODEL_TYPES, ModernBertConfig, ModernBertModel

__all__ = ["MODEL_TYPES"]
POOLER_KEY = None

_SIMPLE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_activation",
    "max_position_embeddings",
    "norm_eps",
    "norm_bias",
    "attention_bias",
    "mlp_bias",
    "embedding_dropout",
    "attention_dropout",
    "mlp_dropout",
    "local_attention",
    "pad_token_id",
)


def _norm(flax: str, hf: str, bias: bool) -> list[Row]:
    rows = [Row(f"{flax}.scale", f"{hf}.weight")]
    return rows + ([Row(f"{flax}.bias", f"{hf}.bias")] if bias else [])


def _linear(flax: str, hf: str, bias: bool) -> list[Row]:
    rows = [Row(f"{flax}.kernel", f"{hf}.weight", "transpose")]
    return rows + ([Row(f"{flax}.bias", f"{hf}.bias")] if bias else [])


def table(cfg: ModernBertConfig) -> list[Row]:
    """Explicit rows per layer: the first layer has no attention norm."""
    rows = [Row("embeddings.tok_embeddings.embedding", "embeddings.tok_embeddings.weight")]
    rows += _norm("embeddings.norm", "embeddings.norm", cfg.norm_bias)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        if i > 0:
            rows += _norm(p + "attn_norm", p + "attn_norm", cfg.norm_bias)
        rows += _linear(p + "attn.Wqkv", p + "attn.Wqkv", cfg.attention_bias)
        rows += _linear(p + "attn.Wo", p + "attn.Wo", cfg.attention_bias)
        rows += _norm(p + "mlp_norm", p + "mlp_norm", cfg.norm_bias)
        rows += _linear(p + "mlp.Wi", p + "mlp.Wi", cfg.mlp_bias)
        rows += _linear(p + "mlp.Wo", p + "mlp.Wo", cfg.mlp_bias)
    return rows + _norm("final_norm", "final_norm", cfg.norm_bias)


def num_layers(cfg: ModernBertConfig) -> int:
    return cfg.num_hidden_layers


def _layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    # Older folders (all ModernBERT and mmBERT releases) give the pattern as an interval.
    every = int(hf.get("global_attn_every_n_layers", 3))
    n = int(hf.get("num_hidden_layers", 22))
    return tuple("sliding_attention" if i % every else "full_attention" for i in range(n))


def _theta(hf: dict[str, Any], layer_type: str, old_key: str, default: float) -> float:
    # transformers 5 writes rope_parameters per layer type; older folders a theta per kind.
    rope = (hf.get("rope_parameters") or {}).get(layer_type) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default" or hf.get("rope_scaling"):
        raise ValueError(f"rope_type={kind!r} is not supported (only 'default' rotary embeddings)")
    return float(rope.get("rope_theta", hf.get(old_key, default)))


def config_from_hf(hf: dict[str, Any], *, has_pooler: bool = False) -> ModernBertConfig:
    """A `ModernBertConfig` from an HF ``config.json`` dict (unknown keys kept for export)."""
    del has_pooler
    kwargs = {k: hf[k] for k in _SIMPLE if hf.get(k) is not None}
    if "local_attention" not in kwargs and hf.get("sliding_window"):
        kwargs["local_attention"] = 2 * int(hf["sliding_window"])
    return ModernBertConfig(
        **kwargs,
        layer_types=_layer_types(hf),
        global_rope_theta=_theta(hf, "full_attention", "global_rope_theta", 160_000.0),
        local_rope_theta=_theta(hf, "sliding_attention", "local_rope_theta", 10_000.0),
        hf_config=dict(hf),
    )


def config_to_hf(cfg: ModernBertConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict: the original one, with our fields written over it."""
    out = dict(cfg.hf_config)
    out.update({k: getattr(cfg, k) for k in _SIMPLE})
    out["model_type"] = "modernbert"
    out["architectures"] = ["ModernBertModel"]  # the base encoder's tensors only
    out["layer_types"] = list(cfg.layer_types)
    out.pop("global_attn_every_n_layers", None)
    out["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
    }
    for old in ("global_rope_theta", "local_rope_theta", "rope_scaling"):
        out.pop(old, None)
    return out


def build(cfg: ModernBertConfig, **kwargs) -> ModernBertModel:
    return ModernBertModel(cfg, **kwargs)
