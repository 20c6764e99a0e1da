"""`python -m jaxembed.train`: smoke run, exact resume after SIGKILLs at random points,
validation (SIGTERM: test_multihost, where one host of two is signalled)."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, save_tiny_with_tokenizer
from trainrun import (
    ROOT,
    STEPS,
    read_losses,
    run_cli,
    tiny_config,
    wait_for_step,
    write_config,
)

from jaxembed import checkpoint, train
from jaxembed import config as config_lib
from jaxembed import step as step_lib
from jaxembed.data import pipeline


def test_smoke_run_logs_evaluates_and_checkpoints(straight_run):
    tmp_path, results = straight_run
    assert results["step"] == STEPS
    assert "eval/ndcg@10" in results["before"] and "eval/ndcg@10" in results["after"]
    assert checkpoint.latest_step(tmp_path) == STEPS
    losses = read_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(losses.values())))
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-2])
    assert {"lr", "grad_norm", "examples_per_s", "tokens_per_s"} <= set(rec)
    assert any(k.startswith("loss/") for k in rec)
    assert list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "model" / "tokenizer.json").exists()
    assert not (tmp_path / "model" / "model.safetensors").exists()


def saved_state(workdir: Path, step: int):
    import orbax.checkpoint as ocp

    path = (workdir / checkpoint.CKPT_DIR / str(step) / "state").absolute()
    return ocp.StandardCheckpointer().restore(path)


def test_sigkill_at_random_points_resumes_exactly(train_setup, straight_run, tmp_path):
    """kill -9 at two random moments of a run that saves (asynchronously) every step,
    some of them during a save: no complete checkpoint is lost, and the resumed run ends
    with the same per-step losses and the same final state as an uninterrupted run."""
    import random
    import time

    rng = random.Random(1234)
    workdir = tmp_path / "killed"
    # No dev evaluation: the losses and the state are what is compared.
    every_step = {"ckpt__every": 1, "ckpt__async_save": True, "eval__data": ()}
    cfg = write_config(train_setup, tmp_path / "cfg.py", STEPS, **every_step)
    last_saved = 0
    for target in sorted(rng.sample(range(1, STEPS), 2)):
        if target <= last_saved:
            continue
        proc = run_cli(cfg, workdir)
        wait_for_step(workdir, target, proc)
        time.sleep(rng.uniform(0.0, 0.5))  # often mid-save: saves start right after a step
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = checkpoint.latest_step(workdir) or 0  # None: killed before the first save
        assert saved >= last_saved, (target, saved, last_saved)
        last_saved = saved
    train.main(tiny_config(train_setup, steps=STEPS, ckpt__every=1, eval__data=()), workdir)
    want, got = read_losses(straight_run[0]), read_losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # The same program on the same devices: equal to 1e-6 of each value's scale.
    assert_close(got, {s: want[s] for s in got}, tol=1e-6, what="loss at step ")
    final, reference = saved_state(workdir, STEPS), saved_state(straight_run[0], STEPS)
    assert int(final["step"]) == STEPS
    assert_close(final["params"], reference["params"], tol=1e-6)


def test_time_limit_ends_training_and_a_rerun_continues_exactly_in_a_bucket(
    train_setup, straight_run, gcs_bucket, tmp_path, monkeypatch
):
    """A limit already spent at the first step: one step, then the run ends as if done
    (checkpoint, eval after); rerunning without it resumes and matches the straight run.
    The workdir is gs://BUCKET/run (a local GCS): checkpoints, metrics, TensorBoard, the
    model's files and the loaded model all go through the bucket, nothing to a local gs:/."""
    from etils import epath

    import jaxembed

    monkeypatch.chdir(tmp_path)
    workdir = f"{gcs_bucket}/time-limit/run"
    dev = Path(train_setup[3]).name
    limited = train.main(
        tiny_config(train_setup, train__time_limit_minutes=1e-6, eval__groups={"toy": (dev,)}),
        workdir,
    )
    assert limited["time_limit_step"] == limited["step"] == 1
    # A group of one set reports that set's metrics as its mean.
    assert limited["after"]["eval/toy/ndcg@10"] == limited["after"]["eval/ndcg@10"]
    assert checkpoint.latest_step(workdir) == 1
    resumed = train.main(tiny_config(train_setup), workdir)
    assert resumed["step"] == STEPS and "time_limit_step" not in resumed
    reference, losses = read_losses(straight_run[0]), read_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, {s: reference[s] for s in losses}, tol=1e-6, what="loss at step ")
    bucket = epath.Path(workdir)
    assert checkpoint.all_steps(workdir) == [1, 3, STEPS]
    assert (bucket / "model" / "tokenizer.json").exists()
    assert list((bucket / "tensorboard").iterdir())
    assert list(tmp_path.iterdir()) == []  # no local gs:/ folder
    texts = ["a query", "another passage"]
    want = jaxembed.load(straight_run[0]).encode(texts)
    assert_close(jaxembed.load(workdir).encode(texts), want, tol=1e-5)


