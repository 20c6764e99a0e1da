"""`jaxembed.mine`: exact search against NumPy, the selection rules on hand-built scores,
outputs read back by the training readers, errors, 8 devices vs 1, and resumption."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import assert_close, launch_local, save_tiny_with_tokenizer, toy_records, write_jsonl

import jaxembed
from jaxembed import beir, embedding_cache, mining, search
from jaxembed import mine as mn
from jaxembed.data import readers

ONE_DEVICE = jax.devices()[:1]


# ------------------------------------------------------------------------------------------
# Search


def brute_force(q: np.ndarray, d: np.ndarray, k: int):
    s = q.astype(np.float64) @ d.astype(np.float64).T
    idx = np.broadcast_to(np.arange(len(d)), s.shape)
    order = np.lexsort((idx, -s), axis=-1)[:, :k]  # best first, ties: lower index first
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
def test_search_over_shards_equals_numpy_brute_force(integer):
    rng = np.random.default_rng(0)
    if integer:
        # Small integers: every dot product is exact, so equal scores are real ties and the
        # tie rule (lower index first) is checked across shards and blocks.
        q = rng.integers(-1, 2, (37, 8)).astype(np.float32)
        d = rng.integers(-1, 2, (203, 8)).astype(np.float32)
    else:
        q = rng.standard_normal((37, 16)).astype(np.float32)
        d = rng.standard_normal((203, 16)).astype(np.float32)
    shards = [d[:64], d[64:70], d[70:203]]  # uneven, one smaller than k
    for k in (10, 250):  # 250 > corpus: the tail is empty (-inf, -1)
        s, i = search.search_shards(q, shards, k, block=16, query_block=8)
        ref_s, ref_i = brute_force(q, d, min(k, len(d)))
        np.testing.assert_array_equal(i[:, : ref_i.shape[1]], ref_i)
        assert_close(s[:, : ref_s.shape[1]], ref_s)
        assert (i[:, len(d) :] == -1).all() and np.isneginf(s[:, len(d) :]).all()


def test_select_applies_the_rules_in_order():
    scores = np.array([0.9, 0.85, 0.7, 0.6, 0.5, -0.2, -np.inf])
    valid = np.array([True] * 6 + [False])
    record = {"query": "q", "positive": "p"}
    rules = dict(skip_top=1, max_score=0.8, relative_margin=0.05, sampling="top")
    take, (skip, cap, close) = mining.Rules(num_negatives=2, **rules).select(
        scores, valid, 0.72, record
    )
    assert skip.tolist() == [True] + [False] * 6
    assert cap.tolist() == [False, True] + [False] * 5  # 0.9 was skipped first
    assert close.tolist() == [False, False, True] + [False] * 4  # 0.7 >= 0.95 * 0.72
    assert take.tolist() == [3, 4]
    take, _ = mining.Rules(num_negatives=5, **rules).select(scores, valid, 0.72, record)
    assert take.tolist() == [3, 4, 5]  # too few: what there is
    # A negative positive score: the threshold stays below it (-0.1 - 0.5 * 0.1).
    s = np.array([-0.12, -0.16])
    strict = mining.Rules(skip_top=0, max_score=None, relative_margin=0.5, num_negatives=2)
    _, (_, _, close) = strict.select(s, np.ones(2, bool), -0.1, record)
    assert close.tolist() == [True, False]


# ------------------------------------------------------------------------------------------
# Selection rules with a word-count encoder: exact, hand-computable cosines


class WordEncoder:
    """One orthogonal axis per distinct word: cos(a, b) = shared words / sqrt(|a| |b|)."""

    dim = 1024
    prompts: dict = {}  # noqa: RUF012
    name = ""
    max_length = 512
    pooling = "mean"

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def use_mesh(self, mesh):
        return self

    def encode(self, texts, prompt_name=None, batch_size=32, *, prompt=None):
        self.calls += len(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for n, t in enumerate(texts):
            for w in ((prompt or "") + t).split():
                out[n, self.vocab.setdefault(w, len(self.vocab))] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def row_shape(self, query=False):
        return (self.dim,)

    def encode_for_search(self, texts, prompt="", *, query=False, batch_size=32):
        return self.encode(texts, batch_size=batch_size, prompt=prompt)


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


Q1 = "apple banana cherry"
P1 = f"{Q1} {words('p', 17)}"  # score 3 / sqrt(3 * 20)
NEAR_DUP = f"{Q1} {words('p', 16)} changed"  # the same score as P1: a false negative
Q2 = "kiwi lemon mango"
P2A = f"{Q2} {words('a', 17)}"
P2B = f"{Q2} {words('b', 17)}"


@pytest.fixture(scope="module")
def word_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("words")
    recs = [
        {"query": Q1, "positive": P1},
        {"query": Q2, "positive": P2A},  # one query, two positives
        {"query": Q2, "positive": P2B},
    ]
    recs = [{**r, "task": "retrieval", "dataset": "words"} for r in recs]
    corpus = [
        P1,  # the positive, also in the corpus: never a negative
        NEAR_DUP,
        *(f"apple banana {words(f'x{j}_', 18)}" for j in range(6)),  # 2 shared words
        *(f"kiwi lemon {words(f'y{j}_', 18)}" for j in range(6)),
        *(f"unrelated {words(f'z{j}_', 5)}" for j in range(6)),
        P1,  # a duplicate: deduplicated
    ]
    write_jsonl(folder / "pairs.jsonl", recs)
    (folder / "corpus.txt").write_text("\n".join(corpus) + "\n")
    return folder


def run_words(folder: Path, out: Path, **kw):
    kw = {"skip_top": 0, "max_score": None, "top_k": 10, "num_negatives": 5, **kw}
    return mn.mine(
        WordEncoder(),
        folder / "pairs.jsonl",
        out,
        corpus=folder / "corpus.txt",
        devices=ONE_DEVICE,
        progress=False,
        **kw,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_relative_margin_removes_a_planted_near_duplicate(word_data, tmp_path):
    stats = run_words(word_data, tmp_path / "plain.jsonl", relative_margin=None)
    plain = read_jsonl(tmp_path / "plain.jsonl")
    # Without the margin the near-duplicate is the hardest "negative"; the positive itself
    # (present twice in the corpus) never is.
    assert plain[0]["negatives"][0] == NEAR_DUP
    assert P1 not in plain[0]["negatives"]
    assert stats["corpus_duplicates"] == 1

    stats = run_words(word_data, tmp_path / "margin.jsonl", relative_margin=0.05, with_scores=True)
    rows = read_jsonl(tmp_path / "margin.jsonl")
    assert NEAR_DUP not in rows[0]["negatives"]
    pos = 3 / np.sqrt(60)
    assert rows[0]["scores"][0] == pytest.approx(pos, abs=1e-6)
    # The 2-word distractors score 2/3 of the positive: kept, best first.
    assert rows[0]["negatives"][0].startswith("apple banana x")
    assert rows[0]["scores"][1] == pytest.approx(2 / np.sqrt(60), abs=1e-6)
    assert all(s < 0.95 * pos for s in rows[0]["scores"][1:])
    assert stats["candidates"]["relative_margin"] >= 1
    assert stats["scores"]["relative_margin"]["max"] == pytest.approx(pos, abs=1e-6)


def test_every_positive_of_a_query_is_excluded_for_all_its_records(word_data, tmp_path):
    stats = run_words(word_data, tmp_path / "out.jsonl", relative_margin=None)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["positive"] for r in rows] == [P1, P2A, P2B]  # one record per input record
    for r in rows[1:]:
        assert P2A not in r["negatives"] and P2B not in r["negatives"]
        assert r["negatives"][0].startswith("kiwi lemon y")
    assert stats["queries_in"] == 2 and stats["records_in"] == 3


def test_skip_cap_too_few_and_random_sampling(word_data, tmp_path):
    # max_score 0.2 drops the 2-word distractors (0.258) and leaves only the unrelated ones.
    common = dict(relative_margin=None, max_score=0.2, top_k=30, num_negatives=25)
    keep = run_words(word_data, tmp_path / "keep.jsonl", too_few="keep", **common)
    assert keep["records_out"] == 3 and keep["records_short_kept"] == 3
    assert keep["candidates"]["max_score"] > 0
    drop = run_words(word_data, tmp_path / "drop.jsonl", too_few="drop", **common)
    assert drop["records_out"] == 0 and drop["records_dropped_too_few"] == 3
    assert drop["queries_out"] == 0

    skip = run_words(word_data, tmp_path / "skip.jsonl", relative_margin=None, skip_top=2)
    plain = run_words(word_data, tmp_path / "plain.jsonl", relative_margin=None)
    assert skip["candidates"]["skip_top"] == 6
    rows_skip, rows_plain = (
        read_jsonl(tmp_path / "skip.jsonl"),
        read_jsonl(tmp_path / "plain.jsonl"),
    )
    assert rows_skip[0]["negatives"][:3] == rows_plain[0]["negatives"][2:5]
    assert plain["negatives_per_record"]["counts"] == {"5": 3}

    kw = dict(relative_margin=None, sampling="random", num_negatives=3, top_k=20, seed=1)
    run_words(word_data, tmp_path / "r1.jsonl", **kw)
    run_words(word_data, tmp_path / "r2.jsonl", **kw)
    assert (tmp_path / "r1.jsonl").read_bytes() == (tmp_path / "r2.jsonl").read_bytes()
    r = read_jsonl(tmp_path / "r1.jsonl")[0]["negatives"]
    assert len(r) == 3 and P1 not in r


def test_outputs_read_back_by_the_training_readers(word_data, tmp_path, monkeypatch):
    stats = run_words(word_data, tmp_path / "o.jsonl", relative_margin=None, with_scores=True)
    monkeypatch.setattr(mn, "PARQUET_ROW_GROUP", 2)  # rows streamed out in groups: 2 + 1
    run_words(word_data, tmp_path / "o.parquet", relative_margin=None, with_scores=True)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "o.parquet").metadata.num_row_groups == 2
    from_jsonl = readers.open_source(tmp_path / "o.jsonl")
    from_parquet = readers.open_source(tmp_path / "o.parquet")
    assert len(from_jsonl) == len(from_parquet) == 3
    for n in range(3):
        assert from_jsonl[n] == from_parquet[n]
        assert len(from_jsonl[n]["negatives"]) == 5
    saved = json.loads((tmp_path / "o.jsonl.stats.json").read_text())
    assert saved["records_out"] == stats["records_out"] == 3
    assert saved["scores"]["kept"]["count"] == 15
    assert set(saved["scores"]) == {"positive", "kept", *mn.DROP_REASONS}
    with pytest.raises(mn.MiningError, match="exists; pass overwrite"):
        run_words(word_data, tmp_path / "o.jsonl")
    run_words(word_data, tmp_path / "o.jsonl", overwrite=True)


def test_instruction_queries_use_the_training_template(tmp_path):
    recs = [
        {"query": "apple", "positive": "apple pie", "instruction": "Find", "task": "retrieval"},
        {"query": "apple", "positive": "apple tart", "task": "retrieval"},  # no instruction
    ]
    write_jsonl(tmp_path / "in.jsonl", recs)
    enc = WordEncoder()
    stats = mn.mine(
        enc, tmp_path / "in.jsonl", tmp_path / "o.jsonl", top_k=2, skip_top=0, num_negatives=1,
        max_score=None, relative_margin=None, devices=ONE_DEVICE, progress=False,
    )  # fmt: skip
    assert stats["queries_in"] == 2  # different model inputs: different queries
    assert "Instruct:" in enc.vocab and "Query:" in enc.vocab
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert rows[0]["instruction"] == "Find" and "instruction" not in rows[1]
    assert rows[0]["negatives"] == ["apple tart"] and rows[0]["dataset"] == "in"


# ------------------------------------------------------------------------------------------
# Errors


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: list[str], split="train"):
    folder.mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [{"_id": k, "text": v} for k, v in corpus.items()])
    write_jsonl(folder / "queries.jsonl", [{"_id": k, "text": v} for k, v in queries.items()])
    (folder / "qrels").mkdir()
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels)
    )
    return folder


def test_beir_input_and_its_errors(tmp_path):
    corpus = {"d1": "apple pie", "d2": "apple tart", "d3": "pear cake", "d4": "apple crumble"}
    beir = write_beir(tmp_path / "set", corpus, {"q1": "apple"}, ["q1\td1\t1", "q1\td3\t0"])
    stats = mn.mine(
        WordEncoder(), beir, tmp_path / "o.jsonl", top_k=3, skip_top=0, num_negatives=3,
        max_score=None, relative_margin=None, devices=ONE_DEVICE, progress=False,
    )  # fmt: skip
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert stats["records_in"] == 1 and rows[0]["positive"] == "apple pie"
    assert rows[0]["dataset"] == "set" and "pear cake" in rows[0]["negatives"]  # grade 0

    bad = write_beir(tmp_path / "bad", corpus, {"q1": "apple"}, ["q1\td9\t1"])
    with pytest.raises(mn.MiningError, match=r"qrels/train\.tsv:2: corpus id 'd9' is not in"):
        mn.mine(WordEncoder(), bad, tmp_path / "b.jsonl", devices=ONE_DEVICE)


def test_a_corpus_file_is_read_from_disk_as_the_list_it_stands_for(tmp_path):
    """`CorpusFile` keeps offsets and keys, not texts, and reads back what `read_corpus`
    (a list) holds; the pool built over it equals the pool over the list."""
    import gzip

    rows = [
        {"_id": "a", "title": "Apple", "text": "a red fruit"},
        {"_id": "b", "text": "pear cake"},
        {"_id": "e", "text": "  "},  # empty: skipped and counted
        {"_id": "c", "text": "pear cake"},  # a duplicate
        {"_id": "d", "text": "plum ünïcode"},
    ]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    plain = tmp_path / "c.txt"
    plain.write_text("one\r\n\ntwo\none\n")
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    expect = {
        jsonl: ["Apple a red fruit", "pear cake", "pear cake", "plum ünïcode"],
        gz: ["Apple a red fruit", "pear cake", "pear cake", "plum ünïcode"],
        plain: ["one", "two", "one"],
    }
    records = [{"query": "q", "positive": "pear cake"}, {"query": "r", "positive": "fig"}]
    for path, texts in expect.items():
        docs = mining.CorpusFile(path)
        assert list(docs) == [docs[i] for i in range(len(docs))] == texts, path
        assert docs.skipped == 1 and mining.read_corpus(path) == (texts, 1)
        assert (docs._texts is None) == (path.suffix != ".gz")  # only .gz held in memory
        from_file = mining.candidate_pool(docs, records)
        from_list = mining.candidate_pool(texts, records)
        new = [t for t in ("pear cake", "fig") if t not in texts]  # positives not in it
        assert list(from_file.texts) == list(from_list.texts) == [*dict.fromkeys(texts), *new]
        assert from_file.duplicates == from_list.duplicates == 1
        np.testing.assert_array_equal(from_file.positive, from_list.positive)
        np.testing.assert_array_equal(from_file.hashes, from_list.hashes)
        assert [from_file.texts[int(i)] for i in from_file.positive] == ["pear cake", "fig"]
    docs = mining.CorpusFile(jsonl)
    jsonl.write_text(jsonl.read_text().replace("pear", "PEAR"))  # rewritten while in use
    with pytest.raises(beir.EvalDataError, match=r"c\.jsonl: changed while in use"):
        docs[1]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(beir.EvalDataError, match=r"bad\.jsonl:2: expected an object"):
        mining.CorpusFile(tmp_path / "bad.jsonl")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(beir.EvalDataError, match=r"bad\.txt:2: not UTF-8"):
        mining.CorpusFile(tmp_path / "bad.txt")


def test_errors_name_the_problem(word_data, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(beir.EvalDataError, match=r"empty\.txt: the corpus is empty"):
        mn.mine(
            WordEncoder(), word_data / "pairs.jsonl", tmp_path / "o.jsonl",
            corpus=tmp_path / "empty.txt", devices=ONE_DEVICE,
        )  # fmt: skip
    (tmp_path / "nomodel").mkdir()
    with pytest.raises(mn.MiningError, match=r"cannot load model .*nomodel"):
        mn.mine(tmp_path / "nomodel", word_data / "pairs.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(mn.MiningError, match="raise top_k"):
        mn.mine(WordEncoder(), word_data / "pairs.jsonl", tmp_path / "o.jsonl", top_k=20)
    (tmp_path / "bad.jsonl").write_text('{"query": "q"}\n')
    with pytest.raises(mn.MiningError, match=r"bad\.jsonl:1: missing field 'positive'"):
        mn.mine(WordEncoder(), tmp_path / "bad.jsonl", tmp_path / "o.jsonl")


# ------------------------------------------------------------------------------------------
# A real (tiny) model: the mesh, the cache and the CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mine")
    model = save_tiny_with_tokenizer("bert", folder / "model", num_hidden_layers=1)
    recs = toy_records("toy", "retrieval", 40, 0)
    recs += [{**recs[3], "positive": "Another package about kernel tools."}]  # 2 positives
    write_jsonl(folder / "pairs.jsonl", recs)
    topics = ["network", "python", "kernel", "music", "database", "editor"]
    corpus = [f"Package {i} for {topics[i % 6]} work, version {i % 7}." for i in range(90)]
    (folder / "corpus.txt").write_text("\n".join(corpus) + "\n")
    return folder, model


SETTINGS = dict(top_k=20, skip_top=2, max_score=0.9, relative_margin=0.005, num_negatives=8)
SETTINGS.update(batch_size=16, shard_size=32, with_scores=True, progress=False)


@pytest.fixture(scope="module")
def one_device_run(tiny, tmp_path_factory):
    folder, model = tiny
    out = tmp_path_factory.mktemp("one") / "out.jsonl"
    enc = jaxembed.load(model)
    stats = mn.mine(
        enc, folder / "pairs.jsonl", out, corpus=folder / "corpus.txt", devices=ONE_DEVICE,
        **SETTINGS,
    )  # fmt: skip
    return enc, out, stats


def test_eight_devices_equal_one_device(tiny, one_device_run, tmp_path, capsys):
    folder, model = tiny
    _, one_out, one_stats = one_device_run
    out = tmp_path / "out.jsonl"
    argv = [
        "--model", str(model), "--input", str(folder / "pairs.jsonl"),
        "--corpus", str(folder / "corpus.txt"), "--out", str(out), "--top-k", "20",
        "--skip-top", "2", "--max-score", "0.9", "--relative-margin", "0.005",
        "--num-negatives", "8", "--batch-size", "16", "--shard-size", "32", "--with-scores",
    ]  # fmt: skip
    stats = mn.main(argv)
    assert stats["devices"] == 8 and one_stats["devices"] == 1
    assert "docs/s" in capsys.readouterr().err
    a, b = read_jsonl(one_out), read_jsonl(out)
    assert len(a) == len(b) == 41
    assert stats["records_out"] == one_stats["records_out"]
    assert stats["candidates"] == one_stats["candidates"]
    assert min(stats["candidates"].values()) > 0  # every rule took part (130 kept)
    for ra, rb in zip(a, b, strict=True):
        assert ra["negatives"] == rb["negatives"]
        assert_close(ra["scores"], rb["scores"])
    # The query with two positives: neither is a negative of either record.
    both = {a[3]["positive"], a[40]["positive"]}
    assert not both & set(a[3]["negatives"]) and not both & set(a[40]["negatives"])


def test_two_hosts_equal_one_device(tiny, one_device_run, tmp_path):
    """Two processes x 4 devices (launch/local.sh): encoding split over both hosts, process 0
    writes the cache, the output and the stats."""
    folder, model = tiny
    _, one_out, _ = one_device_run
    out = tmp_path / "out.jsonl"
    argv = [
        "-m", "jaxembed.mine", "--model", str(model), "--input", str(folder / "pairs.jsonl"),
        "--corpus", str(folder / "corpus.txt"), "--out", str(out), "--top-k", "20",
        "--skip-top", "2", "--max-score", "0.9", "--relative-margin", "0.005",
        "--num-negatives", "8", "--batch-size", "16", "--shard-size", "32", "--with-scores",
        "--no-progress",
    ]  # fmt: skip
    rc, log = launch_local(2, argv)
    assert rc == 0, log
    assert "[0] wrote" in log and "[1] wrote" not in log
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert stats["devices"] == 8
    a, b = read_jsonl(one_out), read_jsonl(out)
    assert len(a) == len(b) == 41
    for ra, rb in zip(a, b, strict=True):
        assert ra["negatives"] == rb["negatives"]
        assert_close(ra["scores"], rb["scores"])
    assert (
        len(list(Path(f"{out}.cache").rglob("shard_*.npy")))
        == stats["cache"]["corpus"]["shards"] + stats["cache"]["queries"]["shards"]
    )


class Interrupted(Exception):
    """Stands for a crash or a kill while the embeddings are being encoded."""


def test_resume_after_interruption_gives_the_same_output(
    tiny, one_device_run, tmp_path, caplog, monkeypatch
):
    folder, _ = tiny
    enc, full_out, full_stats = one_device_run
    out = tmp_path / "out.jsonl"
    kw = dict(corpus=folder / "corpus.txt", devices=ONE_DEVICE, **SETTINGS)
    write_shard, written = embedding_cache.write_shard, []

    def write_two_shards_then_die(path, emb):
        if len(written) == 2:  # the 3rd call: encoded, but the run dies before saving it
            raise Interrupted(path)
        written.append(path)
        return write_shard(path, emb)

    with monkeypatch.context() as m:
        m.setattr(embedding_cache, "write_shard", write_two_shards_then_die)
        with pytest.raises(Interrupted):
            mn.mine(enc, folder / "pairs.jsonl", out, **kw)
    assert len(written) == 2 and not out.exists()
    stats = mn.mine(enc, folder / "pairs.jsonl", out, **kw)
    corpus_cache = stats["cache"]["corpus"]
    # 90 corpus docs and 41 positives: 131 rows, 5 shards of 32.
    assert corpus_cache["shards"] == full_stats["cache"]["corpus"]["shards"] == 5
    assert corpus_cache["reused"] == 2 and corpus_cache["encoded"] == 3
    assert out.read_bytes() == full_out.read_bytes()

    # A changed corpus invalidates the cache, and says so.
    (tmp_path / "corpus.txt").write_text((folder / "corpus.txt").read_text() + "one more\n")
    kw["corpus"] = tmp_path / "corpus.txt"
    with caplog.at_level(logging.INFO, logger="jaxembed.embedding_cache"):
        stats = mn.mine(enc, folder / "pairs.jsonl", out, overwrite=True, **kw)
    assert "is stale (changed: count, texts_sha256)" in caplog.text
    assert stats["cache"]["corpus"]["reused"] == 0
    assert stats["cache"]["queries"]["reused"] == stats["cache"]["queries"]["shards"]


def test_help_describes_the_rules(capsys):
    with pytest.raises(SystemExit):
        mn.main(["--help"])
    text = capsys.readouterr().out
    for opt in ("--top-k", "--skip-top", "--max-score", "--relative-margin", "--too-few"):
        assert opt in text


def test_top_k_above_the_pool_is_capped_and_said(word_data, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="jaxembed.mine"):
        run_words(word_data, tmp_path / "capped.jsonl", top_k=1000)
    assert "--top-k 1000 exceeds the 22 candidates: capped at 22" in caplog.text
    # The same rows as an uncapped search over the whole pool gives.
    run_words(word_data, tmp_path / "all.jsonl", top_k=22)
    assert read_jsonl(tmp_path / "capped.jsonl") == read_jsonl(tmp_path / "all.jsonl")


def test_logs_its_own_lines_not_jaxs():
    """mine logs its progress at INFO, not JAX's INFO lines: on a CPU host without
    JAX_PLATFORMS, JAX logs "Unable to initialize backend 'tpu' ... libtpu.so" at INFO."""
    probe = (
        "import logging; from jaxembed import mine; mine.configure_logging(); "
        "print(logging.getLogger('jaxembed.mine').isEnabledFor(logging.INFO), "
        "logging.getLogger('jax._src.xla_bridge').isEnabledFor(logging.INFO))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == ["True", "False"], done.stdout + done.stderr
