"""Embeddings on disk in fixed-size shards, so a long encoding job survives an interruption.

A folder holds ``manifest.json`` and ``shard_000000.npy``, ``shard_000001.npy``, ...: float32
``(rows, dim)`` arrays of ``shard_size`` rows (the last one shorter), each written atomically
(`jaxembed.files.atomic_open`), so a shard on disk is always whole. The manifest records what
the shards are embeddings *of*: the model (its path and a fingerprint of its files), dtype,
max length, pooling, and a hash of every (prompt, text) pair. When any of it changes the old
shards are deleted (and a log line names what changed); otherwise the shards already there
are reused and only the missing ones are encoded. Readers get the shards memory-mapped, so
nothing needs the whole matrix in memory.

Multi-host: every process encodes (its encoder splits each batch over all hosts' devices)
and receives every embedding; process 0 alone writes, so the folder must be on storage all
hosts share (checked), and a shard counts as cached only when every host can read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxembed import distributed, search
from jaxembed.files import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

VERSION = 1  # of the folder layout: a cache written by another version is re-encoded


def texts_sha256(texts: Sequence[str], prompts: Sequence[str]) -> str:
    """One hash of every (prompt, text) pair, length-prefixed so no two lists collide."""
    h = hashlib.sha256()
    for p, t in zip(prompts, texts, strict=True):
        for s in (p, t):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def model_fingerprint(path: str | os.PathLike) -> str:
    """A hash of the names, sizes and modification times of the files under ``path``.

    It changes when the weights are rewritten or a training run saves a newer checkpoint,
    so a cache written for other weights at the same path is not reused.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encoder_key(encoder, dtype: str) -> dict:
    """What about ``encoder`` decides its embeddings: the manifest's key for `encode_cached`.

    ``dtype`` stands in for an encoder that does not report its own.
    """
    return {
        "model": encoder.name,
        "model_fingerprint": model_fingerprint(encoder.name) if encoder.name else "",
        "dtype": str(getattr(encoder, "dtype", dtype)),
        "max_length": int(encoder.max_length),
        "pooling": encoder.pooling,
    }


def encode_cached(
    encoder,
    texts: Sequence[str],
    prompts: Sequence[str],
    folder: Path,
    key: dict,
    *,
    shard_size: int,
    batch_size: int,
    desc: str,
    progress: bool = True,
    query: bool = False,
) -> tuple[list[np.ndarray], dict]:
    """Embeddings of ``texts`` (each read with its prompt) as shards cached in ``folder``:
    what the search scores (`Encoder.encode_for_search`; ``query``: the texts are queries).

    Returns ``(shards, info)``: ``(rows, dim)`` float32 arrays in order (a multi-vector
    model's ``(rows, tokens, dim)``, `Encoder.row_shape`) (memory-mapped,
    but for those a process other than 0 just encoded: it does not write), and
    ``{"shards", "encoded", "reused", "encoded_rows", "seconds"}``.
    ``key`` (e.g. `encoder_key`) goes into the manifest with the texts' hash: see the
    module docstring for when the folder's shards are reused.
    """
    n, shape = len(texts), tuple(encoder.row_shape(query))
    writer = jax.process_index() == 0
    manifest = {
        "version": VERSION,
        **key,
        "texts_sha256": texts_sha256(texts, prompts),
        "count": n,
        "shard_size": int(shard_size),
        "dim": shape[-1],
    }
    if len(shape) > 1:  # a multi-vector model's tokens per text (absent: one vector)
        manifest["tokens"] = shape[0]
    _open_folder(folder, manifest, writer)
    rows = [min(shard_size, n - lo) for lo in range(0, n, shard_size)]
    paths = [folder / f"shard_{s:06d}.npy" for s in range(len(rows))]
    shards = _cached_shards(paths, rows, shape)
    todo = [s for s, a in enumerate(shards) if a is None]
    if len(todo) < len(rows):
        log.info(
            "cache %s: %d of %d %s shard(s) already encoded",
            folder, len(rows) - len(todo), len(rows), desc,
        )  # fmt: skip
    todo_rows = sum(rows[s] for s in todo)
    seconds = 0.0
    with _progress_bar(todo_rows, desc, progress and writer) as bar:
        for s in todo:
            lo = s * shard_size
            t0 = time.perf_counter()
            emb = _encode_rows(encoder, texts, prompts, (lo, lo + rows[s]), shape, batch_size,
                               bar, query)  # fmt: skip
            seconds += time.perf_counter() - t0
            if not np.isfinite(emb).all():
                bad = lo + int(np.flatnonzero(~np.isfinite(emb.reshape(len(emb), -1)).all(1))[0])
                raise FloatingPointError(f"encoding the {desc}: non-finite embedding (row {bad})")
            shards[s] = write_shard(paths[s], emb) if writer else emb
    info = {
        "shards": len(rows),
        "encoded": len(todo),
        "reused": len(rows) - len(todo),
        "encoded_rows": todo_rows,
        "seconds": seconds,
    }
    return shards, info