def test_a_buckets_metrics_are_uploaded_at_most_once_a_minute_and_when_flushed(
    gcs_bucket, monkeypatch
):
    """Each upload to a bucket rewrites the whole file: records wait for a flush (the train
    loop's, before each checkpoint; close's) or for a minute since the last upload."""
    from etils import epath

    from jaxembed import run_log

    workdir = epath.Path(f"{gcs_bucket}/metrics-upload")
    log = run_log.RunLog(workdir, enabled=True, tensorboard=False)
    log.scalars(1, {"loss": 1.0})
    assert not (workdir / run_log.METRICS).exists()  # logged, not uploaded yet
    log.flush()
    assert read_losses(workdir) == {1: 1.0}
    monkeypatch.setattr(run_log, "BUCKET_UPLOAD_S", 0.0)  # a minute has passed
    log.scalars(2, {"loss": 2.0})
    assert read_losses(workdir) == {1: 1.0, 2: 2.0}
    monkeypatch.setattr(run_log, "BUCKET_UPLOAD_S", 60.0)
    log.scalars(3, {"loss": 3.0})
    log.close()
    assert read_losses(workdir) == {1: 1.0, 2: 2.0, 3: 3.0}


def test_non_finite_loss_stops_with_the_step(train_setup, tmp_path, monkeypatch):
    original = step_lib.Step.__call__

    def poisoned(self, state, batch, task="retrieval", frozen=None):
        state, metrics = original(self, state, batch, task, frozen)
        if int(state.step) >= 5:
            metrics = {**metrics, "loss": np.float32("nan")}
        return state, metrics

    monkeypatch.setattr(step_lib.Step, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 5"):
        train.main(tiny_config(train_setup, steps=8), tmp_path)
    assert checkpoint.latest_step(tmp_path) == 3


def test_config_validation_names_key_and_values(train_setup):
    with pytest.raises(
        ValueError,
        match=r"config\.loss\.style='mixed' is not allowed; choose one of \['joint', 'f2llm'\]",
    ):
        config_lib.validate(tiny_config(train_setup, loss__style="mixed"))
    with pytest.raises(ValueError, match=r"config\.optim\.lr=0\.0 must be > 0"):
        config_lib.validate(tiny_config(train_setup, optim__lr=0))
    with pytest.raises(ValueError, match=r"config\.data\.num_negatives\.ranking: unknown task"):
        c = tiny_config(train_setup)
        c.data.num_negatives.ranking = 3
        config_lib.validate(c)
    # Longer texts than the position table would embed as NaN: refused at start.
    with pytest.raises(ValueError, match=r"config\.data\.max_passage_length=128 exceeds the 64"):
        train.check_lengths(tiny_config(train_setup, data__max_passage_length=128), 64, "m")


def test_help_lists_every_field_with_default_choices_and_comment():
    lines = config_lib.describe(config_lib.default_config())
    keys = {line.split(" = ")[0] for line in lines if " = " in line}
    assert len(keys) == len([x for x in lines if " = " in x])  # each field once
    assert "config.train.allow_config_change" in keys and "config.ckpt.fallback" in keys
    shown = "\n".join(lines)
    assert "config.data.negatives = 'mined'  # one of ['mined', 'random']" in shown
    assert "config.model.dtype = 'float32'  # one of ['float32', 'bfloat16']; compute" in shown
    assert "config.model.lora.*  # LoRA (rank > 0)" in shown


def test_one_schema_gives_defaults_checks_help_overrides_and_resume_keys():
    import dataclasses

    from jaxembed import mine, mining

    c = config_lib.default_config()
    assert config_lib.validate(c) is c
    lines = config_lib.describe()
    for key in config_lib.FIELDS:  # every setting has its --help line, with its default
        assert sum(x.startswith(f"config.{key} = ") for x in lines) == 1, key
    shown = "\n".join(lines)
    assert "config.data.query_transform_rate = 0.0  # must lie in [0, 1]; must match on" in shown
    assert "config.mine.max_score = 0.8  # None: off; candidates scoring at or above" in shown
    # The table's bounds are validate's and the pipeline's.
    with pytest.raises(ValueError, match=r"config\.model\.lora\.dropout=1\.0 must lie in \[0, 1\)"):
        c.model.lora.dropout = 1.0
        config_lib.validate(c)
    with pytest.raises(ValueError, match=r"config\.data\.max_query_length=0 must be > 0"):
        pipeline.PipelineConfig(global_batch=8, max_query_length=0)
    c = config_lib.default_config()
    c.train.stepz = 3  # a typo in a config file is an error, not an ignored key
    with pytest.raises(ValueError, match=r"config\.train\.stepz: no such setting"):
        config_lib.validate(c)
    # "none" turns off a setting that allows it, and only those.
    c = config_lib.default_config()
    config_lib.override(c, "mine.max_score", "none")
    assert c.mine.max_score is None and config_lib.mining_rules(c).max_score is None
    with pytest.raises(ValueError, match=r"--config\.optim\.lr='none': could not convert"):
        config_lib.override(c, "optim.lr", "none")
    # The mining rules' defaults, once: the config's, re-mining's and the CLI's.
    assert config_lib.mining_rules(config_lib.default_config()) == mining.Rules()
    args = mine._parser().parse_args(["--model", "m", "--input", "i", "--out", "o"])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(mining.Rules)} == (
        dataclasses.asdict(mining.Rules())
    )
    # The keys a resume must keep come from the table, nested ones included.
    assert "model.lora.rank" in config_lib.RESUME_KEYS and "optim.lr" not in config_lib.RESUME_KEYS
    saved = {"config": config_lib.default_config().to_json()}
    now = config_lib.default_config()
    now.model.lora.rank, now.optim.lr = 4, 1e-3
    now = json.loads(now.to_json())
    changed = checkpoint.changed_settings(saved, now, config_lib.RESUME_KEYS)
    assert changed == ["config.model.lora.rank=0 -> 4"]


