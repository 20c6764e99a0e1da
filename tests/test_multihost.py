"""Multi-host runs with real processes on this machine: `launch/local.sh`, gloo collectives.

Two processes of four CPU devices each stand for two hosts; the reference is the
one-process, eight-device `straight_run` of test_train_main (same config, same data).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, launch_local, subprocess_env, xla_flags
from trainrun import ROOT, STEPS, read_losses, tiny_config, write_config

from jaxembed import checkpoint, train


def train_args(config: Path, workdir: Path) -> list[str]:
    return ["-m", "jaxembed.train", f"--config={config}", f"--workdir={workdir}"]


def assert_losses_match(got: dict, ref: dict, steps) -> None:
    assert_close({s: got[s] for s in steps}, {s: ref[s] for s in steps}, what="loss at step ")


@pytest.fixture(scope="module")
def two_hosts(train_setup, tmp_path_factory):
    """The reference run's config, on 2 processes x 4 devices."""
    base = tmp_path_factory.mktemp("twohosts")
    cfg = write_config(train_setup, base / "cfg.py", STEPS)
    rc, out = launch_local(2, train_args(cfg, base / "run"))
    assert rc == 0, out
    return base / "run", out


def test_two_hosts_train_like_one_host(straight_run, two_hosts):
    """Cross-host in-batch negatives: the loss of every step (two tasks, dropout on) and the
    dev metrics equal the one-process run's; only process 0 logs and writes."""
    workdir, out = two_hosts
    ref_dir, ref_results = straight_run
    got = read_losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_losses_match(got, read_losses(ref_dir), range(1, STEPS + 1))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    # One writer: every step logged once (two writers would log each step twice).
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    evals = [r["eval/ndcg@10"] for r in records if "eval/ndcg@10" in r]
    assert evals == pytest.approx(
        [ref_results["before"]["eval/ndcg@10"], ref_results["after"]["eval/ndcg@10"]], abs=1e-6
    )
    assert "[0] mesh {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 devices, 2 processes" in out
    assert "[0] step 1/6" in out and "[1] step" not in out and "[1] dev nDCG" not in out
    assert checkpoint.all_steps(workdir) == [3, 6]