def write_shard(path: Path, emb: np.ndarray) -> np.ndarray:
    """Writes one shard whole or not at all, and hands it back memory-mapped.

    Once it returns, the shard survives an interruption: this is the unit of resumption.
    """
    with atomic_open(path, "wb") as f:
        np.save(f, emb)
    return np.load(path, mmap_mode="r")


def gather(shards: Sequence[np.ndarray], shard_size: int, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (global) of the concatenated shards, touching only the shards they are in."""
    idx = np.asarray(idx, np.int64)
    shape = shards[0].shape[1:] if shards else (0,)
    out = np.empty((len(idx), *shape), np.float32)
    for s in np.unique(idx // shard_size):
        sel = np.flatnonzero(idx // shard_size == s)
        out[sel] = shards[int(s)][idx[sel] - int(s) * shard_size]
    return out


def _open_folder(folder: Path, manifest: dict, writer: bool) -> None:
    """Makes ``folder`` the home of ``manifest``'s shards: stale shards are deleted first.

    Shards of other texts or another model must never be mixed with new ones, and a
    manifest that cannot be read is as good as a different one.
    """
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    distributed.barrier("embedding cache folder")
    distributed.check_shared_dir(folder)
    mpath = folder / "manifest.json"
    old = None
    if writer and mpath.exists():
        try:
            old = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
    if writer and old != manifest:
        if old is not None:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            log.info("cache %s is stale (changed: %s): re-encoding", folder, ", ".join(changed))
        for f in folder.glob("shard_*.npy"):
            f.unlink()
        atomic_write_text(mpath, json.dumps(manifest, indent=1, sort_keys=True))
    distributed.barrier("embedding cache manifest")


def _cached_shards(paths: Sequence[Path], rows: Sequence[int], shape: tuple) -> list:
    """The shards already on disk (memory-mapped), None for each one to encode.

    A shard of the wrong shape or dtype is one a crash or another writer left behind: it
    is encoded again. So is one any host cannot read, so that all hosts encode the same rest.
    """

    def load(path: Path, n_rows: int) -> np.ndarray | None:
        if not path.exists():
            return None
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        return arr if arr.shape == (n_rows, *shape) and arr.dtype == np.float32 else None

    present = [load(p, r) for p, r in zip(paths, rows, strict=True)]
    readable = distributed.gather(np.array([a is not None for a in present], bool)).all(0)
    return [a if ok else None for a, ok in zip(present, readable, strict=True)]


def _encode_rows(encoder, texts, prompts, span, shape, batch_size: int, bar, query: bool):
    """Embeddings of ``texts[lo:hi]``, in calls of a few thousand texts, one per prompt.

    Sub-batches keep the progress bar moving; the encoder sorts texts by length within each
    call, so calls of a few thousand texts waste little padding. Grouping by prompt lets
    the encoder skip the prompt tokens when pooling, once per call.
    """
    lo, hi = span
    out = np.empty((hi - lo, *shape), np.float32)
    chunk = max(batch_size * 32, 1024)
    for c in range(lo, hi, chunk):
        c_hi = min(hi, c + chunk)
        by_prompt: dict[str, list[int]] = {}
        for j in range(c, c_hi):
            by_prompt.setdefault(prompts[j], []).append(j)
        for prompt, idx in by_prompt.items():
            emb = encoder.encode_for_search(
                [texts[j] for j in idx], prompt, query=query, batch_size=batch_size
            )
            if len(shape) > 1:  # token vectors: every row as wide as the longest allowed
                emb = search.widen(emb, shape[0], query)
            out[np.asarray(idx) - lo] = emb
        bar.update(c_hi - c)
    return out


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm  # installed with transformers

    return tqdm(
        total=total,
        desc=f"encode {desc}",
        unit="doc" if desc == "corpus" else "query",
        file=sys.stderr,
        disable=not enabled or total == 0,
        mininterval=1.0,
    )
