"""Shared by the training tests: a tiny model and data, the config, running the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import save_tiny_with_tokenizer, toy_records, write_jsonl, write_toy_beir, xla_flags

from jaxembed import config as config_lib
from jaxembed.files import run_path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def make_train_setup(base: Path):
    """A one-layer BERT with tokenizer, two training sets (two tasks) and a BEIR dev set."""
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
    for line in (run_path(workdir, "workdir") / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def run_cli(config_path: Path, workdir: Path, **popen):
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(8),
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


def write_config(setup, path: Path, steps: int, **kw) -> Path:
    """`tiny_config` as a config file for ``--config`` (overrides as in `tiny_config`)."""
    c = tiny_config(setup, steps=steps, **kw)
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