def test_checkpoint_from_two_hosts_resumes_on_one_host_and_another_mesh(
    train_setup, straight_run, two_hosts, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(two_hosts[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    # Written with data=8 over two processes; restored with fsdp=8 in one process.
    config = tiny_config(train_setup, steps=STEPS, mesh__data=1, mesh__fsdp=-1, eval__data=())
    results = train.main(config, workdir)
    assert results["step"] == STEPS
    assert_losses_match(read_losses(workdir), read_losses(straight_run[0]), range(4, STEPS + 1))


def test_one_host_checkpoint_resumes_packed_and_remining_on_two_hosts_like_one_host(
    train_setup, straight_run, tmp_path
):
    """A one-process checkpoint resumes on 2 processes x 4 devices, another mesh (data=2 x
    fsdp=4), with train.packing, GradCache and negatives re-mined with the live parameters
    at every step: each host packs its own rows (the slots address global rows) and encodes
    its share of the corpus, and all receive every embedding and select the same pools. The
    losses and pools equal an unpacked one-process resume from the same checkpoint (dropout
    off in both: packed dropout masks are drawn per packed row)."""
    runs = {name: tmp_path / name for name in ("one", "two")}
    for workdir in runs.values():
        shutil.copytree(straight_run[0], workdir)
        shutil.rmtree(workdir / "checkpoints" / "6")
    common = dict(
        train__dropout=False,
        mine__every=1,
        mine__num_negatives=3,
        mine__top_k=8,
        mine__skip_top=0,
        mine__max_score=None,
        mine__relative_margin=None,
        train__allow_config_change=True,  # re-mining added to a run that had none
        eval__data=(),
    )
    train.main(tiny_config(train_setup, steps=STEPS, **common), runs["one"])
    cfg = write_config(
        train_setup,
        tmp_path / "cfg.py",
        STEPS,
        mesh__data=2,
        mesh__fsdp=-1,
        train__packing=True,
        train__gradcache=True,
        train__gradcache_chunk=8,
        **common,
    )
    rc, out = launch_local(2, train_args(cfg, runs["two"]))
    assert rc == 0, out
    assert "[0] resumed from step 3" in out
    assert "[0] re-mined negatives at step 3: 48 queries" in out
    steps = range(4, STEPS + 1)
    assert_losses_match(read_losses(runs["two"]), read_losses(runs["one"]), steps)
    assert checkpoint.latest_step(runs["two"]) == STEPS
    for step in (3, 5):
        pools = [np.load(runs[n] / "remine" / f"{step}.npz", allow_pickle=True) for n in runs]
        np.testing.assert_array_equal(pools[1]["source_0"], pools[0]["source_0"])


HEARTBEAT = 5  # seconds; the bound on how long a survivor may run on


def start_hosts(args: list[str], n: int = 2, **extra) -> list[subprocess.Popen]:
    """``n`` processes started directly (not by local.sh, which would stop the others
    itself): what bounds a survivor here is JAX's heartbeat alone."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = subprocess_env(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(4),
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAXEMBED_HEARTBEAT_TIMEOUT=str(HEARTBEAT),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**common, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]


def wait_for_step_of(procs, workdir: Path, step: int, timeout: int = 240) -> None:
    deadline = time.time() + timeout
    while not ((workdir / "metrics.jsonl").exists() and step in read_losses(workdir)):
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        assert time.time() < deadline, f"step {step} not reached"
        time.sleep(0.2)


def test_preemption_of_one_host_then_restart_then_a_lost_host(train_setup, tmp_path):
    """SIGTERM to one host only (a preemption notice): both save after the same step and
    exit cleanly. The restart resumes from that checkpoint. Then a host is killed: the other
    exits non-zero within the heartbeat timeout instead of hanging."""
    cfg = write_config(train_setup, tmp_path / "cfg.py", 10_000, eval__data=(), ckpt__every=10_000)
    workdir = tmp_path / "run"
    procs = start_hosts(train_args(cfg, workdir))
    wait_for_step_of(procs, workdir, 2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    saved = checkpoint.latest_step(workdir)
    assert saved is not None and saved >= 2
    assert f"another host's stop signal: saved step {saved}, exiting" in outs[0]

    procs = start_hosts(train_args(cfg, workdir))
    head = []
    for line in procs[0].stdout:  # until the restart has restored the checkpoint
        head.append(line)
        if "resumed from step" in line:
            break
    assert f"resumed from step {saved}" in "".join(head), "".join(head)
    # SIGKILL: a host lost; the survivor is busy (compiling, then stepping), not waiting.
    procs[1].kill()
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=HEARTBEAT + 60)
    waited = time.time() - t0
    procs[1].communicate()
    assert procs[0].returncode != 0, out
    assert waited < HEARTBEAT + 20, waited
    # Either JAX's coordination service aborts it (missed heartbeats), or a collective
    # fails first (the peer's sockets closed) and `distributed.run` exits it.
    stopped_by = ("detected fatal errors", "process 0 of 2 failed (error above)")
    assert any(s in out for s in stopped_by), out[-3000:]


FAILING = textwrap.dedent(
    """
    import sys
    import numpy as np
    from jaxembed import distributed

    distributed.initialize()

    def main():
        import jax
        me = jax.process_index()
        for what, mine in (("the data", f"rows {100 + me}"), ("the config", "same")):
            try:
                distributed.check_same(what, mine)
                print(f"agreed on {what}", flush=True)
            except ValueError as e:
                print(f"error: {e}", flush=True)
        try:
            distributed.check_shared_dir(sys.argv[1] + f"/host{me}")
        except ValueError as e:
            print(f"error: {e}", flush=True)
        if me == 1:
            raise RuntimeError("host 1 fails")
        distributed.gather(np.int32(me))  # waits for host 1, which never comes
        print("not reached", flush=True)

    distributed.run(main)
    """
)


def test_agreement_checks_and_a_python_error_on_one_host(tmp_path):
    """Hosts that disagree get an error naming both sides; a Python error on one host makes
    it exit at once (no five-minute shutdown barrier) and the other stops within the
    heartbeat."""
    for i in range(2):
        (tmp_path / f"host{i}").mkdir()
    t0 = time.time()
    procs = start_hosts(["-c", FAILING, str(tmp_path)])
    outs = [p.communicate(timeout=120)[0] for p in procs]
    elapsed = time.time() - t0
    assert [p.returncode != 0 for p in procs] == [True, True], outs
    for out in outs:
        assert "error: hosts disagree on the data: process groups [[0], [1]]" in out, out
        assert "agreed on the config" in out
        assert "is not shared by all hosts: processes [1] cannot see" in out
        assert "not reached" not in out
    assert "RuntimeError: host 1 fails" in outs[1]
    assert "process 1 of 2 failed" in outs[1]
    assert elapsed < HEARTBEAT + 45, elapsed


AGREE_WHILE_A_STEP_RUNS = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jaxembed import distributed

    distributed.initialize()
    x = jnp.full((800, 800), 1e-3)
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 60, lambda i, y: jnp.tanh(y @ x), x))
    slow(x).block_until_ready()  # compiled
    running = slow(x)  # dispatched: the devices are busy for a second or more
    with jax.transfer_guard("disallow_explicit"):  # no array goes to or from a device
        hosts = distributed.gather(np.int64(jax.process_index()))
        distributed.barrier("agreed")
    print("hosts", hosts.tolist(), "step still running:", not running.is_ready(), flush=True)
    """
)


def test_hosts_agree_without_the_devices():
    """Agreement between hosts (the next batch's shapes, stop requests, checks) goes through
    the coordination service, with no device work or transfer: on a GPU a device collective
    (process_allgather, what this used) queues behind the step the devices are running, so
    a host could not pack and transfer the next batch meanwhile. It returns while the step
    dispatched before it still runs (on CPU a collective would not wait either: the
    transfer guard is what tells the two apart here)."""
    procs = start_hosts(["-c", AGREE_WHILE_A_STEP_RUNS])
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:
        assert "hosts [0, 1] step still running: True" in out, out
