"""Exact top-k search by inner product: one search for evaluation (`jaxembed.retrieval`) and
mining (`jaxembed.mining`, `jaxembed.mine`, re-mining in training), and the similarities it
and the losses share: exact fp32 products (`EXACT`), MaxSim over token vectors (`maxsim`).

`top_k` scans a corpus in blocks on the default device (memory ``query_block * (block +
k)`` floats whatever the corpus size); `search_shards` runs it over embedding shards (e.g.
memory-maps of `jaxembed.embedding_cache`) and merges the shards' results, so a corpus
never has to sit in memory whole; `nearest_non_positives` drops each query's own positives
(by text hash) from its results. Equal scores rank the lower document index first,
everywhere, so a search split into blocks or shards ranks exactly like one over the whole
corpus.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

# The similarity products in true fp32. At JAX's default precision an fp32 product runs as
# one bf16 pass on TPU and in TF32 on GPU (~3 significant digits): divided by a temperature
# of 0.02 a cosine's error of 4e-3 is 0.2 in the logit. Here the products are B x B x D,
# a sliver of the encoder's FLOPs, so exact costs nothing (bench/RESULTS.md, first GPU
# run); the search ranks by the same products.
EXACT = jax.lax.Precision.HIGHEST

# Documents whose token similarities are computed at once by `maxsim`: the (A, chunk, La, Lb)
# block is all it holds, forward and backward (each chunk is recomputed for the gradient).
MAXSIM_CHUNK = 32


def maxsim(a: jax.Array, b: jax.Array) -> jax.Array:
    """[A, B] late-interaction scores (ColBERT's MaxSim): for every token of text a_i its
    best similarity with a token of b_j, summed over a_i's tokens.

    ``a`` [A, La, D] and ``b`` [B, Lb, D] are token vectors (normalised for cosine); a's
    padding tokens are zero vectors (they add 0), b's copies of one of its real tokens (the
    max is unchanged), as `token_sets` lays them out: no mask is needed.
    Memory: the (A, chunk, La, Lb) fp32 similarities of `MAXSIM_CHUNK` documents at a time,
    never (A, B, La, Lb); under `jax.checkpoint` the backward recomputes each chunk.
    """
    n = b.shape[0]
    c = max(1, min(MAXSIM_CHUNK, n))
    blocks = jnp.pad(b, ((0, -n % c), (0, 0), (0, 0))).reshape(-1, c, *b.shape[1:])

    def one(block):  # (A, c): the block's similarities never leave this function
        s = jnp.einsum("aid,cjd->acij", a, block, precision=EXACT)
        return jnp.sum(jnp.max(s, axis=-1), axis=-1)

    scores = jax.lax.map(jax.checkpoint(one), blocks)  # (blocks, A, c)
    return jnp.moveaxis(scores, 0, 1).reshape(a.shape[0], -1)[:, :n]


def token_sets(tokens: jax.Array, mask: jax.Array, *, query: bool) -> jax.Array:
    """The layout `maxsim` scores without a mask, from token vectors [..., L, D] and their
    real tokens [..., L]: a query's padding as zero vectors, a document's as copies of its
    first real token. A document without any stays as it is (a padded negative: masked)."""
    if query:
        return jnp.where(mask[..., None], tokens, 0.0)
    first = jnp.argmax(mask, axis=-1)[..., None, None]
    return jnp.where(mask[..., None], tokens, jnp.take_along_axis(tokens, first, axis=-2))


def own(a, b) -> jax.Array:
    """[B, K] similarities of a_i with each of its own b_i,k (b: [B, K, ...]): products of
    vectors, or MaxSim of token vectors in `token_sets`'s layout."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim == 2:
        return jnp.einsum("bd,bkd->bk", a, b, precision=EXACT)
    s = jnp.einsum("bid,bkjd->bkij", a, b, precision=EXACT)
    return jnp.sum(jnp.max(s, axis=-1), axis=-1)


