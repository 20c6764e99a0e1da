"""Rows of token ids: the one layout of every batch, in training and in encoding.

A batch is ``(rows, length)`` token ids with segment ids: each text occupies a run of one
row, numbered 1, 2, ... within the row (0 is padding); attention and pooling stay inside a
text and positions restart at each one, so a text embeds exactly as it would alone. With
one text per row this is a padded batch; with several (``max_segments`` > 1) the tails that
padding would waste hold other texts. Row lengths are buckets (`length_buckets`), so short
texts sit in short rows and only a few shapes are compiled.

`pack_rows` decides which texts share a row, `fill` writes the arrays. Pure NumPy; used by
the data pipeline (training batches) and the encoder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

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


def text_hash(text: str) -> int:
    """A stable 31-bit hash of a text (the same on every host and every run): how false
    negatives and a query's positives are recognised, by text rather than by index."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


MAX_SEGMENTS = 64  # texts per packed row at most (a static shape of the packed program)


def bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` (ascending) that holds ``length`` tokens."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"a text of {length} tokens is longer than the longest row, {buckets[-1]}")


def pack_rows(
    lengths,
    row_length: int,
    max_segments: int = MAX_SEGMENTS,
    buckets: Sequence[int] | None = None,
) -> list[list[int]]:
    """Groups texts (their token counts) into rows of at most ``row_length`` tokens.

    Longest first: each row starts with the longest text left and is topped up with the
    shortest ones that still fit (at most ``max_segments`` texts; 1 gives one row per text,
    in decreasing length, ties in input order). With ``buckets`` a row is only as long as
    the bucket that holds its first text, so short texts fill short rows. Returns the text
    indices of every row; linear time, rows in decreasing order of their first text.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        first = lengths[order[lo]]
        length = bucket(first, buckets) if buckets else row_length
        row, room = [order[lo]], min(length, row_length) - first
        lo += 1
        while lo <= hi and len(row) < max_segments and lengths[order[hi]] <= room:
            row.append(order[hi])
            room -= lengths[order[hi]]
            hi -= 1
        rows.append(row)
    return rows


def fill(
    tokens: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    num_rows: int,
    length: int,
    pad_id: int,
    skip: int = 0,
    hidden: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``(num_rows, length)`` arrays of ``rows`` (indices into ``tokens``), back to back.

    Returns ``(ids, segments, pooled, keys, where)``: token ids (``pad_id`` after the last
    text), segment ids, the segment ids of the tokens to pool (each text's first ``skip``
    tokens, a prompt, are attended to but not pooled), the segment ids of the tokens
    attended to (``segments`` but for each text's last ``hidden[text]`` tokens: ColBERT's
    query expansion, which reads its text but which nothing reads), and ``where``, one
    ``(text, row, segment - 1)`` per placed text: where its pooled embedding lands. Rows
    past ``len(rows)`` are empty.
    """
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {num_rows}")
    ids = np.full((num_rows, length), pad_id, np.int32)
    segments = np.zeros((num_rows, length), np.int32)
    pooled = np.zeros((num_rows, length), np.int32)
    keys = np.zeros((num_rows, length), np.int32)
    where = []
    for r, texts in enumerate(rows):
        at = 0
        for s, i in enumerate(texts, start=1):
            end = at + len(tokens[i])
            if end > length:
                raise ValueError(f"row {r}: its texts take {end} tokens, more than {length}")
            ids[r, at:end] = tokens[i]
            segments[r, at:end] = s
            pooled[r, min(at + skip, end) : end] = s
            keys[r, at : end - (hidden[i] if hidden is not None else 0)] = s
            where.append((i, r, s - 1))
            at = end
    return ids, segments, pooled, keys, np.asarray(where, np.int64).reshape(-1, 3)
