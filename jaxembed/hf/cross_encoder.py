"""Cross-encoders: an HF ``*ForSequenceClassification`` folder as a (query, passage) scorer.

The backbone is the family's (`jaxembed.hf.load_model`, which ignores the head's tensors);
`ScoreHead` is the classification head each family puts on top, with one output (a
reranker's relevance logit):

- BERT: the tanh pooler on the first token, then ``classifier`` (``bert.pooler.dense``,
  ``classifier``);
- RoBERTa / XLM-R / CamemBERT: ``classifier.dense`` + tanh on the first token, then
  ``classifier.out_proj``;
- ModernBERT: the first token or the mean of the tokens (``classifier_pooling``), then
  ``head.dense``, ``classifier_activation``, ``head.norm``, then ``classifier``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed.hf import family, load_model, read_config
from jaxembed.hf.io import ModelFolderError, WeightsError, read_weights
from jaxembed.models.layers import LayerNorm, Linear, activation

# model_type -> head layout
HEADS = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "modernbert": "modernbert",
}


def is_cross_encoder(path: str | Path) -> bool:
    """Whether an HF folder holds a sequence-classification model (a cross-encoder)."""
    archs = read_config(path).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


class ScoreHead(nnx.Module):
    """A family's classification head with one output: (batch, length, hidden) -> (batch,)."""

    def __init__(self, layout: str, cfg: dict, *, rngs: nnx.Rngs):
        h = cfg["hidden_size"]
        self.layout = layout
        dense_bias = cfg.get("classifier_bias", True) if layout == "modernbert" else True
        self.dense = Linear(h, h, axes=("embed", None), use_bias=dense_bias, rngs=rngs)
        modern = layout == "modernbert"
        eps, norm_bias = cfg.get("norm_eps", 1e-5), cfg.get("norm_bias", False)
        self.norm = LayerNorm(h, eps=eps, use_bias=norm_bias) if modern else None
        self.act = cfg.get("classifier_activation", "gelu") if modern else "tanh"
        self.pooling = cfg.get("classifier_pooling", "cls") if modern else "cls"
        self.out = Linear(h, 1, axes=("embed", None), rngs=rngs)

    def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        h = hidden.astype(jnp.float32)
        if self.pooling == "mean":
            m = mask.astype(jnp.float32)[..., None]
            x = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        else:
            x = h[:, 0]
        x = activation(self.act)(self.dense(x))
        if self.norm is not None:
            x = self.norm(x)
        return self.out(x)[:, 0]


# layout -> ((head attribute, HF key stem), ...); stems are matched at the end of a key.
_KEYS = {
    "bert": (("dense", "pooler.dense"), ("out", "classifier")),
    "roberta": (("dense", "classifier.dense"), ("out", "classifier.out_proj")),
    "modernbert": (("dense", "head.dense"), ("norm", "head.norm"), ("out", "classifier")),
}


def _find(tensors: dict, stem: str, source: Path) -> dict[str, np.ndarray]:
    """``{"weight": ..., "bias": ...}`` of the module whose key ends with ``stem``."""
    out = {}
    for key, value in tensors.items():
        for leaf in ("weight", "bias"):
            if key == f"{stem}.{leaf}" or key.endswith(f".{stem}.{leaf}"):
                out[leaf] = np.asarray(value, np.float32)
    if "weight" not in out:
        raise WeightsError(f"{source}: no tensor {stem}.weight (the classification head)")
    return out


def load_cross_encoder(path: str | Path) -> tuple[nnx.Module, ScoreHead]:
    """The backbone and the score head of a ``*ForSequenceClassification`` folder."""
    path = Path(path)
    cfg = read_config(path)
    layout = HEADS.get(cfg["model_type"])
    if layout is None:
        raise ModelFolderError(
            f"{path}: cross-encoders of model_type {cfg['model_type']!r} are not supported "
            f"(supported: {sorted(HEADS)})"
        )
    family(cfg["model_type"])
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {0: 0})
    if labels != 1:
        raise ModelFolderError(
            f"{path}: the classifier has {labels} outputs; a teacher needs one relevance score"
        )
    model = load_model(path)
    tensors = read_weights(path)
    head = ScoreHead(layout, cfg, rngs=nnx.Rngs(0))
    for attr, stem in _KEYS[layout]:
        found, module = _find(tensors, stem, path), getattr(head, attr)
        if attr == "norm":
            module.scale.set_value(found["weight"])
            if module.bias is not None:
                module.bias.set_value(found["bias"])
            continue
        if found["weight"].T.shape != module.kernel.shape:
            raise WeightsError(
                f"{path}: {stem}.weight has shape {found['weight'].shape}, "
                f"expected {module.kernel.shape[::-1]}"
            )
        module.kernel.set_value(found["weight"].T)
        if module.bias is not None:
            module.bias.set_value(found["bias"])
    return model, head
