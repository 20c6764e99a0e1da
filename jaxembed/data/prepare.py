"""Convert JSONL / Parquet record files into a TFDS dataset of ArrayRecord files.

    python -m jaxembed.data.prepare --input FILE [FILE ...] --out DIR \\
        [--name NAME] [--task T] [--skip-bad] [--shards N] [--workers N] [--overwrite]

The output is one dataset of one task (as every `jaxembed.data.readers.RecordSource` is),
in a directory that ``tfds.builder_from_directory(DIR).as_data_source(split="train")`` and
`jaxembed.data.readers.open_source` read with random access, without TensorFlow:

    DIR/
      <name>-train.array_record-00000-of-0000N   records serialized as tf.train.Example
      dataset_info.json, features.json           written by TFDS
      metadata.json                              {"task", "dataset", "num_skipped", ...}

TensorFlow is not needed to write either: ``tfds.features.FeaturesDict.encode_example`` and
``tfds.core.example_serializer.ExampleSerializer`` build the ``tf.train.Example`` protos
with TFDS's own protobuf copies, ``array_record``'s writer writes the shards, and
``tfds.folder_dataset.write_metadata`` (with ``check_data=False``: its check reads through
``tf.data``) writes the metadata. ``tfds.dataset_builders.store_as_tfds_dataset`` is not
used: in tfds 4.9.10 it goes through the download manager, which imports the
``importlib_resources`` backport that this environment does not ship.

The output is built in ``.DIR.tmp-<pid>`` beside ``DIR`` and renamed into place only when
complete, so a failure leaves no ``DIR`` behind and readers never see half a dataset.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxembed import cli
from jaxembed.data.readers import RecordSource, open_sources
from jaxembed.files import atomic_dir

SPLIT = "train"
VERSION = "1.0.0"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def features():
    """The TFDS features of a record; absent ``instruction`` is stored as ``''``, absent
    ``scores`` as an empty list."""
    # Imported here: tensorflow_datasets takes about a second to import.
    import tensorflow_datasets as tfds

    text = tfds.features.Text()
    return tfds.features.FeaturesDict(
        {
            "query": text,
            "positive": text,
            "negatives": tfds.features.Sequence(tfds.features.Text()),
            "task": text,
            "dataset": text,
            "instruction": text,
            "scores": tfds.features.Sequence(tfds.features.Scalar(np.float32)),
        }
    )


def tfds_name(dataset: str) -> str:
    """A TFDS-valid name (``[A-Za-z]\\w*``, used in file names) for a dataset name."""
    name = re.sub(r"\W", "_", dataset)
    return name if name[:1].isalpha() else f"ds_{name}"


def _write_shard(path: Path, serialized: Iterable[bytes]) -> int:
    """Writes one ArrayRecord shard; returns the number of records written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    # group_size:1 (as TFDS's own ArrayRecord adapter writes) puts each record in its own
    # chunk, so a random read decompresses one record rather than a group of them.
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for example in serialized:
            writer.write(example)
            count += 1
    finally:
        writer.close()
    return count


def _records(sources: Sequence[RecordSource], start: int, count: int) -> Iterator[dict]:
    """Records ``start .. start + count - 1`` of the sources laid end to end."""
    for src in sources:
        if start >= len(src):
            start -= len(src)
            continue
        stop = min(len(src), start + count)
        for i in range(start, stop):
            yield src[i]
        count -= stop - start
        start = 0
        if not count:
            return


def _write_range(path: Path, sources: Sequence[RecordSource], start: int, count: int) -> int:
    """Serializes records ``start .. start + count - 1`` into the shard ``path``.

    A top-level function of picklable arguments, so a worker process can run it.
    """
    import tensorflow_datasets as tfds

    feats = features()
    serializer = tfds.core.example_serializer.ExampleSerializer(feats.get_serialized_info())

    def serialized() -> Iterator[bytes]:
        for record in _records(sources, start, count):
            example = {
                **record,
                "instruction": record.get("instruction", ""),
                "scores": np.asarray(record.get("scores", []), np.float32),
            }
            yield serializer.serialize_example(feats.encode_example(example))

    written = _write_shard(path, serialized())
    if written != count:
        raise RuntimeError(f"{path}: wrote {written} records, expected {count}")
    return written


def _run(jobs: list[tuple], workers: int) -> list[int]:
    """``_write_range`` on every job, in ``workers`` processes (in this one when 1)."""
    if workers <= 1:
        return [_write_range(*job) for job in jobs]
    # spawn, not fork: the caller may hold threads (JAX, Grain) that fork would copy mid-step.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    )
    try:
        return list(pool.map(_write_range, *zip(*jobs, strict=True)))
    finally:
        # On a failure, start no further shard; the running ones finish before cleanup.
        pool.shutdown(wait=True, cancel_futures=True)


