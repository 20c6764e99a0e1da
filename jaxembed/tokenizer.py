"""The tokenizer of a model folder, and the EOS rule of last-token pooling."""

from __future__ import annotations

import os
from pathlib import Path

# Every file a tokenizer may be saved as. A run copies these with its model files and an
# export copies them back; a folder holding none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer saved in a model folder."""
    from transformers import AutoTokenizer  # heavy import, only needed here

    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer found (looked for {', '.join(TOKENIZER_FILES)})"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many types here; keep the cause
        raise FileNotFoundError(f"{path}: the tokenizer could not be loaded: {e}") from e


def append_eos(tokenizer, pooling: str):
    """Makes ``tokenizer`` end every text with EOS when ``pooling`` is last-token.

    Last-token pooling of a decoder (F2LLM, Qwen3-Embedding) reads the hidden state of an
    EOS appended *after* truncation: a text truncated to ``max_length`` keeps
    ``max_length - 1`` tokens plus EOS. Qwen tokenizers add no special tokens by default,
    so we switch on the tokenizer's own EOS post-processor; it truncates exactly that way,
    and a folder saved from this tokenizer makes sentence-transformers do the same.
    Tokenizers that already end with EOS (XLM-R's ``</s>``) or have none (BERT) are left as
    they are.
    """
    if pooling != "lasttoken" or tokenizer.eos_token_id is None:
        return tokenizer
    if tokenizer("a")["input_ids"][-1:] == [tokenizer.eos_token_id]:
        return tokenizer
    if not hasattr(type(tokenizer), "add_eos_token"):
        raise ValueError(
            f"{type(tokenizer).__name__} cannot be told to append EOS "
            "(needed for last-token pooling); use a fast (tokenizers) tokenizer"
        )
    tokenizer.add_eos_token = True
    if tokenizer("a")["input_ids"][-1:] != [tokenizer.eos_token_id]:
        raise ValueError(f"{type(tokenizer).__name__} did not start appending EOS")
    return tokenizer


def expand_queries(
    ids: list[list[int]], length: int, tokenizer, attend: bool
) -> tuple[list[list[int]], list[int] | None]:
    """ColBERT's query augmentation on queries tokenized to at most ``length`` tokens: each
    padded to exactly ``length`` with the mask token, which MaxSim scores
    (sentence-transformers' ``query_expansion``: fixed, the mask token). A query that fills
    ``length`` is the truncated one sentence-transformers reads.

    Returns ``(ids, hidden)``: the expanded queries and, unless ``attend`` (the encoder
    attends to the expansion too), each query's count of expansion tokens, which read the
    query but which no token reads (`jaxembed.packing.fill`'s ``hidden``): classic ColBERT.
    """
    mask = expansion_token(tokenizer)
    hidden = None if attend else [length - len(x) for x in ids]
    return [list(x) + [mask] * (length - len(x)) for x in ids], hidden


def expansion_token(tokenizer) -> int:
    """The mask token's id, which query expansion pads queries with; a tokenizer without
    one (Qwen3's, Gemma3's) is an error in one line."""
    if tokenizer.mask_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no mask token, which query expansion pads "
            "queries with: set model.query_expansion=0"
        )
    return tokenizer.mask_token_id
