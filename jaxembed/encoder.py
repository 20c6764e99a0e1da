"""`jaxembed.load(path)`: an HF / sentence-transformers folder as a ready-to-use text encoder."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxembed import hf
from jaxembed.hf.sentence_transformers import STConfig, read_st_config
from jaxembed.models.pooling import check_pooling, l2_normalize, pool, pool_segments

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)
MIN_BUCKET = 16


def length_buckets(max_length: int) -> list[int]:
    """Padded lengths we compile for, capped by and including ``max_length``.

    From 16 up, each bucket the multiple of 16 at or above 1.25x the one before (16, 32, 48,
    64, 80, 112, 144, 192, 240, 304, ...). Texts are sorted by length before batching, so a
    batch pads by less than 1.25x + 16 tokens, about a tenth on average on real text (1.13
    computed per real token in bench/encode_throughput.py); each bucket met is one compile.
    """
    buckets = []
    b = MIN_BUCKET
    while b < max_length:
        buckets.append(b)
        b = -(-(b * 5 // 4) // MIN_BUCKET) * MIN_BUCKET
    return [*buckets, max_length]


MAX_SEGMENTS = 64  # texts per packed row at most (a static shape of the packed program)


def pack_rows(lengths, row_length: int, max_segments: int = MAX_SEGMENTS) -> list[list[int]]:
    """Groups texts (their token counts) into rows of at most ``row_length`` tokens.

    Longest first: each row starts with the longest text left and is topped up with the
    shortest ones that still fit (at most ``max_segments`` texts). Returns the text indices
    of every row; linear time, and rows come out in decreasing order of their first text.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        row, room = [order[lo]], row_length - lengths[order[lo]]
        lo += 1
        while lo <= hi and len(row) < max_segments and lengths[order[hi]] <= room:
            row.append(order[hi])
            room -= lengths[order[hi]]
            hi -= 1
        rows.append(row)
    return rows


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


