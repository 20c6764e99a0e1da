"""Hard negatives re-mined during training (mine.every): the rules, mine and re-mine agreeing,
exact resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import assert_close
from trainrun import read_losses, tiny_config

import jaxembed
from jaxembed import config as config_lib
from jaxembed import mine as mine_cli
from jaxembed import mining, remine, train
from jaxembed.data import pipeline, readers
from jaxembed.packing import text_hash

# Toy rows differ by a word: positives score close to each other, so a margin of a few
# thousandths of the positive's score is what drops some candidates and keeps others.
RULES = dict(top_k=8, skip_top=1, max_score=None, relative_margin=0.002, num_negatives=3)


def remine_config(setup, steps=6):
    c = tiny_config(setup, steps=steps)
    c.mine.every = 2
    c.mine.update(RULES)
    c.ckpt.every, c.ckpt.keep, c.log.tensorboard = 2, 5, False
    c.eval.data = ()
    return c


@pytest.fixture(scope="module")
def remined_run(train_setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("remine")
    train.main(remine_config(train_setup), workdir)
    return workdir


def teacher_and_builder(run, setup):
    """The run's step-4 parameters as an encoder (what mined pool 4) and its batch builder."""
    c = config_lib.validate(remine_config(setup))
    encoder = jaxembed.load(run / "4", max_length=c.data.max_query_length)
    sources = readers.open_sources(list(c.data.train))
    cfg = pipeline.PipelineConfig.from_config(c)
    return encoder, pipeline.BatchBuilder(sources, str(run / "model"), cfg, c.train.steps)


def test_pools_follow_the_rules(remined_run, train_setup):
    """Pool 4 against the rules, checked from scores recomputed here: no row's negative is a
    positive of its query, none scores within the margin of the positive, the best
    non-positive candidate is skipped, and no candidate the rules allow outranks a chosen
    one (1e-5 of slack for the last digits of two computations of one score)."""
    _, _, (retr, _), _ = train_setup
    assert sorted(p.name for p in (remined_run / "remine").iterdir()) == ["2.npz", "4.npz"]
    pool = remine.Pool.load(remined_run, 4)
    source = readers.open_source(retr)
    records = [source[i] for i in range(len(source))]
    assert pool.texts == list(dict.fromkeys(r["positive"] for r in records))  # the positives
    assert set(pool.negatives) == {0}  # the retrieval dataset only; classification keeps its
    encoder, builder = teacher_and_builder(remined_run, train_setup)
    queries = [builder.query_text(r) for r in records]
    scores = encoder.encode(queries, prompt="") @ encoder.encode(pool.texts, prompt="").T
    same_query: dict[str, set[int]] = {}  # a query's positives: every row reading it
    for r, q in zip(records, queries, strict=True):
        same_query.setdefault(q, set()).add(text_hash(r["positive"]))
    dropped_by_margin = 0
    for n, (r, q) in enumerate(zip(records, queries, strict=True)):
        picked = [int(j) for j in pool.negatives[0][n] if j >= 0]
        positives = {j for j, t in enumerate(pool.texts) if text_hash(t) in same_query[q]}
        order = [j for j in np.argsort(-scores[n], kind="stable") if j not in positives]
        pos = scores[n, pool.texts.index(r["positive"])]
        threshold = pos - RULES["relative_margin"] * abs(pos)
        allowed = [j for j in order[1 : RULES["top_k"]] if scores[n, j] < threshold]
        dropped_by_margin += sum(scores[n, j] >= threshold for j in order[1 : RULES["top_k"]])
        assert not set(picked) & positives and order[0] not in picked
        assert all(scores[n, j] < threshold + 1e-5 for j in picked), n
        assert len(picked) == min(3, len(allowed)), (n, picked, allowed)
        worst = min(scores[n, j] for j in picked) if picked else np.inf
        assert all(scores[n, j] <= worst + 1e-5 for j in set(allowed) - set(picked)), n
    assert dropped_by_margin > 0  # the margin rule is at work here, not off


class Quiet:
    def print(self, *args):
        pass


def test_mine_and_remine_pick_the_same_negatives(remined_run, train_setup, tmp_path):
    """The same model, data and rules: `jaxembed.mine` and re-mining (`jaxembed.mining`
    under both) write the same negatives for every row."""
    _, _, (retr, _), _ = train_setup
    encoder, builder = teacher_and_builder(remined_run, train_setup)
    settings = remine.Settings(2, (), mining.Rules(**RULES))
    pool = remine.remine(encoder, builder, settings, 4, 16, Quiet())
    out = tmp_path / "mined.jsonl"
    mine_cli.mine(encoder, retr, out, **RULES, progress=False)
    src = readers.open_source(out)
    mined = [src[i]["negatives"] for i in range(len(src))]
    remined = [[pool.texts[j] for j in row if j >= 0] for row in pool.negatives[0]]
    assert mined == remined
    assert sum(map(len, mined)) > 0


def test_a_resumed_run_sees_the_same_negatives_and_losses(remined_run, train_setup, tmp_path):
    want = read_losses(remined_run)
    # Resumed between two re-minings (from step 2: pool 2 read back, pool 4 mined again)
    # and at a re-mining whose pool was never saved (step 4: mined again on resume).
    for resume_at, drop in ((2, ("4", "6", "4.npz")), (4, ("6", "4.npz"))):
        run = tmp_path / f"at{resume_at}"
        shutil.copytree(remined_run, run, ignore=shutil.ignore_patterns(*drop, "metrics.jsonl"))
        train.main(remine_config(train_setup), run)
        got = read_losses(run)
        assert sorted(got) == list(range(resume_at + 1, 7))
        assert_close(got, {s: want[s] for s in got}, tol=1e-6, what=f"from {resume_at}: step ")
        np.testing.assert_array_equal(
            remine.Pool.load(run, 4).negatives[0], remine.Pool.load(remined_run, 4).negatives[0]
        )


def test_settings_are_checked(train_setup):
    c = remine_config(train_setup)
    c.mine.top_k = 3
    with pytest.raises(ValueError, match=r"config\.mine: top_k=3 leaves only 2 candidates after"):
        config_lib.validate(c)
