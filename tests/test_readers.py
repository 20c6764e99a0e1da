"""Tests for jaxembed.data.readers and jaxembed.data.prepare on small files written here."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import random
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxembed.data import prepare as prepare_lib
from jaxembed.data import readers
from jaxembed.data.readers import (
    JsonlSource,
    ParquetSource,
    TfdsSource,
    expand,
    open_source,
    open_sources,
)
from jaxembed.data.records import RecordError

RECORDS = [
    {
        "query": f"query {i} – café",
        "positive": f"positive {i} 東京",
        "negatives": [f"negative {i}.{k}" for k in range(i % 4)],
        "task": "retrieval",
        "dataset": "toy",
        **({"instruction": "Instruct: find the passage"} if i % 2 else {}),
    }
    for i in range(11)
]


def write_jsonl(path, lines):
    """Writes ``lines`` (dicts as JSON, str / bytes verbatim) one per line."""
    out = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        out += (line if isinstance(line, bytes) else line.encode()) + b"\n"
    with gzip.open(path, "wb") if path.name.endswith(".gz") else open(path, "wb") as f:
        f.write(out)
    return path


def write_f2llm(path, rows, num_negatives, row_group_size=None, **extra_columns):
    """Writes rows ``(query, passage, [negatives])`` as F2LLM's Parquet layout."""
    columns = {"query": [r[0] for r in rows], "passage": [r[1] for r in rows]}
    for k in range(num_negatives):
        columns[f"negative_{k + 1}"] = [r[2][k] if k < len(r[2]) else None for r in rows]
    columns.update(extra_columns)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def check_random_access(src, expected):
    """Every record, read in a shuffled order, and again after a pickle round trip."""
    assert len(src) == len(expected)
    order = list(range(len(expected)))
    random.Random(0).shuffle(order)
    assert [src[i] for i in order] == [expected[i] for i in order]
    assert src[-1] == expected[-1]
    clone = pickle.loads(pickle.dumps(src))
    assert [clone[i] for i in reversed(order)] == [expected[i] for i in reversed(order)]
    with pytest.raises(IndexError):
        src[len(expected)]


# --- readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"toy{suffix}", [*RECORDS[:5], "", "  ", *RECORDS[5:]])
    src = open_source(path)
    assert isinstance(src, JsonlSource)
    assert (src.path, src.name, src.task, src.skipped) == (path, "toy", "retrieval", 0)
    check_random_access(src, RECORDS)


def test_jsonl_fills_missing_task_and_dataset_from_arguments(tmp_path):
    bare = [{k: v for k, v in r.items() if k not in ("task", "dataset")} for r in RECORDS[:3]]
    path = write_jsonl(tmp_path / "bare.jsonl", bare)
    src = open_source(path, task="clustering", dataset="bare")
    assert (src.task, src.name) == ("clustering", "bare")
    assert src[2] == {**RECORDS[2], "task": "clustering", "dataset": "bare"}
    # A record's own value wins over the argument.
    path = write_jsonl(tmp_path / "own.jsonl", RECORDS[:2])
    assert open_source(path, task="clustering", dataset="other").task == "retrieval"
    # Without arguments: retrieval pairs of a dataset named after the file (as Parquet).
    src = open_source(write_jsonl(tmp_path / "my-pairs.jsonl.gz", bare))
    assert (src.task, src.name) == ("retrieval", "my-pairs")


def test_parquet_three_negatives(tmp_path):
    rows = [
        ("q0", "p0", ["n0a", "n0b", "n0c"]),
        ("q1", "p1", ["n1a", "", None]),  # empty and null trailing negatives are dropped
        ("q2", "p2", []),
    ]
    path = write_f2llm(tmp_path / "msmarco.parquet", rows, 3)
    src = open_source(path)
    assert isinstance(src, ParquetSource)
    assert (src.name, src.task) == ("msmarco", "retrieval")  # file stem; default task
    expected = [
        {
            "query": q,
            "positive": p,
            "negatives": [n for n in negs if n],
            "task": "retrieval",
            "dataset": "msmarco",
        }
        for q, p, negs in rows
    ]
    check_random_access(src, expected)


