"""`python -m jaxembed.train`: smoke run, exact resume after SIGKILL, SIGTERM, validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_with_tokenizer, toy_records, write_jsonl, write_toy_beir

from jaxembed import checkpoint, train
from jaxembed import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("trainmain")
    # One layer: the step compiles in seconds (compile time grows with unrolled layers).
    model = save_tiny_with_tokenizer("bert", base / "model", num_hidden_layers=1)
    retr = write_jsonl(base / "retr.jsonl", toy_records("retr", "retrieval", 48, 3))
    cls = write_jsonl(base / "cls.jsonl", toy_records("cls", "classification", 24, 1))
    dev = write_toy_beir(base / "dev", 16)
    return base, model, (retr, cls), dev


def tiny_config(setup, steps=6, **kw):
    _, model, data, dev = setup
    c = config_lib.default_config()
    c.model.path = str(model)
    c.data.train = tuple(str(p) for p in data)
    c.data.max_query_length, c.data.max_passage_length = 16, 16
    c.data.query_buckets, c.data.passage_buckets = (16,), (16,)
    c.data.num_negatives.retrieval = 2
    c.train.global_batch, c.train.steps = 8, steps
    c.optim.warmup_steps, c.optim.lr = 1, 1e-3
    c.eval.data = (str(dev),)
    c.ckpt.every, c.log.every = 3, 1
    c.ckpt.async_save = False
    for key, value in kw.items():
        group, name = key.split("__")
        c[group][name] = value
    return c


def read_losses(workdir):
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


STEPS = 6


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """An uninterrupted run of STEPS steps over two datasets (two tasks), dropout on."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train.main(tiny_config(setup, steps=STEPS), workdir)


def test_smoke_run_logs_evaluates_and_checkpoints(straight):
    tmp_path, results = straight
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


def run_cli(config_path: Path, workdir: Path, **popen):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "jaxembed.train", f"--config={config_path}", f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def write_config(setup, path: Path, steps: int) -> Path:
    c = tiny_config(setup, steps=steps)
    path.write_text(
        "from jaxembed.config import default_config\n"
        "import json\n"
        f"CFG = json.loads({c.to_json()!r})\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    for group, values in CFG.items():\n"
        "        for k, v in values.items():\n"
        "            c[group][k] = tuple(v) if isinstance(v, list) else v\n"
        "    return c\n"
    )
    return path


def wait_for_step(workdir: Path, step: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        if (workdir / "metrics.jsonl").exists() and step in read_losses(workdir):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_resume_after_sigkill_reproduces_losses(setup, straight, tmp_path):
    steps = STEPS
    reference = read_losses(straight[0])

    killed = tmp_path / "killed"
    cfg_file = write_config(setup, tmp_path / "cfg.py", steps)
    proc = run_cli(cfg_file, killed)
    wait_for_step(killed, 4, proc)  # the step-3 checkpoint is complete (synchronous saves)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest_step(killed) == 3
    train.main(tiny_config(setup, steps=steps), killed)
    resumed = read_losses(killed)
    for step in range(1, steps + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])


def test_sigterm_saves_and_exits_cleanly(setup, tmp_path):
    cfg_file = write_config(setup, tmp_path / "cfg.py", steps=1000)
    proc = run_cli(cfg_file, tmp_path / "run")
    wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = checkpoint.latest_step(tmp_path / "run")
    assert f"SIGTERM: saved step {saved}, exiting" in out
    assert saved >= 2


def test_non_finite_loss_stops_with_the_step(setup, tmp_path, monkeypatch):
    original = train.TrainStep.__call__

    def poisoned(self, state, batch, task="retrieval"):
        state, metrics = original(self, state, batch, task)
        if int(state.step) >= 5:
            metrics = {**metrics, "loss": np.float32("nan")}
        return state, metrics

    monkeypatch.setattr(train.TrainStep, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 5"):
        train.main(tiny_config(setup, steps=8), tmp_path)
    assert checkpoint.latest_step(tmp_path) == 3


def test_config_validation_names_key_and_values(setup):
    with pytest.raises(
        ValueError,
        match=r"config\.loss\.style='mixed' is not allowed; choose one of \['joint', 'f2llm'\]",
    ):
        config_lib.validate(tiny_config(setup, loss__style="mixed"))
    with pytest.raises(ValueError, match=r"config\.optim\.lr=0\.0 must be > 0"):
        config_lib.validate(tiny_config(setup, optim__lr=0))
    with pytest.raises(ValueError, match=r"config\.data\.num_negatives\.ranking: unknown task"):
        c = tiny_config(setup)
        c.data.num_negatives.ranking = 3
        config_lib.validate(c)


def load_config_file(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_retrofit_recipe_runs_on_a_tiny_xlmr(setup, tmp_path):
    base, _, data, dev = setup
    model = save_tiny_with_tokenizer("xlm-roberta", base / "xlmr", num_hidden_layers=1)
    c = load_config_file(ROOT / "configs" / "retrofit_xlmr_base.py")
    assert c.train.gradcache and c.model.dtype == "bfloat16" and c.model.remat
    c.model.path = str(model)
    c.data.train, c.eval.data = (str(data[0]),), (str(dev),)
    c.data.workers, c.data.max_query_length, c.data.max_passage_length = 0, 16, 16
    c.data.num_negatives.retrieval = 2
    c.train.steps, c.train.global_batch, c.train.gradcache_chunk = 2, 16, 8
    c.optim.warmup_steps, c.ckpt.every, c.ckpt.async_save = 1, 2, False
    results = train.main(c, tmp_path)
    assert results["step"] == 2 and np.isfinite(results["last"]["loss"])