def padded_tokens(texts: Sequence[np.ndarray], query: bool, width: int = 0) -> np.ndarray:
    """Texts' token vectors (each (tokens, D)) as one (n, width, D) array in `token_sets`'s
    layout (``width``: at least the longest text's tokens; 0: exactly that)."""
    width = max(width, *(len(x) for x in texts), 1)
    dim = texts[0].shape[-1] if len(texts) else 1
    tokens = np.zeros((len(texts), width, dim), np.float32)
    real = np.zeros((len(texts), width), bool)
    for i, x in enumerate(texts):
        tokens[i, : len(x)], real[i, : len(x)] = x, True
    return np.asarray(token_sets(tokens, real, query=query))


def widen(tokens: np.ndarray, width: int, query: bool) -> np.ndarray:
    """Token vectors in `token_sets`'s layout, (n, L, D), widened to ``width`` tokens with
    the layout kept: a query's with zero vectors, a document's with copies of its first
    token (real: a text's tokens start at position 0)."""
    extra = width - tokens.shape[1]
    if extra <= 0:
        return tokens
    if query:
        fill = np.zeros((len(tokens), extra, tokens.shape[2]), tokens.dtype)
    else:
        fill = np.repeat(tokens[:, :1], extra, axis=1)
    return np.concatenate([tokens, fill], axis=1)


def all_pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    """[A, B] similarities of every a_i with every b_j: dot products of one vector per
    text, MaxSim of token vectors."""
    return jnp.matmul(a, b.T, precision=EXACT) if a.ndim == 2 else maxsim(a, b)


# A multi-vector corpus is scanned in blocks of at most this many documents of one width:
# each document's real tokens rounded up to TOKEN_WIDTH (few shapes compile). On Debian's
# dev corpus (4,029 documents of 94 tokens on average, at most 256) about half the work of
# scanning every document at the longest's width (bench/RESULTS.md).
TOKEN_BLOCK = 256
TOKEN_WIDTH = 32


def token_lengths(docs: np.ndarray, rows: int = 1024) -> np.ndarray:
    """Each document's width that counts for MaxSim (documents in `token_sets`'s layout):
    up to its last token that is not a copy of its first; the copies after it change no
    max. Read ``rows`` documents at a time (a memory-mapped shard stays on disk)."""
    out = np.ones(len(docs), np.int64)
    for lo in range(0, len(docs), rows):
        block = np.asarray(docs[lo : lo + rows])
        differs = np.any(block != block[:, :1], axis=2)  # (rows, L)
        last = block.shape[1] - np.argmax(differs[:, ::-1], axis=1)
        out[lo : lo + len(block)] = np.where(differs.any(axis=1), last, 1)
    return out