def test_parquet_one_negative_with_task_and_instruction_columns(tmp_path):
    rows = [(f"text {i}", f"label {i % 3}", [f"label {(i + 1) % 3}"]) for i in range(6)]
    path = write_f2llm(
        tmp_path / "emotion.parquet",
        rows,
        1,
        task=["classification"] * 6,
        dataset=["emotion"] * 6,
        instruction=["Instruct: classify the emotion"] * 6,
    )
    src = open_source(path, task="retrieval", dataset="ignored")  # the columns win
    assert (src.name, src.task) == ("emotion", "classification")
    assert src[4] == {
        "query": "text 4",
        "positive": "label 1",
        "negatives": ["label 2"],
        "task": "classification",
        "dataset": "emotion",
        "instruction": "Instruct: classify the emotion",
    }
    assert open_source(write_f2llm(tmp_path / "b.parquet", rows, 1), task="clustering").task == (
        "clustering"
    )


def test_tfds_round_trip_via_prepare(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "part1.jsonl", RECORDS[:7])
    rows = [(r["query"], r["positive"], r["negatives"]) for r in RECORDS[7:]]
    parquet = write_f2llm(tmp_path / "part2.parquet", rows, 3)
    out = tmp_path / "out" / "toy"
    prepare_lib.main(
        ["--input", str(jsonl), str(parquet), "--out", str(out), "--name", "toy", "--shards", "3"]
    )
    assert "wrote 11 records of 'toy' (retrieval) in 3 shard(s)" in capsys.readouterr().out
    assert len(list(out.glob("toy-train.array_record-*-of-00003"))) == 3
    src = open_source(out)
    assert isinstance(src, TfdsSource)
    assert (src.name, src.task, src.skipped) == ("toy", "retrieval", 0)
    # Parquet rows carry no instruction.
    expected = RECORDS[:7] + [
        {k: v for k, v in r.items() if k != "instruction"} for r in RECORDS[7:]
    ]
    check_random_access(src, expected)
    assert "tensorflow" not in sys.modules


def test_tfds_reads_with_tfds_data_source_and_grain(tmp_path):
    import grain
    import tensorflow_datasets as tfds

    out = tmp_path / "toy"
    prepare_lib.prepare([write_jsonl(tmp_path / "a.jsonl", RECORDS)], out)
    ds = tfds.builder_from_directory(out).as_data_source(split="train")
    assert ds[3]["query"] == RECORDS[3]["query"].encode()
    src = open_source(out)
    got = list(grain.MapDataset.source(src).shuffle(seed=0))
    assert sorted(got, key=lambda r: r["query"]) == sorted(RECORDS, key=lambda r: r["query"])


def test_tfds_without_metadata_gets_a_validating_pass(tmp_path, monkeypatch):
    # A TFDS directory from elsewhere: no metadata.json, and one record breaking the schema
    # (written by letting it past the validator).
    bad = [*RECORDS[:2], {**RECORDS[2], "query": " "}, RECORDS[3]]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with monkeypatch.context() as m:
        m.setattr(readers, "check_record", lambda obj, where: {"negatives": [], **obj})
        prepare_lib.prepare([path], tmp_path / "foreign")
    (tmp_path / "foreign" / "metadata.json").unlink()
    with pytest.raises(RecordError, match=re.escape(f"{tmp_path / 'foreign'}:record 2: field")):
        open_source(tmp_path / "foreign")
    src = open_source(tmp_path / "foreign", skip_bad=True)
    assert (src.name, src.task, src.skipped) == ("toy", "retrieval", 1)
    check_random_access(src, [*RECORDS[:2], RECORDS[3]])


