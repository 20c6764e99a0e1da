"""BERT / RoBERTa / XLM-RoBERTa: the HF mapping table and config conversion, both directions."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxembed.hf.mapping import Row
from jaxembed.models.bert import FAMILIES, BertConfig, BertModel

MODEL_TYPES = tuple(FAMILIES)
ARCHITECTURES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "camembert": "CamembertModel",
}

_L = "encoder.layer.{i}."
TABLE = [
    Row("embeddings.word_embeddings.embedding", "embeddings.word_embeddings.weight"),
    Row("embeddings.position_embeddings.embedding", "embeddings.position_embeddings.weight"),
    Row("embeddings.token_type_embeddings.embedding", "embeddings.token_type_embeddings.weight"),
    Row("embeddings.LayerNorm.scale", "embeddings.LayerNorm.weight"),
    Row("embeddings.LayerNorm.bias", "embeddings.LayerNorm.bias"),
    *(
        Row(_L + f"{mod}.kernel", _L + f"{mod}.weight", "transpose")
        for mod in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ),
    *(
        Row(_L + f"{mod}.bias", _L + f"{mod}.bias")
        for mod in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ),
    *(
        Row(_L + f"{ln}.LayerNorm.{p}", _L + f"{ln}.LayerNorm.{hp}")
        for ln in ("attention.output", "output")
        for p, hp in (("scale", "weight"), ("bias", "bias"))
    ),
]
POOLER = [
    Row("pooler.dense.kernel", "pooler.dense.weight", "transpose"),
    Row("pooler.dense.bias", "pooler.dense.bias"),
]
POOLER_KEY = "pooler.dense.weight"
# The MLM head (*ForMaskedLM), beside the base model's keys: BERT's and RoBERTa's names.
_MLM_NAMES = {
    False: ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
            "cls.predictions.bias"),
    True: ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
}  # fmt: skip


def mlm_rows(cfg: BertConfig) -> list[Row]:
    dense, norm, bias = _MLM_NAMES[cfg.roberta_positions]
    return [
        Row("mlm.dense.kernel", f"{dense}.weight", "transpose", prefixed=False),
        Row("mlm.dense.bias", f"{dense}.bias", prefixed=False),
        Row("mlm.LayerNorm.scale", f"{norm}.weight", prefixed=False),
        Row("mlm.LayerNorm.bias", f"{norm}.bias", prefixed=False),
        Row("mlm.bias", bias, prefixed=False),
    ]


def has_mlm_head(hf: dict[str, Any], keys) -> bool:
    """Whether a checkpoint's tensors (``keys``) hold the MLM head of its model type."""
    dense = _MLM_NAMES[FAMILIES[hf["model_type"]]][0]
    return f"{dense}.weight" in keys


_FIELDS = [
    f.name for f in dataclasses.fields(BertConfig) if f.name not in ("hf_config", "add_mlm_head")
]


def table(cfg: BertConfig) -> list[Row]:
    return (
        TABLE
        + (POOLER if cfg.add_pooling_layer else [])
        + (mlm_rows(cfg) if cfg.add_mlm_head else [])
    )


def num_layers(cfg: BertConfig) -> int:
    return cfg.num_hidden_layers


def config_from_hf(
    hf: dict[str, Any], *, has_pooler: bool = True, mlm_head: bool = False
) -> BertConfig:
    """A `BertConfig` from an HF ``config.json`` dict (unknown keys are kept for export);
    ``mlm_head``: with the masked-language-model head (SPLADE)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported "
            "(only 'absolute')"
        )
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("decoder / cross-attention BERT configs are not supported")
    kwargs = {k: hf[k] for k in _FIELDS if k in hf and k != "add_pooling_layer"}
    if kwargs.get("pad_token_id") is None:
        kwargs["pad_token_id"] = 1 if FAMILIES.get(hf["model_type"]) else 0
    return BertConfig(
        **kwargs, add_pooling_layer=has_pooler, add_mlm_head=mlm_head, hf_config=dict(hf)
    )


def config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict: the original one, with our fields written over it."""
    out = dict(cfg.hf_config)
    out.update({k: getattr(cfg, k) for k in _FIELDS if k != "add_pooling_layer"})
    # Only the base encoder's tensors are exported, whatever head the source had, but the
    # MLM head of a model that has it (SPLADE).
    arch = ARCHITECTURES[cfg.model_type]
    out["architectures"] = [arch.replace("Model", "ForMaskedLM") if cfg.add_mlm_head else arch]
    out.setdefault("position_embedding_type", "absolute")
    return out


def build(cfg: BertConfig, **kwargs) -> BertModel:
    return BertModel(cfg, **kwargs)
