"""Writing a Hugging Face / sentence-transformers folder: weights, tokenizer, ST files, card.

What `jaxembed.convert` (a trained run) and `jaxembed.merge` (merged models) both write:
the family's ``config.json`` and safetensors weights (one tensor at a time), the tokenizer
and license files of the model's folder, the sentence-transformers modules (pooling, Dense
layers, Normalize, prompts) and a ``README.md`` model card.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed import hf
from jaxembed.hf.sentence_transformers import STConfig, write_st_config
from jaxembed.tokenizer import TOKENIZER_FILES

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt")


def write_model_folder(
    folder: Path,
    model: nnx.Module,
    head: nnx.Module | None,
    st: STConfig,
    tokenizer_dir: Path,
    dtype: str,
    card: Callable[[list[str]], str],
    *,
    fetch=np.asarray,
    max_shard_bytes: int = 5 << 30,
) -> list[str]:
    """Writes the folder's files into ``folder`` (the caller renames it into place).

    ``card(files)`` returns the README's text given the files written; ``fetch`` brings a
    parameter to the host (multi-host callers gather). Returns the files written.
    """
    files = hf.save_model(
        model, folder, jnp.dtype(dtype), fetch=fetch, max_shard_bytes=max_shard_bytes
    )
    for name in TOKENIZER_FILES + LICENSE_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, folder / name)
            files.append(name)
    files += write_st_config(folder, st, model.config.hidden_size, head)
    (folder / "README.md").write_text(card(files))
    return files