def test_packing_shapes_round_row_counts_only_when_packed(train_setup):
    from jaxembed import sharding

    mesh = sharding.make_mesh()  # 8 devices: the granule is a multiple of 8
    packed = step_lib.row_packing(tiny_config(train_setup, train__packing=True), mesh)
    assert packed.few_shapes and packed.granule == 8 and packed.rows(33) == 48
    exact = tiny_config(train_setup, train__packing=True, train__packing_shapes="exact")
    assert not step_lib.row_packing(exact, mesh).few_shapes
    assert not step_lib.row_packing(tiny_config(train_setup), mesh).few_shapes  # one text a row
    with pytest.raises(ValueError, match=r"config\.train\.packing_shapes='some' is not allowed"):
        config_lib.validate(tiny_config(train_setup, train__packing_shapes="some"))


def test_recipe_configs_validate_and_name_their_eval_sets(train_setup):
    import ml_collections

    names = ("demo.py", "retrofit_xlmr_base.py", "retrofit_mmbert.py", "f2llm_qwen3.py:0.6b")
    names += ("f2llm_qwen3.py:4b", "f2llm_qwen3.py:0.6b-lora", "embeddinggemma.py")
    names += ("embeddinggemma.py:lora", "../examples/debian_retrofit/config.py")
    names += ("../examples/debian_retrofit/config.py:st", "sparse.py", "sparse.py:splade")
    for name in names:
        config_lib.validate(config_lib.load(str(ROOT / "configs" / name)))
    recipe = config_lib.load(str(ROOT / "examples" / "debian_retrofit" / "config.py"))
    cfg = pipeline.PipelineConfig.from_config(config_lib.validate(recipe))  # the hook imports
    assert cfg.query_transform_rate == 0.5
    mmbert = config_lib.load(str(ROOT / "configs" / "retrofit_mmbert.py"))
    assert mmbert.data.max_passage_length == 512 and mmbert.train.global_batch == 512
    demo = config_lib.load(str(ROOT / "configs" / "demo.py"))
    assert set(demo.eval.groups) == {"zero_shot", "trained", "zero_shot_body", "trained_body"}
    with pytest.raises(ValueError, match=r"config\.eval\.groups\.oops: \['xling-xx'\] not among"):
        c = tiny_config(train_setup)
        c.eval.groups = ml_collections.ConfigDict({"oops": ("xling-xx",)})
        config_lib.validate(c)


