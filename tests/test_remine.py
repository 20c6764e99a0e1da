"""Hard negatives re-mined during training (train.remine_every): the pool, exact resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import assert_close
from trainrun import read_losses, tiny_config

from jaxembed import config as config_lib
from jaxembed import remine, train
from jaxembed.data import readers


def remine_config(setup, steps=6):
    c = tiny_config(setup, steps=steps)
    c.train.remine_every, c.train.remine_num_negatives = 2, 3
    c.train.remine_top_k, c.train.remine_skip_top = 8, 1
    # The toy texts differ by a word: every candidate is within 5% of the positive's score.
    c.train.remine_relative_margin = -1.0
    c.ckpt.every, c.ckpt.keep, c.log.tensorboard = 2, 5, False
    c.eval.data = ()
    return c


@pytest.fixture(scope="module")
def remined_run(train_setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("remine")
    train.main(remine_config(train_setup), workdir)
    return workdir


def test_pools_hold_other_rows_positives_selected_by_the_rules(remined_run, train_setup):
    _, _, (retr, _), _ = train_setup
    assert sorted(p.name for p in (remined_run / "remine").iterdir()) == ["2.npz", "4.npz"]
    pool = remine.Pool.load(remined_run, 4)
    source = readers.open_source(retr)
    positives = [source[i]["positive"] for i in range(len(source))]
    assert pool.texts == positives  # no corpus files: the distinct positives
    assert set(pool.negatives) == {0}  # the retrieval dataset only; classification keeps its
    picked = pool.negatives[0]
    assert picked.shape == (len(source), 3) and (picked >= 0).all()
    for i in range(len(source)):
        chosen = [pool.texts[j] for j in picked[i]]
        assert positives[i] not in chosen and len(set(chosen)) == 3


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


def test_settings_are_checked(train_setup, tmp_path):
    c = remine_config(train_setup)
    c.train.remine_top_k = 3
    with pytest.raises(ValueError, match=r"remine_top_k must hold remine_skip_top \+ "):
        config_lib.validate(c)
