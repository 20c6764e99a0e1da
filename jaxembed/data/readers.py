"""Random-access record sources over JSONL, Parquet and TFDS/ArrayRecord, ready for Grain.

``open_source(path)`` returns a `RecordSource`: ``len(src)`` records, ``src[i]`` the i-th
one as a validated dict of the `jaxembed.data.records` schema, in any order. A source holds
one dataset and one task (a global batch is drawn from one dataset), so the attributes
``src.name`` and ``src.task`` describe every record, and a file that mixes them is refused
with the file and the first conflicting line.

Sources follow Grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``,
``__repr__`` for checkpointing) and pickle to a few paths and offsets: open file handles,
Arrow tables and TFDS readers are dropped on pickling and reopened lazily in each Grain
worker process.

Formats, chosen by the path:

* ``*.jsonl``: one JSON record per line. Opening validates every line once (a file over
  `PARALLEL_BYTES` in several processes, one per part, as many as the host has cores) and
  keeps only the byte offset and length of each good line; ``src[i]`` reads that line back with
  ``os.pread`` (no shared file position, so threads may read concurrently). Blank lines
  are ignored.
* ``*.jsonl.gz``: gzip has no random access, so the validated records are kept decoded in
  memory (and travel to each Grain worker when the source is pickled). For corpora too
  large for that, convert them once with ``python -m jaxembed.data.prepare``.
* ``*.parquet`` in F2LLM's layout: columns ``query``, ``passage``, ``negative_1`` ..
  ``negative_N`` and optionally ``task``, ``dataset``, ``instruction``, ``scores`` (a list
  column: the teacher scores of the positive and each negative). Random access reads the
  needed columns from the open cache's uncompressed Arrow copy, memory-mapped (pyarrow's
  default row groups are too large to decode one per access); with the cache off, they
  are loaded into each process's memory. ``passage`` becomes ``positive``; negatives keep
  column order, with null or empty trailing negatives dropped. Errors name ``file:row N``,
  N counted from 0, and the schema's field names (``positive`` for the ``passage`` column).
* a directory holding ``dataset_info.json``: a TFDS dataset of ArrayRecord files as written
  by `jaxembed.data.prepare`, read with ``tfds.builder_from_directory(dir).as_data_source``,
  which needs no TensorFlow. Its records were validated when it was written, and its task
  and dataset come from its ``metadata.json``; other TFDS directories with the same
  features get one validating pass at open instead. Errors name ``dir:record N``.
* a Hugging Face ``datasets`` folder (``save_to_disk``: ``state.json`` and Arrow files, or
  a DatasetDict's ``dataset_dict.json``, whose ``train`` split is read), read as Arrow
  like Parquet, without the ``datasets`` package.

What an open learns is kept for the next (`open_cache`): the line index of a JSONL file,
the validation's outcome of any file, and for Parquet the needed columns as an
uncompressed Arrow file that every process memory-maps (the OS shares its pages between
Grain workers and evicts them under pressure, where an in-memory table was one private
copy per process). An entry is keyed by the file's resolved path, inode, size,
modification and change times and by how it is read (``columns``, ``task``, ``dataset``,
``skip_bad``), so a changed file is validated again; a resumed run reopens its data
without reading it. Entries live under ``$JAXEMBED_DATA_CACHE`` (default
``~/.cache/jaxembed/data``; ``off`` disables the cache) and may be deleted at any time.

Column names: besides the schema's own, sentence-transformers' (``anchor``, ``positive``,
``negative`` or ``negative_1..N``) and F2LLM's (``passage``) are understood, and
``columns`` (the config's ``data.columns``) renames others (`records.normalise`). A JSONL
record without ``task`` is a retrieval pair and its dataset is the file's name, as for
Parquet.

``task`` and ``dataset`` given to `open_source` fill in records that lack those fields
(F2LLM files carry neither); a record's own value wins. With ``skip_bad=True`` a record
that breaks the schema is skipped and counted in ``src.skipped`` (logged once at open)
instead of raising; a file that mixes tasks or datasets is refused either way, since that
is a mistake in how the data was assembled, not one bad line.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import itertools
import json
import logging
import operator
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxembed.data.records import RecordError, check_record, normalise

log = logging.getLogger(__name__)

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
TFDS_MARKER = "dataset_info.json"
NEGATIVE_COLUMN = re.compile(r"negative_(\d+)")


class _Conflict(RecordError):
    """A record whose task or dataset differs from the first record's. It carries the record
    and where it is, so parallel validation can name it as one pass would."""

    def __str__(self) -> str:
        return self.args[0]


CACHE_ENV = "JAXEMBED_DATA_CACHE"
CACHE_VERSION = 2  # bump when what an entry holds changes
CACHE_META = "meta.json"


def cache_root() -> Path | None:
    """Where open caches live (``$JAXEMBED_DATA_CACHE``, ``off``: nowhere)."""
    value = os.environ.get(CACHE_ENV, "")
    if value == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "jaxembed" / "data"


def open_cache(path: Path, how: dict) -> Path | None:
    """The cache entry of ``path`` read ``how`` (its folder, complete or not yet written),
    or None when caching is off. Keyed by the file's identity (resolved path, inode, size,
    modification and change times) and ``how``: a file changed in any way gets a new entry.
    (A change to how records are validated bumps `CACHE_VERSION`.)"""
    root = cache_root()
    if root is None:
        return None
    st = path.stat()
    # ctime too: a file rewritten at the same size with its mtime restored (cp -p, tar, touch
    # -r) has a new ctime, which no user can set.
    ident = [CACHE_VERSION, str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns,
             st.st_ctime_ns, how]  # fmt: skip
    digest = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=10)
    return root / f"{path.name}-{digest.hexdigest()}"


class RecordSource:
    """Random access to the validated records of one file or TFDS directory.

    Attributes:
      path: the file or directory read.
      name: the dataset name shared by every record.
      task: the task shared by every record (one of `jaxembed.choices.TASKS`).
      skipped: bad records skipped at open (only with ``skip_bad=True``).
    """

    path: Path
    name: str
    task: str
    skipped: int

    def __init__(
        self,
        path: Path,
        task: str | None,
        dataset: str | None,
        skip_bad: bool,
        columns: dict[str, str] | None = None,
    ):
        self.path = path
        self._columns_map = dict(columns or {})
        self._default_task = task
        self._default_dataset = dataset
        self._skip_bad = skip_bad
        self.name = ""
        self.task = ""
        self.skipped = 0
        self._first_where = ""
        self._first_error = ""

    # --- Grain's random-access protocol ---------------------------------------------------

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: index {index} out of range for {n} records")
        return self._get(i)

    def get_many(self, indices) -> list[dict]:
        """``[self[i] for i in indices]``; a format that reads a batch faster than one record
        at a time (TFDS / ArrayRecord) overrides it."""
        return [self[int(i)] for i in indices]

    def __repr__(self) -> str:
        # Grain's checkpointing compares reprs, so they identify the data, not the object.
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, name={self.name!r}, "
            f"task={self.task!r}, len={len(self)}, skipped={self.skipped})"
        )

    def _get(self, i: int) -> dict:
        raise NotImplementedError

    # --- shared by the readers -------------------------------------------------------------

    def _fill(self, obj: Any) -> Any:
        """The row in the schema's names (`records.normalise`), a missing (absent or null)
        task / dataset filled from the defaults given at open."""
        obj = normalise(obj, self._columns_map)
        if isinstance(obj, dict):
            if obj.get("task") is None and self._default_task is not None:
                obj["task"] = self._default_task
            if obj.get("dataset") is None and self._default_dataset is not None:
                obj["dataset"] = self._default_dataset
        return obj

    def _admit(self, make: Any, where: str) -> dict | None:
        """Builds and validates one record at open; None when it is bad and skipped.

        Args:
          make: a callable returning the record (so decode errors count as bad records too).
          where: ``file:line`` for messages.
        """
        try:
            record = check_record(self._fill(make()), where)
        except RecordError as e:
            if not self._skip_bad:
                raise
            if not self.skipped:
                self._first_error = str(e)
            self.skipped += 1
            return None
        self._agree(record, where)
        return record

    def _agree(self, record: dict, where: str) -> None:
        """Raises unless ``record`` has the task and dataset of the source's first record."""
        if not self._first_where:
            self.task, self.name, self._first_where = record["task"], record["dataset"], where
            return
        for key, have in (("task", self.task), ("dataset", self.name)):
            if record[key] != have:
                raise _Conflict(
                    f"{where}: {key} {record[key]!r} differs from {have!r} at "
                    f"{self._first_where}; every record of one source must share one task "
                    "and one dataset (split the file)",
                    {"task": record["task"], "dataset": record["dataset"]},
                    where,
                )

    def _opened(self) -> None:
        """Reports skipped records once; an empty source takes task and name from the defaults."""
        if self.skipped:
            log.warning(
                "%s: skipped %d bad record(s) (skip_bad=True); first: %s",
                self.path,
                self.skipped,
                self._first_error,
            )
        if not self._first_where:
            # No record to take them from: keep the defaults (or ''), so an empty file can
            # still be listed and the caller decides whether empty is fine.
            self.task = self._default_task or ""
            self.name = self._default_dataset or ""

    # --- validation in several processes --------------------------------------------------

    def _outcome(self) -> dict:
        """What a worker of a parallel validation reports besides its format's arrays."""
        keys = ("skipped", "_first_error", "_first_where", "task", "name")
        return {key: getattr(self, key) for key in keys}

    def _join(self, parts: list[dict]) -> None:
        """Takes in the workers' outcomes in file order, as one pass would have met them:
        the first bad record is the one raised, a task / dataset conflict is named against
        the file's first record, and skipped records add up."""
        for part in parts:
            if part["_first_where"]:  # the part's first good record, before its error if any
                self._agree({"task": part["task"], "dataset": part["name"]}, part["_first_where"])
            error = part["error"]
            if isinstance(error, _Conflict):  # named against the file's first record
                self._agree(*error.args[1:])
            if error is not None:
                raise error
            if part["skipped"] and not self.skipped:
                self._first_error = part["_first_error"]
            self.skipped += part["skipped"]

    # --- the open cache (`open_cache`) ----------------------------------------------------

    def _cache_entry(self) -> Path | None:
        how = {
            "kind": type(self).__name__,
            "columns": sorted(self._columns_map.items()),
            "task": self._default_task,
            "dataset": self._default_dataset,
            "skip_bad": self._skip_bad,
        }
        try:
            return open_cache(self.path, how)
        except OSError:  # the file vanished between expand and now: the open will say so
            return None

    CACHED_ARRAYS: tuple[str, ...] = ()  # what a complete entry of this source holds

    def _from_cache(self) -> dict | None:
        """The arrays of this file's complete cache entry (memory-mapped), its meta applied;
        None: no entry, or a damaged one (removed; the caller reads the file)."""
        entry = self._cache
        if entry is None or not (entry / CACHE_META).is_file():
            return None
        try:
            meta = json.loads((entry / CACHE_META).read_text())
            arrays = {
                name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]
            }
            if not set(self.CACHED_ARRAYS) <= set(arrays):
                raise KeyError(f"{sorted(set(self.CACHED_ARRAYS) - set(arrays))} missing")
        except (OSError, ValueError, KeyError, EOFError) as e:
            log.warning("%s: open cache entry %s unreadable (%s); reading the file", self.path,
                        entry, e)  # fmt: skip
            shutil.rmtree(entry, ignore_errors=True)
            return None
        for key in ("name", "task", "skipped", "_first_where", "_first_error"):
            setattr(self, key, meta[key])
        return arrays

    def _to_cache(self, arrays: dict[str, np.ndarray], write=None) -> None:
        """Writes the cache entry (arrays, ``write(folder)`` for more files, then the meta),
        each file flushed to disk, in a folder of its own renamed into place: an entry is
        whole or absent. Another process's entry, written meanwhile, is kept. A cache that
        cannot be written is logged and the source works without it."""
        if self._cache is None:
            return
        meta = {k: getattr(self, k) for k in ("name", "task", "skipped", "_first_where")}
        meta |= {"_first_error": self._first_error, "arrays": sorted(arrays)}
        tmp = self._cache.with_name(f".{self._cache.name}.{uuid.uuid4().hex}")
        try:
            tmp.mkdir(parents=True)
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
            if write is not None:
                write(tmp)
            (tmp / CACHE_META).write_text(json.dumps(meta))
            for f in tmp.iterdir():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            try:
                tmp.rename(self._cache)
            except OSError:
                if not (self._cache / CACHE_META).is_file():
                    raise  # not another writer's entry: a real failure
        except OSError as e:
            log.warning("%s: open cache not written (%s); set %s=off", self.path, e, CACHE_ENV)
            self._cache = None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._unpicklable():
            state[key] = None
        return state

    def _unpicklable(self) -> tuple[str, ...]:
        return ()