def test_retrofit_recipe_runs_on_a_tiny_xlmr(train_setup, tmp_path):
    base, _, data, dev = train_setup
    model = save_tiny_with_tokenizer("xlm-roberta", base / "xlmr", num_hidden_layers=1)
    c = config_lib.load(str(ROOT / "configs" / "retrofit_xlmr_base.py"))
    # GradCache sized per device bounds the activations: remat would add a third forward.
    assert c.train.gradcache and c.model.dtype == "bfloat16" and not c.model.remat
    c.model.path = str(model)
    c.data.train, c.eval.data = (str(data[0]),), (str(dev),)
    c.data.workers, c.data.max_query_length, c.data.max_passage_length = 0, 16, 16
    c.data.num_negatives.retrieval = 2
    c.train.steps, c.train.global_batch, c.train.gradcache_chunk = 2, 16, 8
    c.optim.warmup_steps, c.ckpt.every, c.ckpt.async_save = 1, 2, False
    results = train.main(c, tmp_path)
    assert results["step"] == 2 and np.isfinite(results["last"]["loss"])


def test_damaged_checkpoint_and_changed_configs_stop_unless_asked(
    train_setup, straight_run, tmp_path, capsys
):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    # The latest step's array data damaged on disk (as a failing disk or a bad copy would).
    damaged = [p for p in (workdir / "checkpoints" / "6" / "state").rglob("*") if p.is_file()]
    for p in damaged:
        p.write_bytes(b"\0" * 16)
    with pytest.raises(checkpoint.CheckpointDamaged) as e:
        train.main(tiny_config(train_setup, steps=STEPS), workdir)
    assert "step 6 cannot be restored" in str(e.value) and "step 3 is intact" in str(e.value)
    assert "--config.ckpt.fallback=true" in str(e.value) and "\n" not in str(e.value)
    assert checkpoint.all_steps(workdir) == [3, 6]  # nothing moved or lost by refusing
    # Resuming with another batch size and other lengths would silently change the run:
    # every changed key is named.
    changed = {"train__global_batch": 16, "data__max_passage_length": 32, "ckpt__fallback": True}
    with pytest.raises(ValueError, match="holds a run with other settings") as e:
        train.main(tiny_config(train_setup, steps=STEPS, **changed), workdir)
    assert "config.train.global_batch=8 -> 16" in str(e.value)
    assert "config.data.max_passage_length=16 -> 32" in str(e.value)
    results = train.main(tiny_config(train_setup, steps=STEPS, ckpt__fallback=True), workdir)
    out = capsys.readouterr().out
    assert "checkpoint steps [6] cannot be restored" in out and "resumed from step 3" in out
    assert (workdir / checkpoint.DAMAGED_DIR / "6").is_dir()  # kept for inspection
    assert results["step"] == STEPS and checkpoint.all_steps(workdir) == [3, 6]
    want = read_losses(straight_run[0])
    got = read_losses(workdir)  # steps 4-6 logged once: the first run's records were dropped
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_close(got, {s: want[s] for s in got}, tol=1e-6, what="loss at step ")
    # Asked for, a change is a warning (here a longer schedule: not a resume key).
    allowed = tiny_config(
        train_setup, steps=STEPS + 1, data__max_passage_length=32, train__allow_config_change=True
    )
    assert train.main(allowed, workdir)["step"] == STEPS + 1
    assert "warning: resuming" in capsys.readouterr().out


