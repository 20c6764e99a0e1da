"""Gemma3 text models (Gemma3, EmbeddingGemma): the HF mapping table and config conversion.

Stacked rows as for Qwen3 (``{i}`` only on the HF side). ``Gemma3ForCausalLM`` checkpoints
(keys under ``model.``) load too; the tied LM head is neither read nor exported. The RMSNorm
weights are copied as stored: the module applies Gemma's ``1 + weight``.
"""

from __future__ import annotations

from typing import Any

from jaxembed.hf.mapping import Row
from jaxembed.models.gemma3 import MODEL_TYPES, Gemma3Config, Gemma3Model

__all__ = ["MODEL_TYPES"]
POOLER_KEY = None

_L = "layers.{i}."
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
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
    Row("layers.self_attn.q_norm.scale", _L + "self_attn.q_norm.weight"),
    Row("layers.self_attn.k_norm.scale", _L + "self_attn.k_norm.weight"),
    *(Row(f"layers.{n}.scale", _L + f"{n}.weight") for n in _NORMS),
    Row("norm.scale", "norm.weight"),
]
BIASES = [
    Row(f"layers.self_attn.{p}.bias", _L + f"self_attn.{p}.bias")
    for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]

_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_activation",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "sliding_window",
    "use_bidirectional_attention",
    "pad_token_id",
)


def table(cfg: Gemma3Config) -> list[Row]:
    return TABLE + (BIASES if cfg.attention_bias else [])


def num_layers(cfg: Gemma3Config) -> int:
    return cfg.num_hidden_layers


def _layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    # Older folders give a pattern: every n-th layer (counting from 1) is global.
    every = int(hf.get("sliding_window_pattern", 6))
    n = int(hf.get("num_hidden_layers", 26))
    return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(n))


def _rope(hf: dict[str, Any], layer_type: str, old_key: str, default: float):
    """``(theta, linear factor)`` of one layer kind; other rope types are refused."""
    rope = dict((hf.get("rope_parameters") or {}).get(layer_type) or {})
    if layer_type == "full_attention" and hf.get("rope_scaling"):
        rope = {**hf["rope_scaling"], **rope}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"rope_type={kind!r} is not supported (only 'default' and 'linear')")
    factor = float(rope.get("factor", 1.0)) if kind == "linear" else 1.0
    return float(rope.get("rope_theta", hf.get(old_key, default))), factor


def config_from_hf(hf: dict[str, Any], *, has_pooler: bool = False) -> Gemma3Config:
    """A `Gemma3Config` from an HF ``config.json`` dict (unknown keys are kept for export)."""
    del has_pooler
    kwargs = {k: hf[k] for k in _FIELDS if hf.get(k) is not None}
    global_theta, factor = _rope(hf, "full_attention", "rope_theta", 1_000_000.0)
    local_theta, local_factor = _rope(hf, "sliding_attention", "rope_local_base_freq", 10_000.0)
    if local_factor != 1.0:
        raise ValueError("rope scaling of the sliding-window layers is not supported")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return Gemma3Config(
        **kwargs,
        layer_types=_layer_types(hf),
        global_rope_theta=global_theta,
        global_rope_factor=factor,
        local_rope_theta=local_theta,
        eos_token_id=eos,
        hf_config=dict(hf),
    )


def config_to_hf(cfg: Gemma3Config) -> dict[str, Any]:
    """The HF ``config.json`` dict: the original one, with our fields written over it."""
    out = dict(cfg.hf_config)
    out.update({k: getattr(cfg, k) for k in _FIELDS})
    out["model_type"] = "gemma3_text"
    out["architectures"] = ["Gemma3TextModel"]  # the text model's tensors only
    out["layer_types"] = list(cfg.layer_types)
    full = {"rope_type": "default", "rope_theta": cfg.global_rope_theta}
    if cfg.global_rope_factor != 1.0:
        full.update(rope_type="linear", factor=cfg.global_rope_factor)
    out["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
    }
    for old in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
        out.pop(old, None)
    return out


def build(cfg: Gemma3Config, **kwargs) -> Gemma3Model:
    return Gemma3Model(cfg, **kwargs)