class Encoder:
    """A backbone, its tokenizer and its pooling: ``encode(texts) -> (n, dim)`` unit vectors."""

    def __init__(
        self,
        model: nnx.Module,
        tokenizer,
        *,
        pooling: str,
        max_length: int,
        st: STConfig | None = None,
        name: str = "",
        packing: bool = False,
    ):
        self.model = model
        self.packing = packing
        self.tokenizer = tokenizer
        self.pooling = check_pooling(pooling)
        self.max_length = int(max_length)
        self.st = st or STConfig()
        self.prompts = dict(self.st.prompts)
        self.name = name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        graphdef, state = nnx.split(model)
        # Host (NumPy) parameters go to the default device; live arrays (perhaps sharded
        # over several hosts) stay where they are.
        self._state = jax.tree.map(
            lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), state
        )

        def embed(state, ids, mask, pool_mask):
            h = nnx.merge(graphdef, state)(ids, mask)
            return l2_normalize(pool(h, pool_mask, self.pooling, attention_mask=mask))

        def embed_packed(state, ids, segment_ids, pool_ids):
            h = nnx.merge(graphdef, state)(ids, segment_ids > 0, segment_ids=segment_ids)
            pooled = pool_segments(h, pool_ids, segment_ids, self.pooling, MAX_SEGMENTS)
            return l2_normalize(pooled)

        self._fns = {False: embed, True: embed_packed}
        self._jitted = {k: jax.jit(f) for k, f in self._fns.items()}
        self._on_mesh: dict = {}  # jitted with replicated outputs once a mesh is set
        self._mesh = None

    def use_mesh(self, mesh) -> Encoder:
        """Splits every batch over ``mesh``'s data-parallel axes; returns ``self``.

        Batches are padded to a multiple of the data-parallel size (pad rows are dropped),
        the parameters are replicated unless they already live on ``mesh`` (live training
        parameters keep their sharding). Embeddings do not depend on the mesh.

        The mesh may span several hosts (a multi-host run): then every process calls
        `encode` with the same texts, each feeds only its own devices' rows, and every
        process receives all the embeddings.
        """
        from jaxembed import sharding

        multi_host = jax.process_count() > 1
        self._mesh = mesh if sharding.data_parallel_size(mesh) > 1 or multi_host else None
        if self._mesh is not None:
            out = sharding.replicated(mesh)
            self._on_mesh = {k: jax.jit(f, out_shardings=out) for k, f in self._fns.items()}
            self._state = self._place(self._state)
        else:  # one device: bring parameters back from a previous, larger mesh
            self._state = jax.device_put(self._state, mesh.devices.flat[0])
        return self

    def _place(self, state):
        from jaxembed import sharding

        leaves = jax.tree.leaves(state)
        on_mesh = (
            leaves and getattr(getattr(leaves[0], "sharding", None), "mesh", None) == self._mesh
        )
        return state if on_mesh else jax.device_put(state, sharding.replicated(self._mesh))

    def _forward(
        self, ids: np.ndarray, mask: np.ndarray, pool_mask: np.ndarray, packed: bool = False
    ) -> jax.Array:
        """Embeddings of a padded batch; packed: ``mask`` and ``pool_mask`` are segment ids."""
        if self._mesh is None:
            return self._jitted[packed](
                self._state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pool_mask)
            )
        from jaxembed import sharding

        rows, n = ids.shape[0], sharding.data_parallel_size(self._mesh)
        placed = []
        for a in (ids, mask, pool_mask):
            a = np.concatenate([a, np.zeros((-rows % n, *a.shape[1:]), a.dtype)])
            # Each process supplies only the rows of its own devices (all hosts hold `a`).
            placed.append(
                jax.make_array_from_callback(
                    a.shape, sharding.batch_sharding(self._mesh, a.ndim), lambda i, a=a: a[i]
                )
            )
        return self._on_mesh[packed](self._place(self._state), *placed)[:rows]

    def set_params(self, model_params) -> None:
        """Swaps in new backbone parameters (e.g. live training parameters) without recompiling.

        ``model_params`` is an `nnx.State` or its pure-dict form, possibly sharded on a mesh.
        """
        self._state = model_params

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def resolve_prompt(self, prompt_name: str | None, prompt: str | None = None) -> str:
        """The prompt text for ``prompt_name`` (or the folder's default prompt), "" if none."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.st.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ValueError(
                f"prompt_name {name!r} is not defined by {self.name or 'this model'}; "
                f"defined prompts: {sorted(self.prompts) or 'none'}"
            )
        return self.prompts[name]

    def _prompt_length(self, prompt: str) -> int:
        """Prompt tokens to exclude from pooling, measured as sentence-transformers does."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        n = len(ids)
        if ids and ids[-1] in self.tokenizer.all_special_ids:
            n -= 1
        return n

    def tokenize(self, texts: list[str], prompt: str = "") -> list[list[int]]:
        if self.st.do_lower_case:
            texts = [t.lower() for t in texts]
        texts = [prompt + t for t in texts]
        out = self.tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=self.max_length
        )
        return out["input_ids"]

    def encode(
        self,
        texts: list[str],
        prompt_name: str | None = None,
        batch_size: int = 32,
        *,
        prompt: str | None = None,
        truncate_dim: int | None = None,
    ) -> np.ndarray:
        """Embeds ``texts`` as float32 unit vectors, shape (len(texts), dim).

        Texts are sorted by length and padded to a few bucket lengths, and every batch but a
        lone short one has ``batch_size`` rows, so only a handful of shapes are compiled.
        With ``packing`` (see `load`), rows hold several texts each instead.

        Args:
          texts: the strings to embed.
          prompt_name: a key of the model's prompts (e.g. "query"); defaults to the folder's
            ``default_prompt_name``, if any.
          batch_size: rows per forward pass.
          prompt: literal prompt text, overriding ``prompt_name``.
          truncate_dim: keep the first ``truncate_dim`` features (Matryoshka), renormalised.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if truncate_dim is not None and not 0 < truncate_dim <= self.dim:
            raise ValueError(f"truncate_dim={truncate_dim} must be in 1..{self.dim}")
        dim = truncate_dim or self.dim
        if len(texts) == 0:
            return np.zeros((0, dim), np.float32)
        prompt_text = self.resolve_prompt(prompt_name, prompt)
        skip = self._prompt_length(prompt_text) if prompt_text and not self.st.include_prompt else 0
        ids = self.tokenize(list(texts), prompt_text)
        if self.packing:
            out = self._encode_packed(ids, batch_size, skip)
        else:
            out = self._encode_padded(ids, batch_size, skip)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _encode_padded(self, ids: list[list[int]], batch_size: int, skip: int) -> np.ndarray:
        """One text per row, rows sorted by length and padded to a bucket length."""
        n = len(ids)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        buckets = length_buckets(self.max_length)
        rows = batch_size if n >= batch_size else 1 << (n - 1).bit_length()
        out = np.zeros((n, self.dim), np.float32)
        for start in range(0, n, rows):
            idx = order[start : start + rows]
            longest = max(len(ids[i]) for i in idx)
            length = next(b for b in buckets if b >= longest)
            batch = np.full((rows, length), self.pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, i in enumerate(idx):
                batch[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            pool_mask = mask.copy()
            pool_mask[:, :skip] = 0
            emb = self._forward(batch, mask, pool_mask)
            out[idx] = np.asarray(emb)[: len(idx)]
        return out

    def _encode_packed(self, ids: list[list[int]], batch_size: int, skip: int) -> np.ndarray:
        """Several texts per row (`pack_rows`), ``batch_size`` rows of one bucket length.

        Attention stays within each text and positions restart, so the embeddings equal the
        unpadded ones; padding shrinks to the rows' unused tails. Every batch has the same
        shape (the last is filled with empty rows): one compilation per bucket length.
        """
        lengths = [len(x) for x in ids]
        length = next(b for b in length_buckets(self.max_length) if b >= max(lengths))
        rows = pack_rows(lengths, length)
        out = np.zeros((len(ids), self.dim), np.float32)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = np.full((batch_size, length), self.pad_id, np.int32)
            segments = np.zeros((batch_size, length), np.int32)
            pool_ids = np.zeros((batch_size, length), np.int32)
            for r, row in enumerate(chunk):
                at = 0
                for s, i in enumerate(row, start=1):
                    end = at + lengths[i]
                    batch[r, at:end] = ids[i]
                    segments[r, at:end] = s
                    # Prompt tokens (each text's first `skip`) are attended to, not pooled.
                    pool_ids[r, min(at + skip, end) : end] = s
                    at = end
            emb = np.asarray(self._forward(batch, segments, pool_ids, packed=True))
            for r, row in enumerate(chunk):
                for s, i in enumerate(row):
                    out[i] = emb[r, s]
        return out


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    pooling: str | None = None,
    max_length: int | None = None,
    packing: bool = False,
) -> Encoder:
    """Loads a local Hugging Face / sentence-transformers folder or a training run as an `Encoder`.

    Args:
      path: the model folder (``config.json``, weights, tokenizer files; sentence-transformers
        files optional), or a training run: WORKDIR (its latest checkpoint), WORKDIR/STEP or
        WORKDIR/checkpoints/STEP. A run encodes as its export (`jaxembed.convert`) does:
        pooling, prompts and max length as trained.
      dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32.
      pooling: overrides the folder's pooling (default: the folder's ``1_Pooling``, else mean).
      max_length: overrides the maximum token count (default: sentence-transformers'
        ``max_seq_length``, else the tokenizer's and the position table's limit).
      packing: put several texts in each row (attention kept within each text), so short
        texts waste no padding; the embeddings are the same. ``batch_size`` then counts
        rows of the bucket length that holds the longest text.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    path = Path(path)
    model, st, files = _model_and_settings(path, dtype)
    pooling = pooling or st.pooling or "mean"
    tokenizer = append_eos(load_tokenizer(files), pooling)
    limit = model.config.max_tokens
    if max_length is None:
        max_length = st.max_seq_length or min(tokenizer.model_max_length, limit)
    if not 0 < max_length <= limit:
        raise ValueError(f"max_length={max_length} must be in 1..{limit} for {path}")
    return Encoder(
        model,
        tokenizer,
        pooling=pooling,
        max_length=max_length,
        st=st,
        name=str(path),
        packing=packing,
    )


def _model_and_settings(path: Path, dtype: str) -> tuple[nnx.Module, STConfig, Path]:
    """``(model, sentence-transformers settings, folder with the tokenizer)`` of ``path``."""
    if (path / "config.json").exists():
        return hf.load_model(path, dtype=jnp.dtype(dtype)), read_st_config(path), path
    from jaxembed import convert  # Orbax and the training code: only when a run is loaded

    if not convert.is_checkpoint(path):
        return hf.load_model(path, dtype=jnp.dtype(dtype)), read_st_config(path), path  # errors
    ckpt = convert.find_checkpoint(path)
    # Host (NumPy) parameters, like hf.load_model's; Encoder places them on the device.
    model = convert.restore_model(ckpt, dtype=dtype)
    return model, convert.trained_st_config(ckpt, model.config), ckpt.model_dir
