"""Files written whole or not at all, and the switch that keeps Hugging Face libraries offline.

Every file jaxembed writes goes through `atomic_open`: a hidden temporary file beside the
target, flushed to disk and renamed over it on success, removed on failure. A crash or a
bad row then leaves the previous file (or none), never a partial one under the final name.
Folders (a run's model copy, an export, a prepared dataset) follow the same rule one level
up: built as ``.NAME.tmp-PID`` beside the target and renamed into place.

A run folder may also be a bucket (``gs://BUCKET/PATH``, `run_path`): a file there is
uploaded whole once written, a folder has a file whose presence says it is whole
(`upload_dir`), and what only reads local files gets a local copy (`local_copy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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
    if is_url(path):  # an object appears whole when uploaded: upload it once, on success
        path = run_path(path, "file")
        buffer = io.StringIO(newline="\n") if mode == "w" else io.BytesIO()
        yield buffer
        value = buffer.getvalue()
        path.write_bytes(value.encode() if mode == "w" else value)
        return
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


BUCKET_SCHEMES = ("gs",)  # what a run folder may be besides a local path


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def run_path(path: str | os.PathLike, what: str):
    """A run folder (a workdir, a checkpoint, a model folder) as given: a local `Path`, or for
    ``gs://BUCKET/PATH`` an `etils.epath.Path` (pathlib's interface; read and written
    through gcsfs, and by Orbax and TensorStore natively). pathlib itself would fold
    ``gs://b/run`` into a local ``gs:/b/run`` folder: every run path goes through here."""
    text = os.fspath(path)
    if "://" not in text:
        return Path(text)
    scheme = text.split("://")[0]
    if scheme not in BUCKET_SCHEMES:
        raise ValueError(
            f"{what} {text}: {scheme}:// is not supported; use gs://BUCKET/PATH, a local folder "
            "or a mounted one"
        )
    try:
        import gcsfs  # noqa: F401  (epath's gs:// backend without TensorFlow)
    except ImportError:
        raise ValueError(f"{what} {text}: gs:// folders need gcsfs (pip install gcsfs)") from None
    from etils import epath

    return epath.Path(text)


def bucket_cache() -> Path:
    """Where local copies of bucket folders live (`local_copy`)."""
    return Path(os.environ.get("JAXEMBED_BUCKET_CACHE", Path.home() / ".cache/jaxembed/buckets"))


def local_copy(folder) -> Path:
    """``folder`` itself when local; a bucket folder (a run's model files: config, tokenizer)
    downloaded once, for the libraries that read only local files (transformers), to
    ``bucket_cache()/BUCKET/PATH/<digest of its listing>``: a changed folder gets a new copy,
    and processes on one host that race to make the same copy keep the first."""
    if not is_url(folder):
        return Path(folder)
    files = _files_under(folder)
    listing = [(str(f), st.length, st.mtime) for f in files for st in [f.stat()]]
    digest = hashlib.blake2b(repr(listing).encode(), digest_size=8).hexdigest()
    target = bucket_cache() / os.fspath(folder).split("://", 1)[1] / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for f in files:
            dst = tmp / os.fspath(f)[len(os.fspath(folder)) :].lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
        tmp.mkdir(exist_ok=True)  # an empty folder is copied too
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise  # not another process's copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _files_under(folder) -> list:
    """Every file below ``folder``, sorted (a walk: epath refuses ``**`` on a bucket)."""
    out = []
    for entry in folder.iterdir():
        out += _files_under(entry) if entry.is_dir() else [entry]
    return sorted(out, key=os.fspath)


def upload_dir(local: Path, folder, last: str = "") -> None:
    """Copies a local folder's files into the bucket folder ``folder``, ``last`` (the file
    whose presence says the folder is whole, e.g. ``config.json``) after all the others: an
    object store has no folder rename, so a reader checks that file."""
    files = sorted((f for f in local.rglob("*") if f.is_file()), key=lambda f: f.name == last)
    for f in files:
        (folder / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())