def test_empty_data_and_unused_negatives_are_reported(train_setup, tmp_path):
    model = train_setup[1]
    lines = []

    class Log:
        def print(self, *args):
            lines.append(" ".join(map(str, args)))

    c = tiny_config(train_setup)
    c.data.num_negatives.retrieval = 0
    train.open_data(c, model, Log())
    assert any(
        "retr carries hard negatives, but config.data.num_negatives.retrieval=0" in x for x in lines
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    c.data.train = (str(empty),)
    with pytest.raises(ValueError, match=r"empty.jsonl: no training records \(an empty file\?\)"):
        train.open_data(c, model, Log())


def test_your_own_columns_train_from_python(train_setup, tmp_path):
    """The README's "Train on your data": rows with other column names and no task or
    dataset, mapped with data.columns, trained through the Python API."""
    rows = [
        {"question": f"tool number {i}", "answer": f"A package: utility {i}."} for i in range(16)
    ]
    data = tmp_path / "my_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = tiny_config(train_setup, steps=2, eval__data=())
    c.data.train = (str(data),)
    c.data.columns = {"question": "query", "answer": "positive"}
    results = train.main(c, tmp_path / "run")
    assert results["step"] == 2 and np.isfinite(results["last"]["loss"])
    meta = checkpoint.read_meta(tmp_path / "run")[1]
    assert meta["datasets"] == {"my_pairs": {"task": "retrieval", "rows": 16, "instructions": []}}


def test_a_full_disk_is_one_line_before_orbax_starts_writing(tmp_path):
    """(Measured on a 3 MB tmpfs: 221 lines of Orbax thread tracebacks before, 11 lines
    ending in this message after.)"""
    mngr = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.check_space(mngr, 1 << 20, 4)  # a megabyte fits
    with pytest.raises(
        OSError,
        match=r"checkpoints: [\d,]+ MB free, but checkpointing step 4 "
        r"needs about [\d,]+ MB \(none kept\); free some space and rerun",
    ):
        checkpoint.check_space(mngr, 1 << 60, 4)
    mngr.close()


def test_a_disk_filling_during_a_save_is_one_line(tmp_path, capsys, caplog):
    """What Orbax raises and logs when the disk fills under an async save, reduced to one
    line. (Measured on a tmpfs that fills at step 8 of a tiny run: 628 lines with 68 thread
    tracebacks before, 22 lines, no traceback, after; the rerun with space resumes.)"""
    import logging
    import sys

    mngr = checkpoint.manager(tmp_path, async_save=False)
    raised = 'RESOURCE_EXHAUSTED: Error writing "x/0": No space left on device [os_error_code=28]'
    with pytest.raises(OSError) as e, checkpoint.saves_reported(mngr):
        logging.getLogger("absl").error("Save Finalize thread failed: %s", raised)
        sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
        raise ValueError(raised)
    assert str(e.value) == (
        f"{mngr.directory}: no space left on device while writing a checkpoint (none kept); "
        "free some space and rerun to resume"
    )
    assert capsys.readouterr().err == "" and "Save Finalize" not in caplog.text
    with pytest.raises(ValueError, match="another error"), checkpoint.saves_reported(mngr):
        raise ValueError("another error")  # anything else passes through unchanged
    mngr.close()


def _unraisable(exc):
    class Unraisable:
        exc_type, exc_value, exc_traceback, err_msg, object = type(exc), exc, None, None, None

    return Unraisable()


def test_a_bucket_mounted_by_gcsfuse_commits_checkpoints_without_renames(tmp_path, monkeypatch):
    """gcsfuse renames a folder by copying every object (and refuses by default): on such a
    mount a step is written in place and committed by Orbax's marker file. A URL of a
    storage other than gs:// is one line (pathlib would fold it into a local folder)."""
    from jaxembed import files

    mounts = f"/dev/sda1 / ext4 rw 0 0\nmy-bucket {tmp_path / 'bucket'} fuse.gcsfuse rw 0 0\n"
    assert files.mount_type(tmp_path / "bucket" / "runs" / "x", mounts) == "fuse.gcsfuse"
    assert files.mount_type(tmp_path / "elsewhere", mounts) == "ext4"
    monkeypatch.setattr(checkpoint, "mount_type", lambda path: files.mount_type(path, mounts))
    rename = os.rename

    def no_folder_renames(src, dst, *args, **kwargs):  # gcsfuse's default: ENOTSUP
        if Path(src).is_dir() and str(tmp_path / "bucket") in str(src):
            raise OSError(errno.ENOTSUP, "Operation not supported", str(src))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", no_folder_renames)
    mngr = checkpoint.manager(tmp_path / "bucket" / "run", async_save=False)
    checkpoint.save(mngr, 3, {"w": np.arange(4.0)}, {"next_batch": 3}, {"config": "{}"})
    mngr.wait_until_finished()
    step = tmp_path / "bucket" / "run" / checkpoint.CKPT_DIR / "3"
    assert (step / "commit_success.txt").exists() and checkpoint.latest_step(step.parents[1]) == 3
    mngr.close()
    with pytest.raises(ValueError, match=r"--workdir s3://b/run: s3:// is not supported; use gs"):
        train.main(config_lib.default_config(), "s3://b/run")
