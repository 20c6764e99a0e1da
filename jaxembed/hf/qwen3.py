"""Qwen3: the HF mapping table (stacked layers) and config conversion, both directions."""

from __future__ import annotations

from typing import Any

from jaxembed.hf.mapping import Row
from jaxembed.models.qwen3 import MODEL_TYPES, Qwen3Config, Qwen3Model

__all__ = ["MODEL_TYPES", "TABLE", "build", "config_from_hf", "config_to_hf", "table"]

_L = "layers.{i}."
# Flax paths carry no {i}: each row fills one stacked (layers, ...) parameter.
TABLE = [
    Row("embed_tokens.embedding", "embed_tokens.weight"),
    *(
        Row(f"layers.{mod}.kernel", _L + f"{mod}.weight", "transpose")
        for mod in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ),
    *(
        Row(f"layers.{norm}.scale", _L + f"{norm}.weight")
        for norm in (
            "self_attn.q_norm",
            "self_attn.k_norm",
            "input_layernorm",
            "post_attention_layernorm",
        )
    ),
    Row("norm.scale", "norm.weight"),
]
BIASES = [
    Row(f"layers.self_attn.{p}.bias", _L + f"self_attn.{p}.bias")
    for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]
POOLER_KEY = None  # decoders have no BERT-style pooler

_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "tie_word_embeddings",
    "pad_token_id",
)


def table(cfg: Qwen3Config) -> list[Row]:
    return TABLE + (BIASES if cfg.attention_bias else [])


def num_layers(cfg: Qwen3Config) -> int:
    return cfg.num_hidden_layers


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 writes rope_parameters={"rope_type", "rope_theta"}; older folders (all
    # released Qwen3 checkpoints) have a top-level rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} is not supported (only 'default' rotary embeddings)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], *, has_pooler: bool = False) -> Qwen3Config:
    """A `Qwen3Config` from an HF ``config.json`` dict (unknown keys are kept for export)."""
    del has_pooler
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (full attention only)")
    kwargs = {k: hf[k] for k in _FIELDS if hf.get(k) is not None}
    kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", 16))
    if "head_dim" not in kwargs and "hidden_size" in kwargs:
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return Qwen3Config(**kwargs, rope_theta=_rope_theta(hf), eos_token_id=eos, hf_config=dict(hf))


def config_to_hf(cfg: Qwen3Config) -> dict[str, Any]:
    """The HF ``config.json`` dict: the original one, with our fields written over it."""
    out = dict(cfg.hf_config)
    out.update({k: getattr(cfg, k) for k in _FIELDS})
    out["model_type"] = "qwen3"
    # Only the base model's tensors are exported (an embedder has no LM head).
    out["architectures"] = ["Qwen3Model"]
    if "rope_parameters" in out or "rope_theta" not in out:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        out["rope_theta"] = cfg.rope_theta
    return out


def build(cfg: Qwen3Config, **kwargs) -> Qwen3Model:
    return Qwen3Model(cfg, **kwargs)