def _one_dataset(sources: Sequence[RecordSource]) -> tuple[str, str]:
    """The (task, dataset) shared by every non-empty source; raises naming two that differ."""
    first = None
    for src in sources:
        if not len(src):
            continue
        if first is None:
            first = src
        elif (src.task, src.name) != (first.task, first.name):
            raise ValueError(
                f"{src.path} holds {src.name!r} ({src.task}) but {first.path} holds "
                f"{first.name!r} ({first.task}); prepare one output directory per dataset"
            )
    if first is None:
        raise ValueError("no records to write: every input is empty (or every record bad)")
    return first.task, first.name


def prepare(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    name: str | None = None,
    task: str | None = None,
    skip_bad: bool = False,
    shards: int = 1,
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Writes the records of ``inputs`` as a TFDS ArrayRecord dataset in ``out``.

    Args:
      inputs: JSONL / JSONL.gz / Parquet files, TFDS directories, or directories of them.
      out: the output directory; refused when it exists and is not empty, unless
        ``overwrite``.
      name: the dataset name of records that lack one (see `open_source`'s ``dataset``).
      task: the task of records that lack one.
      skip_bad: skip and count bad records instead of stopping at the first.
      shards: the number of ArrayRecord files (at most one per record).
      workers: processes writing shards in parallel (serialization is pure Python, about
        3-4k short records per second per process).
      overwrite: replace a non-empty ``out``.

    Returns:
      ``{"path", "dataset", "task", "records", "skipped", "shards"}``.
    """
    import tensorflow_datasets as tfds

    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    sources = open_sources(inputs, task=task, dataset=name, skip_bad=skip_bad)
    task, dataset = _one_dataset(sources)
    total = sum(len(s) for s in sources)
    skipped = sum(s.skipped for s in sources)
    shards = min(shards, total)
    # Even shards, the first ones one record longer when total % shards != 0.
    counts = [total // shards + (k < total % shards) for k in range(shards)]
    starts = [sum(counts[:k]) for k in range(shards)]

    with atomic_dir(out) as tmp:
        template = tfds.core.ShardedFileTemplate(
            data_dir=tmp,
            template=FILE_TEMPLATE,
            dataset_name=tfds_name(dataset),
            split=SPLIT,
            filetype_suffix="array_record",
        )
        paths = [Path(p) for p in template.sharded_filepaths(shards)]
        jobs = [(p, sources, s, c) for p, s, c in zip(paths, starts, counts, strict=True)]
        lengths = _run(jobs, min(workers, shards))
        split = tfds.core.SplitInfo(
            name=SPLIT,
            shard_lengths=lengths,
            num_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
            filename_template=template,
        )
        tfds.folder_dataset.write_metadata(
            data_dir=tmp,
            features=features(),
            split_infos=[split],
            filename_template=template,
            version=VERSION,
            check_data=False,
            description=f"jaxembed records of {dataset!r} ({task}), from jaxembed.data.prepare",
            metadata=tfds.core.MetadataDict(
                task=task,
                dataset=dataset,
                num_skipped=skipped,
                sources=[os.path.abspath(s.path) for s in sources],
            ),
        )
    return {
        "path": os.fspath(out),
        "dataset": dataset,
        "task": task,
        "records": total,
        "skipped": skipped,
        "shards": shards,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; see the module docstring."""
    parser = cli.parser("jaxembed.data.prepare", __doc__.split("\n")[0], multihost=False)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL / Parquet files or dirs")
    parser.add_argument("--out", required=True, help="output TFDS dataset directory")
    parser.add_argument("--name", help="dataset name of records without one")
    parser.add_argument("--task", help="task of records without one")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    parser.add_argument("--shards", type=int, default=1, help="ArrayRecord files to write")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return cli.main(parser, _main, argv)


def _main(args) -> dict:
    # RecordError is a ValueError whose message says where: cli.main prints it in one line.
    stats = prepare(
        args.input,
        args.out,
        name=args.name,
        task=args.task,
        skip_bad=args.skip_bad,
        shards=args.shards,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {stats['records']} records of {stats['dataset']!r} ({stats['task']}) "
        f"in {stats['shards']} shard(s) to {stats['path']}; skipped {stats['skipped']} bad"
    )
    return stats


if __name__ == "__main__":
    main()
