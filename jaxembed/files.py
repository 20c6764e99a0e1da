"""Files written whole or not at all, and the switch that keeps Hugging Face libraries offline.

Every file jaxembed writes goes through `atomic_open`: a hidden temporary file beside the
target, flushed to disk and renamed over it on success, removed on failure. A crash or a
bad row then leaves the previous file (or none), never a partial one under the final name.
Folders (a run's model copy, an export, a prepared dataset) follow the same rule one level
up: built as ``.NAME.tmp-PID`` beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

HF_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``open(path, mode)`` ("w" text, UTF-8, or "wb") that replaces ``path`` only on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer, so two processes writing the same target never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    text = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
    try:
        with open(tmp, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A folder built as ``.NAME.tmp-PID`` beside ``path`` and renamed to ``path`` on success.

    An existing ``path`` is replaced (the caller decides whether it may be: empty, or an
    ``--overwrite``); it is set aside before the rename, so a failed rename keeps it. On
    failure the half-built folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crashed run with our pid
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """One JSON object per line (UTF-8, not ASCII-escaped), atomically; returns the count."""
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def hf_offline() -> None:
    """Local files only: transformers, datasets and the hub client never reach the network.

    Set unless the user set them; there is no model hub on the machines we target, and a
    library that tries one waits for a timeout before falling back to the local folder.
    """
    for var in HF_OFFLINE_VARS:
        os.environ.setdefault(var, "1")


def mount_type(path: str | os.PathLike, mounts: str | None = None) -> str:
    """The file system type of the mount holding ``path`` (``/proc/self/mounts``, or the
    ``mounts`` text given): e.g. "fuse.gcsfuse" for a bucket mounted by gcsfuse; "" when
    unknown (no /proc)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return ""
    where = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_local_path(path: str | os.PathLike, what: str) -> None:
    """A bucket URL is not a path here: `pathlib` would fold ``gs://b/run`` into a local
    ``gs:/b/run`` folder and write there. One line naming what to do instead."""
    text = os.fspath(path)
    if "://" in text:
        scheme = text.split("://")[0]
        raise ValueError(
            f"{what} {text}: {scheme}:// URLs are not read or written directly; mount the "
            "bucket (gcsfuse: launch/tpu_vm.sh --mount BUCKET) and pass the mounted folder "
            "(checkpoints there are committed without directory renames)"
        )