def test_open_sources_expands_directories(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", RECORDS[:2])
    write_jsonl(tmp_path / "a.jsonl.gz", RECORDS[:3])
    write_f2llm(tmp_path / "c.parquet", [("q", "p", ["n"])], 1)
    prepare_lib.prepare([tmp_path / "b.jsonl"], tmp_path / "d_tfds")
    (tmp_path / "notes.txt").write_text("not records")
    (tmp_path / "e.tmp-123").mkdir()  # a half-written prepare output
    names = [p.name for p in expand(tmp_path)]
    assert names == ["a.jsonl.gz", "b.jsonl", "c.parquet", "d_tfds"]
    sources = open_sources([tmp_path, tmp_path / "b.jsonl"])
    assert [len(s) for s in sources] == [3, 2, 1, 2, 2]


# --- validation errors -----------------------------------------------------------------------

GOOD = json.dumps(RECORDS[0])
BAD_LINES = {
    "malformed JSON": ('{"query": "q", "positive": ', r"malformed JSON"),
    "missing field": (
        json.dumps({k: v for k, v in RECORDS[0].items() if k != "positive"}),
        r"missing field 'positive'",
    ),
    "null field": (json.dumps({**RECORDS[0], "query": None}), r"missing field 'query'"),
    "empty field": (json.dumps({**RECORDS[0], "query": "  "}), r"field 'query' is empty"),
    "wrong type": (json.dumps({**RECORDS[0], "query": 3}), r"field 'query' must be a string"),
    "wrong negative": (json.dumps({**RECORDS[0], "negatives": ["a", 1]}), r"negatives\[1\]"),
    "invalid UTF-8": (b'{"query": "caf\xe9", "positive": "p"}', r"invalid UTF-8 at byte 14"),
    "unknown task": (json.dumps({**RECORDS[0], "task": "ranking"}), r"field 'task' is 'ranking'"),
    "not an object": ("[1, 2]", r"expected a JSON object"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", list(BAD_LINES))
def test_jsonl_errors_name_file_and_line(tmp_path, case, suffix):
    bad, message = BAD_LINES[case]
    path = write_jsonl(tmp_path / f"bad{suffix}", [GOOD, "", bad, GOOD])
    with pytest.raises(RecordError, match=re.escape(f"{path}:3: ") + message):
        open_source(path)


def test_mixed_tasks_and_datasets_name_the_first_conflicting_line(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [GOOD, GOOD, {**RECORDS[0], "task": "clustering"}, GOOD]
    )
    message = f"{path}:3: task 'clustering' differs from 'retrieval' at {path}:1"
    with pytest.raises(RecordError, match=re.escape(message)):
        open_source(path)
    # A file that mixes tasks is refused even when bad records are skipped.
    with pytest.raises(RecordError, match=re.escape(message)):
        open_source(path, skip_bad=True)
    path = write_jsonl(tmp_path / "two.jsonl", [GOOD, {**RECORDS[0], "dataset": "other"}])
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: dataset 'other' differs")):
        open_source(path)


def test_parquet_errors_name_file_and_row(tmp_path):
    rows = [("q0", "p0", ["n"]), ("q1", "p1", ["n"]), ("q2", "  ", ["n"])]
    path = write_f2llm(tmp_path / "bad.parquet", rows, 1)
    with pytest.raises(RecordError, match=re.escape(f"{path}:row 2: field 'positive' is empty")):
        open_source(path)
    # A null before a non-empty negative is no trailing gap: it is an error.
    path = write_f2llm(tmp_path / "gap.parquet", [("q", "p", [None, "n"])], 2)
    with pytest.raises(RecordError, match=re.escape(f"{path}:row 0: negatives[0] must be")):
        open_source(path)
    path = write_f2llm(tmp_path / "task.parquet", rows[:2], 1, task=["retrieval", "sorting"])
    with pytest.raises(RecordError, match=re.escape(f"{path}:row 1: field 'task' is 'sorting'")):
        open_source(path)
    path = write_f2llm(tmp_path / "mix.parquet", rows[:2], 1, task=["retrieval", "clustering"])
    with pytest.raises(RecordError, match=re.escape(f"{path}:row 1: task 'clustering' differs")):
        open_source(path)
    pq.write_table(pa.table({"question": ["q"], "answer": ["p"]}), tmp_path / "layout.parquet")
    with pytest.raises(RecordError, match="no query column; expected F2LLM's layout"):
        open_source(tmp_path / "layout.parquet")


def test_sentence_transformers_columns_and_renamed_ones(tmp_path):
    """anchor / positive / negative_N (sentence-transformers' triplet and n-tuple datasets),
    a single ``negative``, and the config's data.columns renames, in JSONL and Parquet."""
    want = {"query": "q", "positive": "p", "negatives": ["n1", "n2"], "task": "retrieval"}
    rows = {"anchor": ["q"], "positive": ["p"], "negative_2": ["n2"], "negative_1": ["n1"]}
    pq.write_table(pa.table(rows), tmp_path / "st.parquet")
    assert open_source(tmp_path / "st.parquet")[0] == {**want, "dataset": "st"}
    path = write_jsonl(
        tmp_path / "triplets.jsonl", [{"anchor": "q", "positive": "p", "negative": "n1"}]
    )
    assert open_source(path)[0]["negatives"] == ["n1"]
    mine = {"question": ["q"], "answer": ["p"], "wrong": [["n1", "n2"]]}
    pq.write_table(pa.table(mine), tmp_path / "mine.parquet")
    renames = {"question": "query", "answer": "positive", "wrong": "negatives"}
    got = open_source(tmp_path / "mine.parquet", columns=renames)[0]
    assert got == {**want, "dataset": "mine"}
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "answer": "p"}])
    assert open_source(path, columns=renames)[0]["query"] == "q"


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown record format"):
        open_source(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nope.jsonl")


# --- skip_bad ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_skip_bad_counts_and_skips(tmp_path, suffix, caplog):
    lines = [RECORDS[0]]
    for bad, _ in BAD_LINES.values():
        lines += [bad, RECORDS[len(lines) % len(RECORDS)]]
    path = write_jsonl(tmp_path / f"some_bad{suffix}", lines)
    with caplog.at_level(logging.WARNING):
        src = open_source(path, skip_bad=True)
    assert src.skipped == len(BAD_LINES)
    assert [src[i] for i in range(len(src))] == [r for r in lines if isinstance(r, dict)]
    assert f"skipped {len(BAD_LINES)} bad record(s)" in caplog.text
    assert pickle.loads(pickle.dumps(src))[len(src) - 1] == src[len(src) - 1]


def test_skip_bad_parquet_and_prepare(tmp_path, capsys):
    rows = [("q0", "p0", ["n"]), (None, "p1", ["n"]), ("q2", "p2", ["n"]), ("q3", "", ["n"])]
    path = write_f2llm(tmp_path / "rows.parquet", rows, 1)
    src = open_source(path, skip_bad=True)
    assert (len(src), src.skipped) == (2, 2)
    assert [src[0]["query"], src[1]["query"]] == ["q0", "q2"]
    prepare_lib.main(["--input", str(path), "--out", str(tmp_path / "out"), "--skip-bad"])
    printed = capsys.readouterr().out
    assert "wrote 2 records" in printed and "skipped 2 bad" in printed
    assert [open_source(tmp_path / "out")[i]["query"] for i in range(2)] == ["q0", "q2"]


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    path = write_jsonl(tmp_path / "in" / "toy.jsonl", RECORDS)
    real = prepare_lib._write_shard
    calls = []

    def write_one_then_fail(shard, serialized):
        calls.append(shard)
        if len(calls) == 2:
            next(iter(serialized))  # half a shard: one record pulled, then the disk "fails"
            raise OSError("disk full")
        return real(shard, serialized)

    monkeypatch.setattr(prepare_lib, "_write_shard", write_one_then_fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        prepare_lib.prepare([path], out, shards=3)
    assert len(calls) == 2 and not calls[0].exists()  # the finished shard went too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_prepare_with_worker_processes(tmp_path):
    parts = [write_jsonl(tmp_path / f"{k}.jsonl", RECORDS[k::3]) for k in range(3)]
    stats = prepare_lib.prepare(parts, tmp_path / "out", shards=4, workers=2)
    assert (stats["records"], stats["shards"]) == (len(RECORDS), 4)
    check_random_access(open_source(tmp_path / "out"), [r for k in range(3) for r in RECORDS[k::3]])


def test_prepare_refuses_a_non_empty_out_dir(tmp_path, capsys):
    path = write_jsonl(tmp_path / "toy.jsonl", RECORDS[:3])
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine to fill
    prepare_lib.prepare([path], out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        prepare_lib.prepare([path], out)
    with pytest.raises(SystemExit) as info:
        prepare_lib.main(["--input", str(path), "--out", str(out)])
    assert info.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    stats = prepare_lib.prepare([write_jsonl(tmp_path / "new.jsonl", RECORDS)], out, overwrite=True)
    assert stats["records"] == len(open_source(out)) == len(RECORDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "out", "toy.jsonl"]


def test_prepare_refuses_inputs_of_two_datasets(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "dataset": "other"} for r in RECORDS[:2]])
    with pytest.raises(ValueError, match="one output directory per dataset"):
        prepare_lib.prepare([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hugging_face_datasets_folders(tmp_path):
    """``save_to_disk`` folders of a Dataset and of a DatasetDict (its train split), with
    sentence-transformers' columns, read as Arrow; a directory of them expands."""
    datasets = pytest.importorskip("datasets")
    rows = {"anchor": ["q0", "q1"], "positive": ["p0", "p1"], "negative": ["n0", "n1"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "all" / "triplets"))
    datasets.DatasetDict({"train": ds, "dev": ds.select([0])}).save_to_disk(
        str(tmp_path / "all" / "dict")
    )
    sources = open_sources(tmp_path / "all")
    assert [s.name for s in sources] == ["dict", "triplets"]
    for src in sources:
        assert len(src) == 2 and src.task == "retrieval"
        assert src[1] == {
            "query": "q1", "positive": "p1", "negatives": ["n1"], "task": "retrieval",
            "dataset": src.name,
        }  # fmt: skip
    clone = pickle.loads(pickle.dumps(sources[0]))
    assert clone[0]["query"] == "q0"
    # A damaged or empty state file: one line naming it.
    state = tmp_path / "all" / "triplets" / "state.json"
    state.write_text(state.read_text()[:-5])
    with pytest.raises(RecordError, match=r"triplets/state\.json: not a datasets state file"):
        open_sources(tmp_path / "all" / "triplets")
    state.write_text('{"_data_files": []}')
    with pytest.raises(RecordError, match=r"state\.json: lists no Arrow files"):
        open_sources(tmp_path / "all" / "triplets")
    (tmp_path / "all" / "dict" / "dataset_dict.json").write_text("{}")
    with pytest.raises(RecordError, match=r"dict/dataset_dict\.json: not a datasets dict file"):
        open_sources(tmp_path / "all" / "dict")


def _hub_cache(root, repo, files):
    """A hub cache as ``huggingface-cli download`` leaves it: snapshot files are symlinks
    into ``blobs``, ``refs/main`` names the snapshot."""
    base = root / f"datasets--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    for k, (rel, rows) in enumerate(files.items()):
        blob = base / "blobs" / f"blob{k}"
        blob.parent.mkdir(exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.table(rows), blob)
        else:
            columns = list(rows.values())
            n = len(columns[0]) if columns else 0
            write_jsonl(blob, [{k: v[i] for k, v in rows.items()} for i in range(n)])
        link = base / "snapshots" / "abc123" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)


def test_hub_cache_datasets_by_name(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    triplets = {"anchor": ["q0", "q1"], "positive": ["p0", "p1"], "negative": ["n0", "n1"]}
    pairs = {"anchor": ["a"], "positive": ["b"]}
    _hub_cache(tmp_path, "me/triplets", {
        "data/train-00000-of-00002.parquet": triplets,
        "data/train-00001-of-00002.parquet": triplets,
        "data/test-00000-of-00001.parquet": pairs,
        "README.md.jsonl.txt": {},
    })  # fmt: skip
    sources = readers.open_sources(["hf://me/triplets"])
    assert [len(s) for s in sources] == [2, 2] and {s.name for s in sources} == {"triplets"}
    assert sources[0][1] == {"query": "q1", "positive": "p1", "negatives": ["n1"],
                             "task": "retrieval", "dataset": "triplets"}  # fmt: skip
    assert [len(s) for s in readers.open_sources("hf://me/triplets:test")] == [1]
    _hub_cache(tmp_path, "me/nli", {"pair/train.jsonl": pairs, "triplet/train.jsonl": triplets})
    with pytest.raises(ValueError, match=r"several configs \['pair', 'triplet'\]; name one"):
        readers.open_sources("hf://me/nli")
    (one,) = readers.open_sources("hf://me/nli/triplet", dataset="nli")
    assert len(one) == 2 and one.name == "nli"
    with pytest.raises(ValueError, match=r"hf://me/nli:dev: no 'dev' split in .*found \["):
        readers.open_sources("hf://me/nli:dev")
    with pytest.raises(FileNotFoundError, match=r"hf://me/none: not in the local hub cache"):
        readers.open_sources("hf://me/none")
    with pytest.raises(ValueError, match=r"expected hf://OWNER/NAME\[/CONFIG\]\[:SPLIT\]"):
        readers.open_sources("hf://justname")


def test_a_jsonl_source_closes_its_file_after_os_is_torn_down(tmp_path, monkeypatch):
    """At interpreter exit module globals are cleared: a JsonlSource still alive then closed
    its file through ``os``, already None ('Exception ignored in ... __del__')."""
    import os

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    source = readers.JsonlSource(data)
    assert source[0]["query"] == "q"  # the file is opened on the first read
    fd = source._fd
    monkeypatch.setattr(readers, "os", None)  # what teardown does to the module's globals
    source.__del__()
    monkeypatch.undo()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    source._fd = None  # closed once: not again when the object goes


# --- the open cache --------------------------------------------------------------------------


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(readers.CACHE_ENV, str(root))
    return root


def test_a_second_open_reads_the_cache_not_the_file(tmp_path, data_cache, monkeypatch, caplog):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [*RECORDS[:5], "{broken", *RECORDS[5:]])
    parquet = write_f2llm(tmp_path / "f2.parquet", [("q0", "p0", ["n0"]), ("q1", "p1", [])], 1)
    first = {p: open_source(p, skip_bad=True) for p in (jsonl, parquet)}
    assert first[jsonl].skipped == 1 and len(list(data_cache.iterdir())) == 2

    def unread(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(JsonlSource, "_lines", unread)
    monkeypatch.setattr(pq, "read_table", unread)  # Parquet rows come from the Arrow copy
    caplog.set_level(logging.WARNING)
    for path, src in first.items():
        again = open_source(path, skip_bad=True)
        assert (again.name, again.task, again.skipped) == (src.name, src.task, src.skipped)
        check_random_access(again, [src[i] for i in range(len(src))])
    assert "skipped 1 bad record(s)" in caplog.text  # said again from the cache
    # Read differently (another default dataset), it is another entry, read from the file.
    with pytest.raises(AssertionError, match="read again"):
        open_source(jsonl, skip_bad=True, dataset="other")


def test_a_parquet_file_is_decoded_once_and_a_bad_row_leaves_no_copy(
    tmp_path, data_cache, monkeypatch
):
    rows = [(f"q{i}", f"p{i}", [f"n{i}"]) for i in range(9000)]  # 3 batches of 4096
    path = write_f2llm(tmp_path / "f2.parquet", rows, 1)
    decoded = []
    batches = ParquetSource._batches
    monkeypatch.setattr(
        ParquetSource, "_batches", lambda self, groups: decoded.append(1) or batches(self, groups)
    )
    src = open_source(path)
    assert len(decoded) == 1  # validation and the Arrow copy: one pass
    monkeypatch.setattr(pq, "read_table", None)  # rows come from the copy
    check_random_access(open_source(path), [src[i] for i in range(len(src))])
    assert src[8999] == {"query": "q8999", "positive": "p8999", "negatives": ["n8999"],
                         "task": "retrieval", "dataset": "f2"}  # fmt: skip
    bad = write_f2llm(tmp_path / "bad.parquet", [*rows[:5000], ("q", None, [])], 1)
    with pytest.raises(RecordError, match=r"bad\.parquet:row 5000"):
        open_source(bad)
    assert sorted(f.name for f in data_cache.iterdir()) == [next(data_cache.iterdir()).name]


def test_many_files_are_first_opened_in_parallel_with_one_pass_errors(
    tmp_path, data_cache, monkeypatch
):
    monkeypatch.setattr(readers, "WARM_MIN_BYTES", 0)
    paths = [write_jsonl(tmp_path / f"set{i}.jsonl", RECORDS) for i in range(3)]
    paths.append(write_f2llm(tmp_path / "f2.parquet", [("q0", "p0", ["n0"])], 1))
    read = []
    lines = JsonlSource._lines
    monkeypatch.setattr(JsonlSource, "_lines", lambda self: read.append(self.path) or lines(self))
    sources = readers.open_sources(tmp_path)
    assert read == [] and len(list(data_cache.iterdir())) == 4  # the workers validated them
    assert [s.path.name for s in sources] == ["f2.parquet", *(f"set{i}.jsonl" for i in range(3))]
    assert [len(s) for s in sources] == [1, *[len(RECORDS)] * 3]
    # A bad file among them: the error a one-process open raises, the file's line named.
    write_jsonl(tmp_path / "set1.jsonl", [*RECORDS[:2], {"query": "q"}])
    with pytest.raises(RecordError, match=r"set1\.jsonl:3: .*positive"):
        readers.open_sources(tmp_path)
    assert read == [tmp_path / "set1.jsonl"]  # only the bad one is read here


def test_a_changed_file_is_validated_again(tmp_path, data_cache):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    assert len(open_source(path)) == len(RECORDS)
    with open(path, "a") as f:
        f.write('{"query": "q"}\n')
    with pytest.raises(RecordError, match=rf"pairs\.jsonl:{len(RECORDS) + 1}: .*positive"):
        open_source(path)


def test_workers_map_the_index_and_survive_a_deleted_cache(tmp_path, data_cache, monkeypatch):
    import shutil

    many = [dict(RECORDS[0], query=f"q{i}") for i in range(2000)]
    path = write_jsonl(tmp_path / "pairs.jsonl", many)
    src = open_source(path)
    with_cache = len(pickle.dumps(src))
    with monkeypatch.context() as m:
        m.setenv(readers.CACHE_ENV, "off")
        without = len(pickle.dumps(open_source(path)))
    assert with_cache < 2000 < 2000 * 16 < without  # the index does not travel
    clone = pickle.loads(pickle.dumps(src))
    shutil.rmtree(data_cache)
    assert clone[1999] == many[1999] and len(clone) == 2000  # read again, once


def test_an_unwritable_cache_is_said_once_and_not_needed(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(readers.CACHE_ENV, str(blocker / "cache"))
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    caplog.set_level(logging.WARNING)
    src = open_source(path)
    assert "open cache not written" in caplog.text and readers.CACHE_ENV in caplog.text
    check_random_access(src, RECORDS)
    monkeypatch.setenv(readers.CACHE_ENV, "off")
    assert readers.cache_root() is None


def test_a_large_file_is_validated_in_parallel_as_in_one_pass(
    tmp_path, data_cache, monkeypatch, caplog
):
    # Parts of ~400 bytes over 2 processes (spawned, as on a many-core host): the records,
    # the skipped count and the first bad line named are those of one pass.
    monkeypatch.setattr(readers, "PARALLEL_BYTES", 400)
    monkeypatch.setattr(readers.os, "sched_getaffinity", lambda _: {0, 1})
    parallel = []
    real = JsonlSource._read_in_parallel
    monkeypatch.setattr(
        JsonlSource, "_read_in_parallel", lambda self, n: parallel.append(n) or real(self, n)
    )
    lines = [*RECORDS[:4], "", "{broken", *RECORDS[4:8], '{"query": "q"}', *RECORDS[8:]]
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    ranges = readers._line_ranges(path, 2)
    assert [r[0] for r in ranges] == [0, ranges[0][1]] and ranges[-1][1] == path.stat().st_size
    assert ranges[1][2] == 1 + path.read_bytes()[: ranges[1][0]].count(b"\n")
    src = open_source(path, skip_bad=True)
    assert parallel == [2] and src.skipped == 2
    assert "validated in one process" not in caplog.text  # the worker processes ran
    assert "big.jsonl:6: malformed JSON" in src._first_error
    check_random_access(src, RECORDS)
    # A part whose first record has another task is named before the part's own bad line.
    lines = [*RECORDS[:6], {**RECORDS[6], "task": "clustering"}, "{broken", *RECORDS[7:]]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    seventh = sum(len(x) + 1 for x in path.read_bytes().split(b"\n")[:6])
    size = path.stat().st_size
    monkeypatch.setattr(readers, "_line_ranges", lambda *_: [(0, seventh, 1), (seventh, size, 7)])
    with pytest.raises(RecordError, match=r"mixed\.jsonl:7: task 'clustering' differs"):
        open_source(path)
    assert parallel == [2, 2]


def test_a_large_parquet_file_is_validated_a_span_of_row_groups_a_process(
    tmp_path, data_cache, monkeypatch, caplog
):
    # 5 row groups of 4 rows, 2 spawned processes: the records, the skipped count, the first
    # bad row named and the conflict check are one pass's; the Arrow copy is a file a span.
    monkeypatch.setattr(readers, "PARALLEL_ROWS", 4)
    monkeypatch.setattr(readers.os, "sched_getaffinity", lambda _: {0, 1})
    spans = []
    real = ParquetSource._spans
    monkeypatch.setattr(ParquetSource, "_spans", lambda self: spans.append(real(self)) or spans[-1])
    rows = [(f"q{i}", f"p{i}", [f"n{i}"]) for i in range(20)]
    rows[5] = rows[13] = ("q", None, [])  # one bad row in each span
    path = write_f2llm(tmp_path / "f2.parquet", rows, 1, row_group_size=4)
    src = open_source(path, skip_bad=True)
    assert spans == [[(0, [0, 1, 2]), (12, [3, 4])]]
    assert "validated in one process" not in caplog.text  # the worker processes ran
    assert src.skipped == 2 and "f2.parquet:row 5: " in src._first_error
    expected = [
        {"query": q, "positive": p, "negatives": n, "task": "retrieval", "dataset": "f2"}
        for q, p, n in rows
        if p is not None
    ]
    check_random_access(src, expected)
    (entry,) = data_cache.iterdir()
    assert sorted(f.name for f in entry.glob("*.arrow")) == [
        "table-00000.arrow",
        "table-00001.arrow",
    ]
    monkeypatch.setattr(pq, "read_table", None)  # rows come from the two mapped files
    check_random_access(open_source(path, skip_bad=True), expected)
    with pytest.raises(RecordError, match=r"f2\.parquet:row 5: "):  # not row 13's error
        open_source(path)
    # The second span's first row has another task: named against row 0, before row 13.
    tasks = ["retrieval"] * 12 + ["clustering"] * 8
    mixed = write_f2llm(tmp_path / "mixed.parquet", rows, 1, 4, task=tasks)
    first = re.escape(f"{mixed}:row 0;")
    with pytest.raises(
        RecordError, match=rf"mixed\.parquet:row 12: task 'clustering' .* at {first}"
    ):
        open_source(mixed, skip_bad=True)
    # A datasets folder: its Arrow files read in row ranges of PARALLEL_ROWS, as row groups.
    datasets = pytest.importorskip("datasets")
    columns = {"query": [r[0] for r in rows], "passage": [r[1] for r in rows]}
    columns["negative_1"] = [r[2][0] if r[2] else None for r in rows]
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "f2"))
    spans.clear()
    hf = open_source(tmp_path / "f2", skip_bad=True)
    assert spans == [[(0, [0, 1, 2]), (12, [3, 4])]]
    assert hf.skipped == 2 and "f2:row 5: " in hf._first_error
    assert "validated in one process" not in caplog.text
    check_random_access(hf, expected)


def test_a_damaged_entry_or_a_restored_mtime_reads_the_file_again(tmp_path, data_cache, caplog):
    import os

    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    open_source(path)
    (entry,) = data_cache.iterdir()
    (entry / "lengths.npy").write_bytes(b"")  # a crash's leftover, or a cleaner's
    caplog.set_level(logging.WARNING)
    check_random_access(open_source(path), RECORDS)
    assert "unreadable" in caplog.text and (entry / "lengths.npy").stat().st_size > 0
    # Rewritten at the same size with its mtime put back (cp -p, tar): validated again.
    st = path.stat()
    text = path.read_text().replace('"positive": "positive 3 ', '"pozitive": "positive 3 ', 1)
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RecordError, match=r"pairs\.jsonl:4: missing field 'positive'"):
        open_source(path)


def test_no_worker_processes_from_a_daemon_and_conflicts_named_as_in_one_pass(
    tmp_path, data_cache, monkeypatch
):
    import multiprocessing

    monkeypatch.setattr(readers, "PARALLEL_BYTES", 100)
    monkeypatch.setattr(readers.os, "sched_getaffinity", lambda _: {0, 1})
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [*RECORDS[:8], {**RECORDS[8], "task": "clustering"}]
    )
    assert readers._parallel_workers(readers._own_parts(path)) == 2
    with monkeypatch.context() as m:  # a Grain worker is a daemon: it may not have children
        m.setattr(multiprocessing, "current_process", lambda: type("P", (), {"daemon": True}))
        assert readers._parallel_workers(readers._own_parts(path)) == 1
    # The conflict sits inside the last part: named against line 1, as one pass names it.
    size, second = path.stat().st_size, path.read_bytes().index(b"\n") + 1
    monkeypatch.setattr(readers, "_line_ranges", lambda *_: [(0, second, 1), (second, size, 2)])
    first = re.escape(f"{path}:1;")
    with pytest.raises(RecordError, match=rf"mixed\.jsonl:9: task 'clustering' .* at {first}"):
        open_source(path)


def test_tfds_reads_a_batch_at_once_as_one_at_a_time(tmp_path, capsys):
    """array_record's read([i]) costs time in proportion to the file's records: a batch is
    one read of many indices, with the same records as one at a time."""
    rows = [dict(r, dataset="toy") for r in RECORDS]
    src_file = write_jsonl(tmp_path / "toy.jsonl", rows)
    prepare_lib.main(["--input", str(src_file), "--out", str(tmp_path / "tfds")])
    src = open_source(tmp_path / "tfds")
    order = [3, 0, 10, 3, -1]
    calls = []
    data_source = src._source()
    batch_read = data_source.__getitems__
    data_source.__getitems__ = lambda keys: calls.append(list(keys)) or batch_read(keys)
    many = src.get_many(order)
    assert calls == [[3, 0, 10, 3, 10]]  # one read for the batch
    assert many == [src[i] for i in order] == [RECORDS[i] for i in order]
    assert src.get_many([]) == []
    with pytest.raises(IndexError):
        src.get_many([0, len(RECORDS)])