# --- JSONL -----------------------------------------------------------------------------------


def _decode_line(raw: bytes, where: str) -> Any:
    """Strict UTF-8 then JSON, so either failure can name the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None


PARALLEL_BYTES = 256 << 20  # a plain JSONL file is validated by one process per this much
PARALLEL_ROWS = 1 << 19  # a Parquet or Arrow file is validated by one process per this many rows
ONE_PROCESS = "{}: validated in one process"  # logged when worker processes cannot start


def _parallel_workers(parts: int) -> int:
    """Processes to validate a file of ``parts`` parts with: 1 in a daemon process (a Grain
    worker, which may not start children), else one per part, up to the usable cores."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return 1
    return max(1, min(_usable_cores(), parts))


def _own_parts(path: Path) -> int:
    """The parts a record file is validated in, cores permitting: one per `PARALLEL_BYTES`
    of a plain JSONL file, one per `PARALLEL_ROWS` of a Parquet file's rows (whole row
    groups: a file of one row group is one part)."""
    if path.name.endswith(".parquet"):
        try:
            return _row_parts(_parquet_group_rows(path))
        except (OSError, ValueError):  # not Parquet: its open says so
            return 1
    return path.stat().st_size // PARALLEL_BYTES


def _row_parts(group_rows: list[int]) -> int:
    """The parts a file of row groups (rows each) is validated in: one per `PARALLEL_ROWS`,
    whole groups only."""
    return min(sum(1 for r in group_rows if r), sum(group_rows) // PARALLEL_ROWS)


def _usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def _in_processes(fn, jobs: list, workers: int, instead: str) -> list | None:
    """``[fn(job) for job in jobs]`` in ``workers`` processes, in job order; None when
    processes cannot start (a script opening data at import time, outside ``if __name__ ==
    "__main__"``): ``instead`` is logged and the caller works in this process."""
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: the parent may run JAX's threads, which a fork must not copy.
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(fn, jobs))
    except (RuntimeError, concurrent.futures.process.BrokenProcessPool) as e:
        log.warning("%s (%s)", instead, e)
        return None


