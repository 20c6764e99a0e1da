"""`jaxembed.load(path)`: an HF / sentence-transformers folder as a ready-to-use text encoder."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from flax import nnx

from jaxembed import search, sharding, trained_model
from jaxembed.choices import DTYPES, check
from jaxembed.hf.sentence_transformers import STConfig, pick_prompt
from jaxembed.models.head import Head
from jaxembed.models.pooling import (
    SPLADE,
    TOKENS,
    check_pooling,
    l2_normalize,
    pool_segments,
    splade_inputs,
)
from jaxembed.packing import MAX_SEGMENTS, bucket, fill, length_buckets, pack_rows
from jaxembed.progress import Progress
from jaxembed.tokenizer import append_eos, expand_queries, load_tokenizer

PROGRESS_FROM = 5000  # texts: smaller jobs finish before a progress line would help


class Encoder:
    """A backbone, its tokenizer, pooling and head: ``encode(texts) -> (n, dim)`` unit vectors
    (a sparse model's: its sparse vectors, scored by dot product, `sparse`); a multi-vector
    model's (`multi_vector`) a unit vector per token, `encode_tokens`.

    ``head`` holds the folder's Dense layers after pooling (`jaxembed.models.head`), if any,
    and its sparse autoencoder (CSR), if any.
    """

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
        head: Head | None = None,
    ):
        self.model = model
        self.head = head
        self.packing = packing
        self.tokenizer = tokenizer
        self.pooling = check_pooling(pooling)
        # A sparse model (CSR's autoencoder or SPLADE's pooling): its vectors are never
        # normalised, and score by dot product.
        self.sparse = (head is not None and head.sparse is not None) or pooling == SPLADE
        self.multi_vector = pooling == TOKENS
        self.max_length = int(max_length)
        self.st = st or STConfig()
        self.prompts = dict(self.st.prompts)
        self.name = name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        graphdef, state = nnx.split(model)
        params = {"model": state}
        if head is not None:
            head_graphdef, params["head"] = nnx.split(head)
        # Host (NumPy) parameters go to the default device; live arrays (perhaps sharded
        # over several hosts) stay where they are.
        self._params = jax.tree.map(
            lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params
        )

        # Texts per row: several with packing, else one (a padded batch). A static shape.
        self.segments = MAX_SEGMENTS if packing else 1

        def embed(params, ids, segment_ids, pool_ids, key_ids):
            """(rows, segments, dim) unit (or sparse) vectors of rows (`jaxembed.packing`)."""
            model = nnx.merge(graphdef, params["model"])
            # One text per row is a padded batch: key lengths, not a mask, for fused kernels.
            packed = segment_ids if self.segments > 1 else None
            h = splade_inputs(model, model(ids, key_ids > 0, segment_ids=packed), self.pooling)
            if self.multi_vector:  # (rows, length, dim): every token, through the head
                h = h.astype(jnp.float32)
                if "head" in params:
                    h = nnx.merge(head_graphdef, params["head"])(h)
                return l2_normalize(h)
            segments = min(self.segments, ids.shape[1])
            pooled = pool_segments(h, pool_ids, segment_ids, self.pooling, segments)
            if "head" in params:
                pooled = nnx.merge(head_graphdef, params["head"])(pooled)
            return pooled if self.sparse else l2_normalize(pooled)

        self._embed = embed
        self._jitted = jax.jit(embed)
        self._on_mesh = None  # jitted with replicated outputs once a mesh is set
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
        multi_host = jax.process_count() > 1
        self._mesh = mesh if sharding.data_parallel_size(mesh) > 1 or multi_host else None
        if self._mesh is not None:
            self._on_mesh = jax.jit(self._embed, out_shardings=sharding.replicated(mesh))
            self._params = self._place(self._params)
        else:  # one device: bring parameters back from a previous, larger mesh
            self._params = jax.device_put(self._params, mesh.devices.flat[0])
        return self

    def _place(self, state):
        leaves = jax.tree.leaves(state)
        on_mesh = (
            leaves and getattr(getattr(leaves[0], "sharding", None), "mesh", None) == self._mesh
        )
        return state if on_mesh else jax.device_put(state, sharding.replicated(self._mesh))

    def _forward(self, *arrays: np.ndarray) -> jax.Array:
        """Embeddings ``(rows, segments, dim)`` of one batch of rows: its ids, segment ids,
        pooled and attended segment ids (`jaxembed.packing.fill`)."""
        if self._mesh is None:
            return self._jitted(self._params, *map(jnp.asarray, arrays))
        rows, n = arrays[0].shape[0], sharding.data_parallel_size(self._mesh)
        placed = []
        for a in arrays:
            a = np.concatenate([a, np.zeros((-rows % n, *a.shape[1:]), a.dtype)])
            # Each process supplies only the rows of its own devices (all hosts hold `a`).
            placed.append(
                jax.make_array_from_callback(
                    a.shape, sharding.batch_sharding(self._mesh, a.ndim), lambda i, a=a: a[i]
                )
            )
        return self._on_mesh(self._place(self._params), *placed)[:rows]

    def set_params(self, params: dict) -> None:
        """Swaps in new parameters (e.g. live training parameters) without recompiling.

        ``params`` is laid out as the train state's: ``{"model": ..., "head": ...}`` (the
        head when the encoder has one), each an `nnx.State` or its pure-dict form, possibly
        sharded on a mesh; other entries are ignored.
        """
        self._params = {k: params[k] for k in self._params}

    @property
    def dim(self) -> int:
        """The embedding size: the last Dense layer's output, else the backbone's."""
        if self.head is not None and self.head.out_features is not None:
            return self.head.out_features
        if self.pooling == SPLADE:
            return self.model.config.vocab_size
        return self.model.config.hidden_size

    def resolve_prompt(self, prompt_name: str | None, prompt: str | None = None) -> str:
        """The prompt text for ``prompt_name`` (or the folder's default prompt), "" if none."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.st.default_prompt_name
        return pick_prompt(self.prompts, name, (), self.name) if name is not None else ""

    def _prompt_length(self, prompt: str) -> int:
        """Prompt tokens to exclude from pooling, measured as sentence-transformers does."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        n = len(ids)
        if ids and ids[-1] in self.tokenizer.all_special_ids:
            n -= 1
        return n

    def tokenize(
        self, texts: list[str], prompt: str = "", max_length: int | None = None
    ) -> list[list[int]]:
        if self.st.do_lower_case:
            texts = [t.lower() for t in texts]
        texts = [prompt + t for t in texts]
        limit = max_length or self.max_length
        out = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)
        return out["input_ids"]

    def encode(
        self,
        texts: list[str],
        prompt_name: str | None = None,
        batch_size: int = 32,
        *,
        prompt: str | None = None,
        truncate_dim: int | None = None,
        max_length: int | None = None,
        as_sparse: bool = False,
    ) -> np.ndarray:
        """Embeds ``texts`` as float32 unit vectors, shape (len(texts), dim) (a sparse
        model's: its sparse vectors, not normalised).

        Texts are sorted by length and padded to a few bucket lengths, and every batch but a
        lone short one has ``batch_size`` rows, so only a handful of shapes are compiled.
        With ``packing`` (see `load`), a row's tail holds shorter texts instead of padding.

        Args:
          texts: the strings to embed.
          prompt_name: a key of the model's prompts (e.g. "query"); defaults to the folder's
            ``default_prompt_name``, if any.
          batch_size: rows per forward pass.
          prompt: literal prompt text, overriding ``prompt_name``.
          truncate_dim: keep the first ``truncate_dim`` features (Matryoshka), renormalised.
          max_length: tokens per text for this call (default: the encoder's ``max_length``;
            at most the model's positions), e.g. queries shorter than passages.
          as_sparse: return a ``scipy.sparse.csr_matrix``, never holding the vectors dense
            (for a sparse model: SPLADE's have the vocabulary's size, 122 KB a text dense).
        """
        if self.multi_vector:
            raise ValueError(f"{self.name or 'the model'} is a multi-vector model (a vector per "
                             "token): use encode_tokens")  # fmt: skip
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if truncate_dim is not None and not 0 < truncate_dim <= self.dim:
            raise ValueError(f"truncate_dim={truncate_dim} must be in 1..{self.dim}")
        limit = self._limit(max_length)
        if as_sparse and truncate_dim is not None:
            raise ValueError("truncate_dim: a sparse vector's first dimensions mean nothing")
        dim = truncate_dim or self.dim
        if len(texts) == 0:
            empty = np.zeros((0, dim), np.float32)
            return scipy.sparse.csr_matrix(empty) if as_sparse else empty
        prompt_text = self.resolve_prompt(prompt_name, prompt)
        skip = self._prompt_length(prompt_text) if prompt_text and not self.st.include_prompt else 0
        ids = self.tokenize(list(texts), prompt_text, limit)
        out = self._encode_rows(ids, batch_size, skip, limit, as_sparse)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def encode_tokens(
        self,
        texts: list[str],
        prompt_name: str | None = None,
        batch_size: int = 32,
        *,
        prompt: str | None = None,
        max_length: int | None = None,
        query: bool = False,
        padded: bool = False,
    ) -> list[np.ndarray] | np.ndarray:
        """A multi-vector model's token vectors: per text a float32 (tokens, dim) array of
        unit vectors, every real token's (prompt and special tokens included), as
        sentence-transformers' MultiVectorEncoder returns them.

        ``query``: the texts are queries, expanded with the mask token to the model's query
        expansion, if it has one (``encode_query``'s side). ``padded``: one (n, length, dim)
        array (``length``: the longest text's tokens, the expansion's for queries) in the
        layout `search.maxsim` scores without masks (a query's padding zero, a document's
        a copy of its first token): what the search takes. Other arguments as in `encode`.
        """
        if not self.multi_vector:
            raise ValueError(f"{self.name or 'the model'} is not a multi-vector model: use encode")
        limit = self._limit(max_length)
        expansion = self.st.query_expansion if query else 0
        prompt_text = self.resolve_prompt(prompt_name, prompt)
        ids, hidden = self.tokenize(list(texts), prompt_text, expansion or limit), None
        if expansion:
            ids, hidden = expand_queries(
                ids, expansion, self.tokenizer, self.st.query_expansion_attend
            )
        out: list = [None] * len(ids)
        for rows, per_batch, length in self.batches(ids, batch_size, expansion or limit):
            *arrays, where = fill(ids, rows, per_batch, length, self.pad_id, 0, hidden)
            emb, seg = np.asarray(self._forward(*arrays)), arrays[1]
            for text, row, segment in where:
                out[text] = emb[row][seg[row] == segment + 1]
        if not padded:
            return out
        if not out:
            return np.zeros((0, expansion or 1, self.dim), np.float32)
        return search.padded_tokens(out, query, expansion)

    def _limit(self, max_length: int | None) -> int:
        """Tokens per text for a call: ``max_length``, else the encoder's, checked."""
        limit = max_length or self.max_length
        if not 0 < limit <= self.model.config.max_tokens:
            raise ValueError(f"max_length={limit} must be in 1..{self.model.config.max_tokens}")
        return limit

    def encode_for_search(
        self,
        texts: list[str],
        prompt: str = "",
        *,
        query: bool = False,
        batch_size: int = 32,
        max_length: int | None = None,
        as_sparse: bool = False,
    ):
        """What the search (`jaxembed.search.top_k`) scores, as evaluation and mining read
        it: unit vectors (a sparse model's, with ``as_sparse``, a sparse matrix), or a
        multi-vector model's padded token vectors (`encode_tokens`; ``query``: as queries)."""
        kw = dict(prompt=prompt, batch_size=batch_size, max_length=max_length)
        if self.multi_vector:
            return self.encode_tokens(texts, query=query, padded=True, **kw)
        return self.encode(texts, as_sparse=as_sparse, **kw)

    def row_shape(self, query: bool = False, max_length: int | None = None) -> tuple[int, ...]:
        """One text's shape, the same for every text: (dim,), or a multi-vector model's
        (tokens, dim), ``tokens`` the most a text may have (`search.widen` pads to it)."""
        if not self.multi_vector:
            return (self.dim,)
        return (
            (self.st.query_expansion if query else 0) or max_length or self.max_length,
            self.dim,
        )

    def batches(
        self, ids: list[list[int]], batch_size: int, max_length: int | None = None
    ) -> list[tuple[list, int, int]]:
        """How `encode` lays out texts (token ids): ``(rows, rows per batch, length)`` each.

        Rows (`jaxembed.packing.pack_rows`) come longest first, each as long as the bucket of
        its first text, with shorter texts in its tail when packing; a batch takes the length
        of its first row. Every batch has ``batch_size`` rows (the last is filled with empty
        ones) unless there are fewer rows in all: then the next power of two. So only a few
        shapes are compiled; without packing this is the classic sorted, padded batching
        (1.13 computed per real token on Debian text).
        """
        limit = max_length or self.max_length
        buckets = length_buckets(limit)
        rows = pack_rows([len(x) for x in ids], limit, self.segments, buckets)
        per_batch = batch_size if len(rows) >= batch_size else 1 << (len(rows) - 1).bit_length()
        return [
            (rows[i : i + per_batch], per_batch, bucket(len(ids[rows[i][0]]), buckets))
            for i in range(0, len(rows), per_batch)
        ]

    def _encode_rows(self, ids, batch_size: int, skip: int, max_length: int, as_sparse=False):
        out = None if as_sparse else np.zeros((len(ids), self.dim), np.float32)
        blocks, order = [], []  # as_sparse: each batch's vectors, and their texts
        # Only jobs that take a while report, and only process 0 of a multi-host run.
        loud = len(ids) >= PROGRESS_FROM and jax.process_index() == 0
        with Progress(len(ids), "encoding", enabled=loud) as progress:
            for rows, per_batch, length in self.batches(ids, batch_size, max_length):
                *arrays, where = fill(ids, rows, per_batch, length, self.pad_id, skip)
                emb = np.asarray(self._forward(*arrays))
                text, row, segment = where.T
                if as_sparse:
                    blocks.append(scipy.sparse.csr_matrix(emb[row, segment]))
                    order.append(text)
                else:
                    out[text] = emb[row, segment]
                progress.update(len(text))
        if as_sparse:  # back in the texts' order
            return scipy.sparse.vstack(blocks, format="csr")[np.argsort(np.concatenate(order))]
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
        pooling, prompts and max length as trained. Either may be on a bucket
        (``gs://BUCKET/PATH``).
      dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32.
      pooling: overrides the folder's pooling (default: the folder's ``1_Pooling``, else mean).
      max_length: overrides the maximum token count (default: sentence-transformers'
        ``max_seq_length``, else the tokenizer's and the position table's limit).
      packing: put several texts in each row (attention kept within each text): a row's
        tail that padding would waste holds shorter texts; the embeddings are the same.
        ``batch_size`` counts rows either way.
    """
    check(dtype, DTYPES, "dtype")
    # Host (NumPy) parameters; the Encoder places them on the device.
    model, head, st, files = trained_model.load_model_or_run(path, dtype)
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
        head=head,
    )
