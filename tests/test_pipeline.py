"""The Grain pipeline: one dataset per global batch, host slicing, negatives, exact resume."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from helpers import minilm_path

from jaxembed.data import pipeline
from jaxembed.data.pipeline import BatchBuilder, PipelineConfig
from jaxembed.packing import text_hash


class ListSource:
    """An in-memory random-access source (what the readers provide)."""

    def __init__(self, name, task, records):
        self.name, self.task, self.records = name, task, records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def make_source(name, task, n, n_neg, instruction=None):
    records = []
    for i in range(n):
        rec = {
            "query": f"{name} question {i}",
            "positive": f"{name} answer {i} " + "word " * (i % 7),
            "negatives": [f"{name} wrong {i}.{j}" for j in range(n_neg)],
            "task": task,
            "dataset": name,
        }
        if instruction:
            rec["instruction"] = instruction
        records.append(rec)
    return ListSource(name, task, records)


SOURCES = [
    make_source("alpha", "retrieval", 40, 10, instruction="Find the answer"),
    make_source("beta", "classification", 24, 3),
    make_source("gamma", "clustering", 16, 2),
]
CFG = PipelineConfig(global_batch=8, seed=3, max_query_length=32, max_passage_length=32)
STEPS = 20  # 5 + 3 + 2 = 10 batches per epoch: two full epochs


# What a host batch holds: token ids (lists of id lists) and the arrays of its rows.
TOKENS, ARRAYS = ("query", "pos", "neg"), ("neg_valid", "pos_hash", "neg_hash")


def assert_same(a: dict, b: dict) -> None:
    for key in TOKENS:
        assert a[key] == b[key], key
    for key in ARRAYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def builder(process_index=0, process_count=1, cfg=CFG, sources=SOURCES):
    return BatchBuilder(sources, str(minilm_path()), cfg, STEPS, process_index, process_count)


@pytest.fixture(scope="module")
def single_host():
    b = builder()
    return [b(s) for s in range(STEPS)]


def test_each_batch_is_one_dataset_and_epochs_cover_every_batch(single_host):
    names = [b["dataset"] for b in single_host]
    for epoch in (names[:10], names[10:]):
        assert sorted(epoch) == ["alpha"] * 5 + ["beta"] * 3 + ["gamma"] * 2
    assert names[:10] != names[10:]  # the order is reshuffled per epoch
    for b in single_host:
        task = {"alpha": "retrieval", "beta": "classification", "gamma": "clustering"}[b["dataset"]]
        assert b["task"] == task
        k = {"retrieval": 7, "classification": 1, "clustering": 7}[task]
        assert len(b["neg"]) == 8 * k and b["neg_valid"].shape == (8, k)
        assert len(b["query"]) == len(b["pos"]) == 8
        assert 0 < max(map(len, b["query"])) <= CFG.max_query_length
    # Every row of a dataset appears once per epoch (remainders dropped).
    seen = {}
    for b in single_host[:10]:
        seen.setdefault(b["dataset"], set()).update(b["pos_hash"].tolist())
    assert len(seen["alpha"]) == 40 and len(seen["beta"]) == 24 and len(seen["gamma"]) == 16


def test_hosts_agree_and_slices_add_up(single_host):
    hosts = [builder(h, 2) for h in range(2)]
    for s in range(0, STEPS, 3):
        parts = [h(s) for h in hosts]
        assert parts[0]["dataset"] == parts[1]["dataset"] == single_host[s]["dataset"]
        # Each host's slice of the global batch; together, the batch one host would build.
        joined = {k: parts[0][k] + parts[1][k] for k in TOKENS}
        joined |= {k: np.concatenate([p[k] for p in parts]) for k in ARRAYS}
        assert_same(joined, single_host[s])
        # Each host's row length is its own bucket; the largest is the whole batch's.
        packing = pipeline.Packing(CFG.buckets("query"), CFG.buckets("passage"), 1, 1)
        for kind in ("query", "passage"):
            most = max(packing.lengths(p)[kind] for p in parts)
            assert most == packing.lengths(single_host[s])[kind]


def test_negatives_instruction_and_hashes(single_host):
    tok = builder().tokenizer
    alpha = next(b for b in single_host if b["dataset"] == "alpha")
    assert alpha["neg_valid"].all()  # 10 stored, 7 sampled
    text = tok.decode(alpha["query"][0], skip_special_tokens=True)
    assert text.startswith("instruct : find the answer query : alpha question")
    gamma = next(b for b in single_host if b["dataset"] == "gamma")
    assert gamma["neg_valid"].sum(1).tolist() == [2] * 8  # only 2 stored: 5 padded slots
    absent = [r * 7 + t for r, t in zip(*np.nonzero(~gamma["neg_valid"]), strict=True)]
    assert len(absent) == 40 and all(gamma["neg"][i] == [] for i in absent)
    assert (gamma["neg_hash"][~gamma["neg_valid"]] == 0).all()
    # Sampled negatives come from the row's own pool and differ across rows.
    row = tok.decode(alpha["neg"][0], skip_special_tokens=True)
    pos = tok.decode(alpha["pos"][0], skip_special_tokens=True)
    assert row.split()[2].split(".")[0] == pos.split()[2]
    assert text_hash("x") == text_hash("x") != text_hash("y")
    # Deterministic: a fresh builder (and a pickled one, as in a worker) gives the same batch.
    assert_same(pickle.loads(pickle.dumps(builder()))(7), single_host[7])


def test_random_negatives_are_other_rows_positives(single_host):
    # The control for mined negatives: as many negatives per row, drawn from the dataset's
    # other positives, never the row's own, the same on every call; the stored pool unused.
    cfg = PipelineConfig(**{**CFG.__dict__, "negatives": "random"})
    b = builder(cfg=cfg)
    tok = b.tokenizer
    for step in range(STEPS):
        batch = b(step)
        if batch["dataset"] != "alpha":
            continue
        assert batch["neg_valid"].all()  # 7 per row, as with mined ones
        for r in range(len(batch["pos"])):
            pos = tok.decode(batch["pos"][r], skip_special_tokens=True)
            negs = [tok.decode(batch["neg"][r * 7 + t], skip_special_tokens=True) for t in range(7)]
            assert len(set(negs)) == 7 and pos not in negs
            assert all(n.startswith("alpha answer") and "wrong" not in n for n in negs)
        assert builder(cfg=cfg)(step)["neg"] == batch["neg"]
        assert batch["neg"] != single_host[step]["neg"]
    with pytest.raises(ValueError, match=r"config\.data\.negatives='hard'"):
        PipelineConfig(global_batch=8, negatives="hard")


def test_negative_links_match_the_plain_definition_on_shared_and_repeated_texts():
    # Positives shared by several rows, a negative repeated within a row, a row's own
    # positive among its negatives, negatives nobody has as positive: the sorted-search
    # links equal the definition written as dictionaries.
    rng = np.random.default_rng(0)
    records = [
        {
            "query": f"q{i}",
            "positive": f"p{rng.integers(60)}",
            "negatives": [f"p{j}" for j in rng.integers(80, size=rng.integers(0, 6))],
            "task": "retrieval",
            "dataset": "d",
        }
        for i in range(100)
    ]
    by_positive: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_positive.setdefault(r["positive"], []).append(i)
    want = [
        list(dict.fromkeys(j for t in r["negatives"] for j in by_positive.get(t, ())))
        for r in records
    ]
    links = pipeline.negative_links(ListSource("d", "retrieval", records))
    assert len(links) == len(records)
    assert [links[i].tolist() for i in range(len(records))] == want
    assert sum(map(len, want)) > 100  # the case is not empty


def test_negative_groups_put_rows_with_their_hard_negatives():
    # Row i's mined negatives are the positives of rows i+1 and i+2 (mod n): groups follow
    # those links, so a batch holds each row's hard negatives as in-batch candidates.
    n = 48
    records = [
        {
            "query": f"q{i}",
            "positive": f"p{i}",
            "negatives": [f"p{(i + 1) % n}", f"p{(i + 2) % n}", "not a positive"],
            "task": "retrieval",
            "dataset": "ring",
        }
        for i in range(n)
    ]
    links = pipeline.negative_links(ListSource("ring", "retrieval", records))
    assert [links[i].tolist() for i in range(2)] == [[1, 2], [2, 3]]
    order = pipeline.negative_groups(links, 8, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n))  # a permutation: every row once
    again = pipeline.negative_groups(links, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(order, again)
    # Nearly every row follows, within a group's span, a row that mined it as a negative
    # (in a random order about 3 in 10). Groups end early only where the ring's rows are used up.
    linked = sum(
        any(row in links[prev] for prev in order[max(0, k - 7) : k])
        for k, row in enumerate(order.tolist())
    )
    assert linked >= 0.7 * n, linked

    cfg = PipelineConfig(global_batch=8, seed=1, group_size=4, max_query_length=8,
                         max_passage_length=8)  # fmt: skip
    b = BatchBuilder([ListSource("ring", "retrieval", records)], str(minilm_path()), cfg, 6)
    rows = b._rows(0, 0, 0)
    positives = {f"p{i}" for i in rows}
    hits = sum(f"p{(i + 1) % n}" in positives for i in rows)
    assert hits >= 4  # random batches of 8 from 48 rows would hold ~1
    with pytest.raises(ValueError, match=r"config\.data\.group_size=9 must lie in 0\.\.8"):
        PipelineConfig(global_batch=8, group_size=9)


def shout(record: dict, rng) -> str:
    """A query transform for the tests: the query in capitals and a word drawn from ``rng``."""
    return f"{record['query'].upper()} {rng.choice(['zebra', 'yak'])}"


def test_a_query_transform_rewrites_a_fraction_of_queries_the_same_every_time(single_host):
    """data.query_transform (MODULE:FUNCTION) on a query_transform_rate fraction of training
    queries, one coin per row, the function drawing from the row's own generator: the same
    rows, the same rewrites, on every call and in every worker; passages untouched."""
    cfg = PipelineConfig(
        **{**CFG.__dict__, "query_transform": "test_pipeline:shout", "query_transform_rate": 0.5}
    )
    half = builder(cfg=cfg)
    tok = half.tokenizer
    changed = rows = 0
    for step in range(STEPS):
        clean, mixed = single_host[step], half(step)
        assert mixed["pos"] == clean["pos"] and mixed["neg"] == clean["neg"]  # queries only
        for c, m in zip(clean["query"], mixed["query"], strict=True):
            text = tok.decode(m, skip_special_tokens=True)
            rewritten = text.endswith((" zebra", " yak"))
            assert rewritten == (m != c), text  # a row is rewritten whole, or left alone
            changed += rewritten
            rows += 1
        if clean["dataset"] == "alpha":  # the instruction template stays around the query
            assert tok.decode(mixed["query"][0], skip_special_tokens=True).startswith(
                "instruct : find the answer query :"
            )
    assert 0.35 < changed / rows < 0.65, changed / rows
    assert half(3)["query"] == builder(cfg=cfg)(3)["query"]  # the same coins every time
    with pytest.raises(ValueError, match=r"config\.data\.query_transform_rate=1\.5 must lie"):
        PipelineConfig(
            global_batch=8, query_transform="test_pipeline:shout", query_transform_rate=1.5
        )
    with pytest.raises(ValueError, match=r"query_transform_rate=0\.5 needs config\.data\.query_tr"):
        PipelineConfig(global_batch=8, query_transform_rate=0.5)
    with pytest.raises(ValueError, match=r"'nowhere:shout': cannot import nowhere"):
        PipelineConfig(global_batch=8, query_transform="nowhere:shout")
    with pytest.raises(ValueError, match=r"'test_pipeline:nothing': expected MODULE:FUNCTION"):
        PipelineConfig(global_batch=8, query_transform="test_pipeline:nothing")


def test_few_shapes_round_row_counts_to_two_significant_binary_digits():
    exact = pipeline.Packing((16,), (16,), granule=2, num_segments=4)
    few = pipeline.Packing((16,), (16,), granule=2, num_segments=4, few_shapes=True)
    ladder = {2 * m for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
    for needed in range(1, 200):
        rows = few.rows(needed)
        assert rows in ladder and rows >= exact.rows(needed) >= needed, needed
        assert rows == min(r for r in ladder if r >= needed), needed  # the next one, no further
    # Row counts of 18..28 needed (a packed tower of 32 texts) meet 2 shapes, not 6.
    assert {few.rows(n) for n in range(18, 29)} == {24, 32}
    assert len({exact.rows(n) for n in range(18, 29)}) == 6


def test_resume_is_exact_across_epochs_and_datasets(single_host):
    ds = pipeline.make_dataset(builder())
    it = pipeline.make_iterator(ds)
    first = [next(it) for _ in range(7)]
    state = it.get_state()
    rest = [next(it) for _ in range(STEPS - 7)]
    resumed = pipeline.make_iterator(pipeline.make_dataset(builder()))
    resumed.set_state(state)
    again = [next(resumed) for _ in range(STEPS - 7)]
    for a, b, ref in zip(rest, again, single_host[7:], strict=True):
        assert a["step"] == b["step"] == ref["step"]
        assert_same(a, b)
        assert_same(a, ref)
    assert [int(b["step"]) for b in first] == list(range(7))


def test_worker_processes_give_the_same_batches(single_host):
    it = pipeline.make_iterator(pipeline.make_dataset(builder()), workers=2)
    for s in range(6):
        b = next(it)
        assert int(b["step"]) == s
        assert_same(b, single_host[s])


def test_temperature_mixing_and_errors():
    cfg = PipelineConfig(global_batch=8, seed=0, mixing="temperature", mixing_temperature=2.0)
    sched = pipeline.Schedule([800, 80], 8, 2000, cfg)
    share = (sched.choices == 0).mean()
    expected = 800**0.5 / (800**0.5 + 80**0.5)
    assert abs(share - expected) < 0.03
    d, _, j = sched.lookup(1999)
    assert 0 <= j < sched.batches[d]
    with pytest.raises(ValueError, match=r"fewer rows \(\[4\]\) than one global batch \(8\)"):
        pipeline.Schedule([80, 4], 8, 10, cfg)
    with pytest.raises(ValueError, match="global batch 8 is not divisible by the 3 hosts"):
        builder(0, 3)
    with pytest.raises(ValueError, match=r"mixing='uniform' is not allowed; choose one of \['rem"):
        PipelineConfig(global_batch=8, mixing="uniform")


def test_teacher_scores_follow_the_sampled_negatives():
    """Each row's teacher scores (positive, then the sampled negatives) travel with the texts;
    rows without scores and padded negatives are NaN; a bad scores field names its line."""
    from jaxembed.data.records import RecordError, check_record

    scored = make_source("scored", "retrieval", 16, 10)
    for i, rec in enumerate(scored.records):
        if i % 4:  # every fourth row has no scores
            rec["scores"] = [100.0 + i] + [i + j / 100 for j in range(10)]
    b = builder(sources=[scored])
    for step in range(2):
        batch = b(step)
        teacher = batch["teacher"]
        assert teacher.shape == (8, 8) and teacher.dtype == np.float32
        by_hash = {text_hash(r["positive"]): r for r in scored.records}
        for row in range(8):
            rec = by_hash[int(batch["pos_hash"][row])]
            if "scores" not in rec:
                assert np.isnan(teacher[row]).all()
                continue
            assert teacher[row, 0] == rec["scores"][0]
            for t in range(7):
                j = [text_hash(x) for x in rec["negatives"]].index(int(batch["neg_hash"][row, t]))
                assert teacher[row, 1 + t] == np.float32(rec["scores"][1 + j])
    good = dict(scored.records[1])
    with pytest.raises(
        RecordError, match=r"f.jsonl:3: field 'scores' has 2 numbers; expected 1 \+ 10"
    ):
        check_record(dict(good, scores=[1.0, 2.0]), "f.jsonl:3")
    with pytest.raises(RecordError, match=r"f.jsonl:4: scores\[1\] must be a finite number"):
        check_record(dict(good, scores=[0.0, float("nan")] + [0.0] * 9), "f.jsonl:4")