def _validate_part(job: tuple) -> dict:
    """A worker of a parallel validation: ``source.<method>(*args)`` on the source as it was
    pickled before validating, its format's arrays and `RecordSource._outcome`; a record
    error is returned, for `RecordSource._join` to raise after the parts before it."""
    source, method, args = job
    arrays, error = {}, None
    try:
        arrays = getattr(source, method)(*args)
    except RecordError as e:
        error = e
    return {**arrays, **source._outcome(), "error": error}


def _line_ranges(path: Path, parts: int) -> list[tuple[int, int, int]]:
    """``parts`` byte ranges of ``path`` that start and end at line boundaries:
    ``(start, end, number of the first line)``."""
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        cuts = [0]
        for k in range(1, parts):
            at = m.find(b"\n", max(k * size // parts, cuts[-1]))
            if at < 0:
                break
            cuts.append(at + 1)
        cuts = sorted({*cuts, size})
    # Line numbers by reading, 16 MB at a time: counting through the map would leave the
    # whole file's pages in this process's resident set.
    ranges, line = [], 1
    with open(path, "rb") as f:
        for start, end in itertools.pairwise(cuts):
            ranges.append((start, end, line))
            while f.tell() < end:
                line += f.read(min(16 << 20, end - f.tell())).count(b"\n")
    return ranges


class JsonlSource(RecordSource):
    """A JSONL file: plain (lines read back by byte offset) or gzipped (records in memory)."""

    CACHED_ARRAYS = ("offsets", "lengths")

    def __init__(self, path: Path, task=None, dataset=None, skip_bad=False, columns=None):
        # As for Parquet: a record without a task is a retrieval pair; the file is the dataset.
        stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
        super().__init__(path, task or "retrieval", dataset or stem, skip_bad, columns)
        self._gzip = path.name.endswith(".gz")
        self._records: list[dict] | None = [] if self._gzip else None
        self._fd: int | None = None
        # gzip keeps its records in memory: nothing an index could save.
        self._cache = None if self._gzip else self._cache_entry()
        self._index = self._from_cache()
        if self._index is None:
            self._read_lines()
        self._opened()

    def _read_lines(self) -> None:
        """Validates every line once, keeping the offset and length of each good one: in
        one process, or for a large plain file in several (`PARALLEL_BYTES` each)."""
        workers = 1 if self._gzip else _parallel_workers(_own_parts(self.path))
        offsets = None
        if workers > 1:
            offsets, lengths = self._read_in_parallel(workers)
        if offsets is None:
            offsets, lengths = self._scan(self._lines())
        self._index = {"offsets": offsets, "lengths": lengths}
        if not self._gzip:
            self._to_cache(self._index)

    def _scan(self, lines: Iterable[tuple[int, int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """Admits each line of ``lines`` ((line number, byte offset, bytes)); the offsets
        and lengths of the good ones (gzip: the records kept)."""
        offsets: list[int] = []
        lengths: list[int] = []
        for lineno, offset, raw in lines:
            if not raw.strip():
                continue
            where = f"{self.path}:{lineno}"
            record = self._admit(functools.partial(_decode_line, raw, where), where)
            if record is None:
                continue
            if self._gzip:
                self._records.append(record)
            else:
                offsets.append(offset)
                lengths.append(len(raw))
        return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)

    def _read_in_parallel(self, workers: int):
        """`_scan` over byte ranges split at line ends, one process each; the parts are
        joined in file order, so errors and the task / dataset check read as in one pass."""
        jobs = [(self, "_scan_range", r) for r in _line_ranges(self.path, workers)]
        parts = _in_processes(_validate_part, jobs, len(jobs), ONE_PROCESS.format(self.path))
        if parts is None:
            return None, None
        self._join(parts)
        return (
            np.concatenate([p["offsets"] for p in parts]),
            np.concatenate([p["lengths"] for p in parts]),
        )

    def _scan_range(self, start: int, end: int, first_line: int) -> dict[str, np.ndarray]:
        """A worker's part of `_read_in_parallel`: the lines in bytes [start, end)."""

        def lines():
            offset, lineno = start, first_line
            with open(self.path, "rb") as f:
                f.seek(start)
                while offset < end:
                    line = f.readline()
                    if not line:
                        break
                    yield lineno, offset, line.rstrip(b"\r\n")
                    offset += len(line)
                    lineno += 1

        offsets, lengths = self._scan(lines())
        return {"offsets": offsets, "lengths": lengths}

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        """Yields (1-based line number, byte offset, line without its newline)."""
        opener = gzip.open if self._gzip else open
        offset = 0
        with opener(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, offset, line.rstrip(b"\r\n")
                offset += len(line)

    def __len__(self) -> int:
        return len(self._records) if self._gzip else len(self._lines_index()["offsets"])

    def _lines_index(self) -> dict[str, np.ndarray]:
        """The offsets and lengths: in memory, or (in a worker) mapped from the cache."""
        if self._index is None:
            self._index = self._from_cache()
        if self._index is None:  # its cache entry was deleted since the open: read again
            self.skipped = 0
            self._read_lines()
        return self._index

    def _get(self, i: int) -> dict:
        if self._gzip:
            record = self._records[i]
            return dict(record, negatives=list(record["negatives"]))
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        index = self._lines_index()
        offset, length = int(index["offsets"][i]), int(index["lengths"][i])
        raw = os.pread(self._fd, length, offset)
        # Validated at open; failing now means the file changed underneath us.
        where = f"{self.path}: record {i} at byte {offset} (changed since open?)"
        return check_record(self._fill(_decode_line(raw, where)), where)

    def _unpicklable(self) -> tuple[str, ...]:
        # With a cache entry, workers map the index from it rather than receive a copy.
        return ("_fd", "_index") if self._cache is not None else ("_fd",)

    def __del__(self, close=os.close):  # bound now: at interpreter exit `os` may be gone
        if getattr(self, "_fd", None) is not None:
            close(self._fd)


# --- Parquet (F2LLM layout) ------------------------------------------------------------------


class ParquetSource(RecordSource):
    """A Parquet file in F2LLM's layout, its needed columns held as an Arrow table."""

    def __init__(self, path: Path, task=None, dataset=None, skip_bad=False, columns=None):
        # F2LLM files carry neither task nor dataset: the file is the dataset.
        super().__init__(
            path, task or "retrieval", dataset or path.name[: -len(".parquet")], skip_bad, columns
        )
        names = self._schema_names()
        # Which columns hold which field: the config's renames, then the known aliases.
        field = {n: normalise({n: ""}, self._columns_map).popitem()[0] for n in names}
        for want in ("query", "positive"):
            if want not in field.values():
                raise RecordError(
                    f"{path}: no {want} column; expected F2LLM's layout (query, passage, "
                    "negative_1..negative_N), sentence-transformers' (anchor, positive, "
                    f"negative...) or config.data.columns naming it; found {names}"
                )
        known = ("query", "positive", "negatives", "task", "dataset", "instruction", "scores")
        self._columns = [n for n in names if field[n] in known]
        self._table = None
        self._cache = self._cache_entry()
        cached = self._from_cache()
        if cached is None:
            self._validate()
        else:
            self._num_rows = int(cached["num_rows"])
            self._rows = cached.get("rows")
        self._opened()

    def _validate(self) -> None:
        """Reads every row once, a batch at a time (memory bounded by a batch, not by the
        file), in one process or, for a large file, one per span of whole row groups
        (`_spans`), joined in file order as one pass would be. The same batches, written as
        they are checked, become the cache's Arrow copy of the needed columns (a file per
        span), memory-mapped by every later read: one decode of the file in all."""
        import pyarrow as pa

        spans = self._spans()
        copies = [None] * len(spans)  # beside the entry until the entry is whole
        if self._cache is not None and self.COPY_TABLE:
            stem = f".{self._cache.name}.{uuid.uuid4().hex}"
            copies = [self._cache.with_name(f"{stem}.{k}.arrow") for k in range(len(spans))]
        try:
            parts = None
            if len(spans) > 1:
                pairs = zip(spans, copies, strict=True)
                jobs = [(self, "_check_rows", (*span, copy)) for span, copy in pairs]
                parts = _in_processes(
                    _validate_part, jobs, len(jobs), ONE_PROCESS.format(self.path)
                )
                if parts is not None:
                    self._join(parts)
            if parts is None:  # one pass, into one copy
                parts = [self._check_rows(0, None, copies[0])]
            rows = sum(p["rows"] for p in parts)
            self._rows = _kept(rows, [row for p in parts for row in p["bad"]])
            self._num_rows = rows
            arrays = {"num_rows": np.asarray(rows)}
            if self._rows is not None:
                arrays["rows"] = self._rows
            written = copies[0] is not None and all(p["wrote"] for p in parts)
            used = copies[: len(parts)]
            self._to_cache(arrays, _move_into(used, self.TABLE_FILES) if written else None)
        finally:
            for copy in copies:
                if copy is not None:
                    copy.unlink(missing_ok=True)
        pa.default_memory_pool().release_unused()  # the decoded batches' memory, back to the OS

    def _check_rows(self, first_row: int, groups: list[int] | None, copy: Path | None) -> dict:
        """Validates the rows of ``groups`` (None: all), the first being row ``first_row`` of
        the file, writing them to the Arrow file ``copy`` (None: nowhere); the rows read,
        the bad ones, and whether ``copy`` is whole."""
        bad, row = [], first_row
        with _ArrowWriter(copy) as writer:
            for batch in self._batches(groups):
                for values in batch.to_pylist():
                    where = f"{self.path}:row {row}"
                    if self._admit(functools.partial(self._to_record, values), where) is None:
                        bad.append(row)
                    row += 1
                writer.write(batch)
        return {"rows": row - first_row, "bad": bad, "wrote": writer.wrote}

    def _spans(self) -> list[tuple[int, list[int] | None]]:
        """``(first row, row groups)`` of each process's part: contiguous row groups of
        about equal rows, one span a core for a file of `PARALLEL_ROWS` or more a core;
        ``[(0, None)]`` (the whole file, one pass) otherwise."""
        rows = self._group_rows()
        total = sum(rows)
        workers = _parallel_workers(_row_parts(rows))
        if workers < 2:
            return [(0, None)]
        ends = np.cumsum(rows)
        cuts = {int(np.searchsorted(ends, total * k / workers)) + 1 for k in range(1, workers)}
        bounds = sorted({0, *cuts, len(rows)})
        return [
            (int(ends[start - 1]) if start else 0, list(range(start, end)))
            for start, end in itertools.pairwise(bounds)
        ]

    CACHED_ARRAYS = ("num_rows",)
    COPY_TABLE = True  # Parquet is compressed: keep an uncompressed Arrow copy to map
    TABLE_FILES = "table-{:05d}.arrow"  # the copy's files, one per validating process

    def _group_rows(self) -> list[int]:
        return _parquet_group_rows(self.path)

    def _batches(self, groups: list[int] | None = None):
        """The needed columns of row groups ``groups`` (None: all) in record batches of 4096
        rows, decoded one at a time.

        Column chunks are streamed through a 1 MB buffer, not read whole (pyarrow's default
        reads a row group's chunks at once: a 1M-row row group peaked at 607 MB, streamed
        149 MB, and faster: 1.64 -> 1.03 s)."""
        import pyarrow.parquet as pq

        f = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        return f.iter_batches(batch_size=4096, row_groups=groups, columns=self._columns)

    def _schema_names(self) -> list[str]:
        import pyarrow.parquet as pq  # imported here: only Parquet users need pyarrow

        return pq.read_schema(self.path).names

    def _read_table(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = [] if self._cache is None else sorted(self._cache.glob("table-*.arrow"))
        if files:
            # Zero-copy: the table's buffers are the files' pages, shared by every process.
            try:
                table = pa.concat_tables(
                    pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in files
                )
            except (OSError, pa.ArrowInvalid) as e:
                log.warning("%s: the cached Arrow copy is unreadable (%s)", self.path, e)
            else:
                if table.num_rows == self._num_rows:
                    return table
        # No cache: the needed columns in this process's memory.
        return pq.read_table(self.path, columns=self._columns)

    def _load(self):
        if self._table is None:
            self._table = self._read_table()
        return self._table

    def _to_record(self, values: dict) -> dict:
        record = normalise(values, self._columns_map)
        negatives = record.get("negatives") or []
        while negatives and (negatives[-1] is None or not str(negatives[-1]).strip()):
            negatives.pop()
        record["negatives"] = negatives
        for key in ("task", "dataset", "instruction", "scores"):
            if record.get(key) is None:
                record.pop(key, None)
        if "scores" in record:
            record["scores"] = record["scores"][: 1 + len(negatives)]
        return record

    def __len__(self) -> int:
        return self._num_rows - self.skipped

    def _get(self, i: int) -> dict:
        row = i if self._rows is None else int(self._rows[i])
        values = self._load().slice(row, 1).to_pylist()[0]
        return check_record(self._fill(self._to_record(values)), f"{self.path}:row {row}")

    def _unpicklable(self) -> tuple[str, ...]:
        return ("_table",)


class _ArrowWriter:
    """An Arrow IPC file written batch by batch (nothing when ``path`` is None), created at
    the first batch. A write that fails (an unwritable or full cache) is logged and drops
    the copy, never the open: ``wrote`` says whether the file is whole."""

    def __init__(self, path: Path | None):
        self.path, self.wrote, self._file, self._writer = path, False, None, None

    def write(self, batch) -> None:
        if self.path is None:
            return
        import pyarrow as pa

        try:
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = pa.OSFile(str(self.path), "wb")
                self._writer = pa.ipc.new_file(self._file, batch.schema)
            self._writer.write_batch(batch)
            self.wrote = True
        except OSError as e:
            log.warning("%s: open cache's Arrow copy not written (%s)", self.path, e)
            self.__exit__()
            self.path, self.wrote = None, False  # the caller removes what was written

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        writer, file, self._writer, self._file = self._writer, self._file, None, None
        try:
            try:
                if writer is not None:
                    writer.close()
            finally:
                if file is not None:
                    file.close()
        except OSError as e:
            log.warning("%s: open cache's Arrow copy not written (%s)", self.path, e)
            self.wrote = False


def _move_into(files: list[Path], names: str):
    """``write(folder)`` for `RecordSource._to_cache`: moves ``files`` into the entry, the
    k-th named ``names.format(k)``."""

    def write(folder: Path) -> None:
        for k, f in enumerate(files):
            os.replace(f, folder / names.format(k))

    return write


class HfDatasetSource(ParquetSource):
    """A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``; of a ``DatasetDict``, its
    ``train`` split), read as Arrow without the ``datasets`` package. Columns as for Parquet:
    the schema's names, sentence-transformers' or F2LLM's, or ``data.columns`` renames."""

    COPY_TABLE = False  # its Arrow files are mapped where they are; the cache holds the rest

    def _group_rows(self) -> list[int]:
        # Its Arrow files are read in row ranges of PARALLEL_ROWS, as row groups.
        total = self._load().num_rows
        return [min(PARALLEL_ROWS, total - start) for start in range(0, total, PARALLEL_ROWS)]

    def _batches(self, groups: list[int] | None = None):
        table = self._load()
        if groups is not None:
            start = groups[0] * PARALLEL_ROWS
            table = table.slice(start, len(groups) * PARALLEL_ROWS)
        return table.to_batches(max_chunksize=4096)

    def __init__(self, path: Path, task=None, dataset=None, skip_bad=False, columns=None):
        self._arrow_files = _arrow_files(_hf_split(path))
        super().__init__(path, task, dataset or path.name, skip_bad, columns)

    def _cache_entry(self) -> Path | None:
        # A folder's identity is its state file's and its Arrow files'.
        key = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self._arrow_files]
        entry = super()._cache_entry()
        return (
            None
            if entry is None
            else entry.with_name(
                f"{entry.name}-{hashlib.blake2b(repr(key).encode(), digest_size=6).hexdigest()}"
            )
        )

    def _schema_names(self) -> list[str]:
        import pyarrow as pa

        with pa.memory_map(str(self._arrow_files[0])) as f:
            return pa.ipc.open_stream(f).schema.names

    def _read_table(self):
        import pyarrow as pa

        tables = []
        for file in self._arrow_files:
            with pa.memory_map(str(file)) as f:
                tables.append(pa.ipc.open_stream(f).read_all().select(self._columns))
        return pa.concat_tables(tables)


def _hf_split(path: Path) -> Path:
    """The folder holding ``state.json``: ``path``, or a DatasetDict's ``train`` split."""
    if (path / "state.json").is_file():
        return path
    dict_file = path / "dataset_dict.json"
    try:
        splits = json.loads(dict_file.read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{dict_file}: not a datasets dict file ({e!r})") from None
    if "train" in splits:
        return path / "train"
    if len(splits) == 1:
        return path / splits[0]
    raise RecordError(f"{path}: a DatasetDict with no 'train' split and several others: {splits}")


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files a ``save_to_disk`` folder's ``state.json`` lists, in order."""
    state_file = folder / "state.json"
    try:
        files = [folder / f["filename"] for f in json.loads(state_file.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{state_file}: not a datasets state file ({e!r})") from None
    if not files:
        raise RecordError(f"{state_file}: lists no Arrow files (_data_files is empty)")
    return files


def is_hf_dataset_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by ``datasets``' ``save_to_disk`` (a Dataset or DatasetDict)."""
    path = Path(path)
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _parquet_group_rows(path: Path) -> list[int]:
    """The rows of each row group of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    return [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]


def _kept(total: int, bad: list[int]) -> np.ndarray | None:
    """The indices of the good records, or None (position == index) when none was bad."""
    return np.setdiff1d(np.arange(total, dtype=np.int64), bad) if bad else None


# --- TFDS / ArrayRecord ----------------------------------------------------------------------


def _text(value: Any, where: str, key: str) -> str:
    """TFDS hands text back as bytes; decode strictly so a bad record is named."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: field {key!r} is invalid UTF-8 at byte {e.start}") from None


def _from_tfds(example: dict, where: str) -> dict:
    """A TFDS example (bytes, lists or arrays of bytes) as a schema dict; '' means absent."""
    record = {}
    for key in ("query", "positive", "task", "dataset", "instruction"):
        if key in example:
            text = _text(example[key], where, key)
            # TFDS Text features cannot be null: prepare writes '' for an absent field.
            record[key] = text if text or key in ("query", "positive") else None
    record["negatives"] = [_text(v, where, "negatives") for v in example.get("negatives", [])]
    scores = example.get("scores")
    if scores is not None and len(scores):  # older prepared datasets have no scores
        record["scores"] = [float(x) for x in scores]
    return record


class TfdsSource(RecordSource):
    """A TFDS dataset directory of ArrayRecord files, read without TensorFlow."""

    def __init__(self, path: Path, task=None, dataset=None, skip_bad=False, columns=None):
        super().__init__(path, task, dataset, skip_bad, columns)
        self._ds = None
        builder = self._builder()
        splits = list(builder.info.splits)
        if "train" in splits:
            self._split = "train"
        elif len(splits) == 1:
            self._split = splits[0]
        else:
            raise RecordError(f"{path}: no 'train' split and several others: {splits}")
        meta = dict(builder.info.metadata or {})
        ds = self._source(builder)
        self._rows = None
        if meta.get("task") and meta.get("dataset"):
            # Written by jaxembed.data.prepare, which validated every record already.
            self.task, self.name = meta["task"], meta["dataset"]
            self._first_where = f"{path}/metadata.json"
            self._num = len(ds)
        else:
            bad = []
            for j in range(len(ds)):
                where = f"{path}:record {j}"
                if self._admit(lambda j=j, w=where: _from_tfds(ds[j], w), where) is None:
                    bad.append(j)
            self._num = len(ds) - len(bad)
            self._rows = _kept(len(ds), bad)
        self._opened()

    def _builder(self):
        # Imported here: tensorflow_datasets takes about a second to import, and JSONL or
        # Parquet users should not pay for it.
        import tensorflow_datasets as tfds

        return tfds.builder_from_directory(os.fspath(self.path))

    def _source(self, builder=None):
        if self._ds is None:
            self._ds = (builder or self._builder()).as_data_source(split=self._split)
        return self._ds

    def __len__(self) -> int:
        return self._num

    def get_many(self, indices) -> list[dict]:
        # One ArrayRecord read for the batch: array_record 0.8's read([i]) costs time in
        # proportion to the file's records (3.8 ms a call at 1,000,000 records, 0.09 ms at
        # 10,000), a read of many indices pays that once (bench/scale.py).
        n = len(self)
        wanted = [operator.index(i) for i in indices]
        if any(not -n <= i < n for i in wanted):
            raise IndexError(f"{self.path}: an index of {wanted} out of range for {n} records")
        rows = [i % n if self._rows is None else int(self._rows[i % n]) for i in wanted]
        examples = self._source().__getitems__(rows) if rows else []
        return [self._check(example, j) for example, j in zip(examples, rows, strict=True)]

    def _get(self, i: int) -> dict:
        j = i if self._rows is None else int(self._rows[i])
        return self._check(self._source()[j], j)

    def _check(self, example: dict, j: int) -> dict:
        where = f"{self.path}:record {j}"
        record = check_record(self._fill(_from_tfds(example, where)), where)
        if record["task"] != self.task or record["dataset"] != self.name:
            raise RecordError(
                f"{where}: task/dataset {record['task']!r}/{record['dataset']!r} differ from "
                f"the source's {self.task!r}/{self.name!r}"
            )
        return record

    def _unpicklable(self) -> tuple[str, ...]:
        return ("_ds",)


# --- opening ---------------------------------------------------------------------------------


def is_tfds_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a TFDS dataset (its ``dataset_info.json``; a ``datasets``
    folder has one too, and its ``state.json``)."""
    return (Path(path) / TFDS_MARKER).is_file() and not is_hf_dataset_dir(path)


def open_source(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    dataset: str | None = None,
    skip_bad: bool = False,
    columns: dict[str, str] | None = None,
) -> RecordSource:
    """Opens one JSONL / JSONL.gz / Parquet file or TFDS directory for random access.

    Args:
      path: a ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` file, or a TFDS dataset directory.
      task: the task of records that lack one (Parquet without a ``task`` column defaults
        to ``"retrieval"``).
      dataset: the dataset name of records that lack one (Parquet defaults to the file stem).
      skip_bad: skip and count records that break the schema instead of raising.
      columns: renames of a table's columns to the schema's fields (``data.columns``), as
        `jaxembed.data.records.normalise` applies them with sentence-transformers' names.

    Returns:
      The source; every record in it shares ``source.task`` and ``source.name``.

    Raises:
      RecordError: a bad record (``file:line``, ``file:row N`` or ``dir:record N``), or a
        file that mixes tasks or datasets.
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is no format known here.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    kw = dict(task=task, dataset=dataset, skip_bad=skip_bad, columns=columns)
    if path.is_dir():
        if is_hf_dataset_dir(path):
            return HfDatasetSource(path, **kw)
        if is_tfds_dir(path):
            return TfdsSource(path, **kw)
        raise ValueError(
            f"{path}: a directory without {TFDS_MARKER} is no TFDS dataset; "
            "open_sources expands directories of record files"
        )
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return JsonlSource(path, **kw)
    if path.name.endswith(".parquet"):
        return ParquetSource(path, **kw)
    raise ValueError(f"{path}: unknown record format; expected one of {RECORD_SUFFIXES}")


def expand(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files and TFDS directories named by ``paths``, directories expanded one level.

    A directory that is not itself a TFDS dataset contributes its ``*.jsonl``,
    ``*.jsonl.gz`` and ``*.parquet`` files and its TFDS subdirectories, sorted by name;
    hidden entries and half-written ``*.tmp-<pid>`` outputs of `jaxembed.data.prepare` are
    left out.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = []
    for path in map(Path, paths):
        if not path.is_dir() or is_tfds_dir(path) or is_hf_dataset_dir(path):
            found.append(path)
            continue
        children = [
            child
            for child in sorted(path.iterdir())
            if not child.name.startswith(".")
            and ".tmp-" not in child.name
            and (
                (child.name.endswith(RECORD_SUFFIXES) and child.is_file())
                or is_tfds_dir(child)
                or is_hf_dataset_dir(child)
            )
        ]
        if not children:
            raise ValueError(f"{path}: no {', '.join(RECORD_SUFFIXES)} files or TFDS datasets")
        found.extend(children)
    return found


def open_sources(
    paths: str | os.PathLike | Iterable[str | os.PathLike], **kw: Any
) -> list[RecordSource]:
    """`open_source` on every file and TFDS directory of ``paths`` (see `expand`), and on
    the split's files of each ``hf://OWNER/NAME[/CONFIG][:SPLIT]`` (`hub_files`), whose
    records are of a dataset named NAME unless ``dataset`` says otherwise.

    Args:
      paths: files, TFDS directories, directories of them, or hub dataset names.
      **kw: ``task``, ``dataset``, ``skip_bad``, ``columns``, as for `open_source`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    jobs = []
    for spec in paths:
        if str(spec).startswith(HUB_PREFIX):
            name, files = hub_files(str(spec))
            named = {**kw, "dataset": kw.get("dataset") or name}
            jobs += [(path, named) for path in files]
        else:
            jobs += [(path, kw) for path in expand(spec)]
    _first_opens_in_parallel(jobs)
    return [open_source(path, **how) for path, how in jobs]


WARM_MIN_BYTES = 64 << 20  # files smaller than this in all are opened in this process


def _first_opens_in_parallel(jobs: list[tuple[Path, dict]]) -> None:
    """Many record files (F2LLM's ~100 datasets) are validated a core each, not one after
    another: each is opened in a worker process, which writes its open-cache entry, so the
    opens that follow read the cache. Only with the cache on, outside a daemon process, for
    JSONL and Parquet files too small for their own parallel validation (`_own_parts`),
    when there are two or more and `WARM_MIN_BYTES` in all. A worker that fails is
    ignored: the open that follows reads that file again and raises its error as one pass
    would."""
    import multiprocessing

    if cache_root() is None or multiprocessing.current_process().daemon:
        return
    small = [
        (str(path), how)
        for path, how in jobs
        if path.is_file() and path.name.endswith((".jsonl", ".parquet")) and _own_parts(path) < 2
    ]
    cores = _usable_cores()
    total = sum(Path(p).stat().st_size for p, _ in small)
    if len(small) < 2 or total < WARM_MIN_BYTES or cores < 2:
        return
    _in_processes(_warm, small, min(cores, len(small)), "record files opened one after another")


def _warm(job: tuple[str, dict]) -> None:
    """A worker of `_first_opens_in_parallel`: opening writes the file's cache entry. An
    error is left to the open that follows, which raises it as one pass would."""
    path, how = job
    with contextlib.suppress(Exception):
        open_source(path, **how)


HUB_PREFIX = "hf://"


def hub_files(spec: str) -> tuple[str, list[Path]]:
    """``(NAME, files)``: the record files of a dataset in the local Hugging Face hub cache
    (``HF_HUB_CACHE``, where ``huggingface-cli download`` and ``load_dataset`` put them),
    read offline, for ``hf://OWNER/NAME[/CONFIG][:SPLIT]`` (split ``train`` by default).

    A file belongs to the split when a folder of its path or its name's first part is the
    split (``data/train-00000-of-00002.parquet``, ``train/part.jsonl``, ``train.jsonl``),
    as the hub's own data-file conventions have it; with several configs, name one.
    """
    from huggingface_hub import constants

    body, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    parts = body.strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{spec}: expected {HUB_PREFIX}OWNER/NAME[/CONFIG][:SPLIT]")
    owner, name, config = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    split = split or "train"
    repo = Path(constants.HF_HUB_CACHE) / f"datasets--{owner}--{name}"
    snapshot = _hub_snapshot(repo, spec)
    found = sorted(
        f.relative_to(snapshot)
        for f in snapshot.rglob("*")
        if f.name.endswith(RECORD_SUFFIXES) and f.is_file()
    )
    if config is not None:
        found = [f for f in found if f.parts[0] == config]
    pattern = re.compile(rf"^{re.escape(split)}([-_.]|$)")
    files = [f for f in found if any(pattern.match(part) for part in f.parts)]
    configs = sorted({f.parts[0] for f in files if len(f.parts) > 1} - {"data", split})
    if not files:
        shown = [str(f) for f in found[:8]] or "no record files"
        raise ValueError(f"{spec}: no '{split}' split in {snapshot}; found {shown}")
    if config is None and len(configs) > 1:
        raise ValueError(f"{spec}: several configs {configs}; name one: {HUB_PREFIX}{body}/CONFIG")
    return name, [snapshot / f for f in files]


def _hub_snapshot(repo: Path, spec: str) -> Path:
    """The snapshot of the repo's ``main`` revision (else its only one)."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*")) if repo.is_dir() else []
    if len(snapshots) == 1:
        return snapshots[0]
    if not snapshots:
        raise FileNotFoundError(
            f"{spec}: not in the local hub cache ({repo} does not exist); download it first "
            "(huggingface-cli download --repo-type dataset OWNER/NAME) or set HF_HUB_CACHE"
        )
    raise ValueError(f"{spec}: several snapshots in {repo} and no refs/main to choose one")