@functools.partial(jax.jit, static_argnames=("k", "ordered"))
def _merge_block(best_s, best_i, q, d, ids, k, ordered):
    """Folds one corpus block (its documents' corpus indices ``ids``, -1: padding) into the
    running top-k, ties ranking the lower corpus index first. ``ordered``: the block's
    indices follow the running best's (a corpus scanned in order), so `jax.lax.top_k`'s
    tie rule (lower position first) is the index rule; else a sort by (score, index)."""
    # Exact fp32 (no TF32/bf16 passes on accelerators), so near-ties rank as in float32;
    # token vectors ([n, L, D], a multi-vector model's) score by MaxSim.
    s = jnp.where(ids[None, :] >= 0, all_pairs(q, d), -jnp.inf)
    cand_s = jnp.concatenate([best_s, s], axis=1)
    cand_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, s.shape)], axis=1)
    if ordered:
        top_s, pos = jax.lax.top_k(cand_s, k)
        return top_s, jnp.take_along_axis(cand_i, pos, axis=1)
    last = jnp.iinfo(jnp.int32).max  # empty slots and padding after every real index
    neg, idx = jax.lax.sort((-cand_s, jnp.where(cand_i < 0, last, cand_i)), num_keys=2)
    return -neg[:, :k], jnp.where(idx[:, :k] == last, -1, idx[:, :k])


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(docs: np.ndarray, rows: int) -> list[tuple[np.ndarray, int]]:
    """The scan's blocks of ``docs``: (corpus indices, width) each, in scan order. Vectors,
    and token vectors that fit in one block, in corpus order at full width (one compile);
    other token vectors by width, each document's its `token_lengths` rounded up to
    `TOKEN_WIDTH`, widest first. A block never mixes widths, so within a search a
    document's score does not depend on the documents around it (the same document twice
    scores the same, to the last bit)."""
    if docs.ndim == 2 or len(docs) <= rows:  # in order (one block: one compile)
        width = docs.shape[1] if docs.ndim == 3 else 0
        return [(np.arange(s, min(s + rows, len(docs))), width) for s in range(0, len(docs), rows)]
    widths = np.minimum(-(-token_lengths(docs) // TOKEN_WIDTH) * TOKEN_WIDTH, docs.shape[1])
    out = []
    for width in sorted(set(widths.tolist()), reverse=True):
        ids = np.flatnonzero(widths == width)
        out += [(ids[s : s + rows], width) for s in range(0, len(ids), rows)]
    return out


def top_k(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    block: int = 16384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: ``(scores, indices)``, each ``(len(queries), k)``.

    Scans ``docs`` in blocks of ``block`` rows and ``queries`` in blocks of ``query_block``
    (both padded to a power of two, so few shapes compile), so memory stays at about
    ``query_block * (block + k)`` floats. Equal scores rank the lower document index first,
    whatever the block sizes. Token vectors (``[n, L, D]``, laid out as `token_sets`
    does) are scored by MaxSim, exactly, in blocks of at most `TOKEN_BLOCK` documents of
    one width, each cut to its real tokens (`token_lengths`, `_blocks`); a block of
    queries then holds at most 2^26 similarities at a time (`MAXSIM_CHUNK` documents of
    ``Ld`` tokens each).
    """
    queries = np.asarray(queries, np.float32)
    docs = np.asarray(docs, np.float32)
    if queries.ndim == 3:
        block = min(block, TOKEN_BLOCK)
        per_query = MAXSIM_CHUNK * queries.shape[1] * docs.shape[1]
        query_block = min(query_block, max(1, (1 << 26) // per_query))
    k = min(k, len(docs))
    n_q = len(queries)
    out_s = np.zeros((n_q, k), np.float32)
    out_i = np.zeros((n_q, k), np.int64)
    if n_q == 0 or k == 0:
        return out_s, out_i
    d_rows = min(_pow2_at_least(block), _pow2_at_least(len(docs)))
    q_rows = min(_pow2_at_least(query_block), _pow2_at_least(n_q))
    blocks = _blocks(docs, d_rows)
    ordered = docs.ndim == 2 or len(blocks) == 1  # corpus order: top_k's tie rule holds
    for qs in range(0, n_q, q_rows):
        q = np.zeros((q_rows, *queries.shape[1:]), np.float32)
        q[: min(q_rows, n_q - qs)] = queries[qs : qs + q_rows]
        q = jnp.asarray(q)
        best_s = jnp.full((q_rows, k), -jnp.inf, jnp.float32)
        best_i = jnp.full((q_rows, k), -1, jnp.int32)
        for ids, width in blocks:
            d = docs[ids[0] : ids[-1] + 1] if ordered else docs[ids, :width]
            # A short block (the last; a width's last) padded (index -1: never a result);
            # a width's to a power of two, at least a MaxSim chunk: few shapes, every
            # chunk computed alike, little padding when a width has few documents.
            size = d_rows
            if docs.ndim == 3:
                size = max(min(d_rows, MAXSIM_CHUNK), _pow2_at_least(len(ids)))
            if len(ids) < size:
                d = np.concatenate([d, np.zeros((size - len(d), *d.shape[1:]), np.float32)])
                ids = np.concatenate([ids, np.full(size - len(ids), -1)])
            best_s, best_i = _merge_block(
                best_s, best_i, q, jnp.asarray(d), jnp.asarray(ids, jnp.int32), k, ordered
            )
        rows = min(q_rows, n_q - qs)
        out_s[qs : qs + rows] = np.asarray(best_s)[:rows]
        out_i[qs : qs + rows] = np.asarray(best_i)[:rows]
    return out_s, out_i


def merge_top_k(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merges two ``(scores, global indices)`` candidate lists per row into the best ``k``.

    Ties rank the lower index first, as `top_k` does, so a search split into shards ranks
    exactly like one over the whole corpus. Index -1 marks an empty slot (score -inf).
    """
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, i], axis=1)
    # lexsort: the last key is primary. Empty slots (-inf) sort after every real score.
    order = np.lexsort((cand_i, -cand_s), axis=-1)[:, :k]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def search_shards(
    queries: np.ndarray,
    shards: Sequence[np.ndarray],
    k: int,
    *,
    block: int = 16384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` over the concatenation of ``shards`` (e.g. memory-maps).

    Each shard is searched with `top_k` and merged into a running top-k, so only one shard
    is in memory at a time. Returns ``(scores, indices)`` of shape ``(len(queries), k)``,
    indices global; when the shards hold fewer than ``k`` rows the rest is filled with score
    -inf and index -1. Ties: lower index first.
    """
    queries = np.asarray(queries, np.float32)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for shard in shards:
        if len(shard) and len(queries) and k:
            s, i = top_k(queries, np.asarray(shard), k, block, query_block)
            best_s, best_i = merge_top_k(best_s, best_i, s, i + offset, k)
        offset += len(shard)
    return best_s, best_i


def nearest_non_positives(
    q_shards: Sequence[np.ndarray],
    d_shards: Sequence[np.ndarray],
    pool_hash: np.ndarray,
    pos_hash: np.ndarray,
    k: int,
    *,
    block: int = 16384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best ``k`` documents that are none of its positives.

    Positives are recognised by text hash, not by index, so a positive that also sits in
    the corpus (or twice in it) is never returned as a candidate negative.

    Args:
      q_shards, d_shards: query and document embeddings, in shards of equal size (but the
        last); the queries' shards bound the memory of one `search_shards` call.
      pool_hash: `jaxembed.packing.text_hash` of every document.
      pos_hash: ``(queries, max positives)`` hashes of each query's positives, -1 padded.
      k, block, query_block: as for `search_shards`.

    Returns:
      ``(scores, document indices)``, ``(queries, k)``, best first; -inf and -1 where there
      are fewer candidates.
    """
    n_q, max_pos = pos_hash.shape
    # A query's positives are at most max_pos of the ranks: k + max_pos covers them.
    k_search = k + max_pos
    cand_s = np.full((n_q, k), -np.inf, np.float32)
    cand_i = np.full((n_q, k), -1, np.int64)
    lo = 0
    for q_shard in q_shards:
        hi = lo + len(q_shard)
        s, i = search_shards(
            np.asarray(q_shard), d_shards, k_search, block=block, query_block=query_block
        )
        h = np.where(i >= 0, pool_hash[np.maximum(i, 0)], -2)
        excluded = i < 0
        for j in range(max_pos):
            excluded |= h == pos_hash[lo:hi, j : j + 1]
        # A stable sort on the flag moves the kept candidates forward in rank order.
        order = np.argsort(excluded, axis=1, kind="stable")[:, :k]
        keep = ~np.take_along_axis(excluded, order, 1)
        cand_s[lo:hi] = np.where(keep, np.take_along_axis(s, order, 1), -np.inf)
        cand_i[lo:hi] = np.where(keep, np.take_along_axis(i, order, 1), -1)
        lo = hi
    return cand_s, cand_i


def sparse_top_k(queries, docs, k: int, query_block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` for ``scipy.sparse`` vectors (a sparse model's): ``(scores, indices)``.

    A block of queries is multiplied with the sparse corpus (only shared non-zero
    dimensions cost anything: an inverted index's work), its scores made dense (``query_block
    x len(docs)`` floats), and each row's best ``k`` kept, equal scores ranking the lower
    document index first, as `top_k` does.
    """
    queries, docs = scipy.sparse.csr_matrix(queries), scipy.sparse.csr_matrix(docs).T.tocsc()
    k = min(k, docs.shape[1])
    out_s = np.zeros((queries.shape[0], k), np.float32)
    out_i = np.zeros((queries.shape[0], k), np.int64)
    for start in range(0, queries.shape[0], query_block):
        s = np.asarray((queries[start : start + query_block] @ docs).todense(), np.float32)
        # The k-th best score per row, then everything at least as good, by (score, index).
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(s, part, axis=1).min(axis=1, keepdims=True)
        for r, row in enumerate(s):
            cand = np.flatnonzero(row >= kth[r])
            best = cand[np.lexsort((cand, -row[cand]))][:k]
            out_s[start + r], out_i[start + r] = row[best], best
    return out_s, out_i
