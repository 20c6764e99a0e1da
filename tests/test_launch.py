"""The launch scripts, run for real on this machine: local.sh as is, gpu_slurm.sbatch under a
stand-in ``srun`` (JAX's SLURM auto-detection then joins the processes), and tpu_vm.sh
against a stand-in ``gcloud`` whose one "worker" is a folder here."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, launch_local, subprocess_env, xla_flags

from jaxembed import distributed


def test_local_launcher_stops_everyone_when_one_fails():
    """The survivors are stopped by the launcher, not left to finish their minute."""
    rc, out = launch_local(
        3,
        [
            "-c",
            "import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); "
            "print('up', i, os.environ['JAX_NUM_PROCESSES'], flush=True); "
            "time.sleep(0.5); sys.exit(3) if i == 1 else time.sleep(60); print('slept', i)",
        ],
    )
    assert rc == 3, out
    assert "slept" not in out, out
    assert {"[0] up 0 3", "[1] up 1 3", "[2] up 2 3"} <= set(out.splitlines())
    assert "process 1 exited with status 3: stopping the other processes" in out


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: SLURM_NTASKS local tasks with the variables srun gives each task.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

# One write per line: the two tasks share the pipe, and a print of several items (unbuffered)
# is several writes that can interleave with the other task's.
JOIN = (
    "import sys; from jaxembed import distributed; n = distributed.initialize(); import jax; "
    "ranks = distributed.gather(jax.process_index()).tolist(); "
    "sys.stdout.write(f'joined {n} {jax.process_index()} {ranks}\\n')"
)


def test_slurm_script_joins_the_tasks_by_auto_detection(tmp_path):
    """No coordinator address anywhere: jaxembed.distributed finds SLURM, JAX reads it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = subprocess_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID=str(random.randrange(1, 1 << 20)),  # JAX derives the port from it
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(2),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_slurm.sbatch"), sys.executable, "-c", JOIN],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert {"joined 2 0 [0, 1]", "joined 2 1 [0, 1]"} <= set(out.splitlines()), out
    # Outside a job it refuses to run.
    env.pop("SLURM_JOB_ID")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_slurm.sbatch"), "true"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


@pytest.mark.parametrize(
    ("env", "want"),
    [
        # One task per node: JAX alone would drive GPU SLURM_LOCALID = 0 only.
        (
            {"SLURM_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
            list(range(8)),
        ),
        (
            {"SLURM_STEP_TASKS_PER_NODE": "2,2", "SLURM_GPUS_ON_NODE": "8", "SLURM_LOCALID": "1"},
            [4, 5, 6, 7],
        ),
        ({"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8", "SLURM_LOCALID": "3"}, None),
        (
            {"SLURM_TASKS_PER_NODE": "4,1", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"},
            [0, 1, 2, 3],
        ),
        (
            {"SLURM_TASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8", "JAX_LOCAL_DEVICE_IDS": "0"},
            None,
        ),
        ({"SLURM_TASKS_PER_NODE": "1"}, None),  # no GPUs: CPU tasks
    ],
)
def test_each_slurm_task_drives_its_share_of_the_nodes_gpus(env, want, monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "CUDA_", "JAX_LOCAL"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.slurm_local_devices() == want
    for key in env:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "3")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    with pytest.raises(ValueError, match="3 tasks on this node cannot share its 8 GPUs evenly"):
        distributed.slurm_local_devices()


FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm ... on one machine: one worker whose home is $FAKE_HOME.
echo "gcloud $*" >> "$FAKE_LOG"
shift 3
verb=$1; shift
case $verb in
  describe) test -f "$FAKE_HOME/.created" ;;
  create) touch "$FAKE_HOME/.created" ;;
  delete) rm -f "$FAKE_HOME/.created" ;;
  scp) cp "$1" "$FAKE_HOME/${2#*:}" ;;
  ssh)
    while [ $# -gt 0 ]; do [ "$1" = --command ] && cmd=$2; shift; done
    HOME=$FAKE_HOME bash -c "cd ~ && $cmd" ;;
esac
"""


def fake_tpu(tmp_path: Path) -> dict:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    venv = home / "jaxembed" / ".venv" / "bin"
    venv.mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (venv / "activate").write_text(f"export PATH={venv}:$PATH\n")
    (venv / "python").symlink_to(sys.executable)
    uv = home / ".local" / "bin" / "uv"
    uv.parent.mkdir(parents=True)
    uv.write_text('#!/bin/sh\necho "uv $*" >> "$FAKE_LOG"\n')  # no network: a no-op
    for f in (bin_dir / "gcloud", uv):
        f.chmod(0o755)
    return subprocess_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_HOME=str(home),
        FAKE_LOG=str(tmp_path / "calls.log"),
        JAXEMBED_LOG_DIR=str(tmp_path / "logs"),
    )


def tpu_vm(*args: str) -> list[str]:
    return ["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--name", "t", "--zone", "z", *args]


def test_tpu_script_creates_installs_runs_and_reports_the_status(tmp_path):
    env = fake_tpu(tmp_path)
    cmd = ["--", "python", "-c", "print('hello from', 'a worker'); raise SystemExit(3)"]
    proc = subprocess.run(tpu_vm(*cmd), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "creating TPU VM t (v4-8" in proc.stdout
    assert "] hello from a worker" in proc.stdout
    assert "ended with status 3" in proc.stdout
    calls = (tmp_path / "calls.log").read_text()
    assert "tpu-vm create t --zone z --accelerator-type v4-8" in calls
    assert "--version tpu-ubuntu2204-base" in calls  # v4's image
    # The venv's Python (this one, >= 3.11) is kept; jaxembed installed into it by uv.
    uv_calls = [line for line in calls.splitlines() if line.startswith("uv ")]
    assert uv_calls == ["uv pip install -q --python .venv/bin/python -e .[gcs] jax[tpu]"], calls
    assert "--worker=all" in calls
    assert (tmp_path / "home" / "jaxembed" / "jaxembed" / "train.py").exists()  # copied
    # The VM exists now: reused, nothing installed with --no-install; --delete at the end.
    proc = subprocess.run(
        tpu_vm("--no-install", "--delete", "--", "python", "-c", "print('again')"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reusing TPU VM t" in proc.stdout and "] again" in proc.stdout
    assert not (tmp_path / "home" / ".created").exists()


def test_tpu_script_picks_each_generations_image_and_python_3_11(tmp_path):
    """v5e, v5p and v6e have their own runtime images (v4's is the default); the images'
    Python 3.10 venv is replaced by a 3.11 one from uv; an unknown type needs --version."""
    env = fake_tpu(tmp_path)
    old = tmp_path / "home" / "jaxembed" / ".venv" / "bin" / "python"
    old.unlink()
    old.write_text("#!/bin/sh\nexit 1\n")  # a Python 3.10: the version check fails
    old.chmod(0o755)
    images = {
        "v5litepod-16": "v2-alpha-tpuv5-lite",
        "v5p-32": "v2-alpha-tpuv5",
        "v6e-8": "v2-alpha-tpuv6e",
    }
    for accelerator, image in images.items():
        (tmp_path / "home" / ".created").unlink(missing_ok=True)
        args = ("--type", accelerator, "--", "true")
        proc = subprocess.run(tpu_vm(*args), cwd=ROOT, env=env, capture_output=True, text=True)
        calls = (tmp_path / "calls.log").read_text()
        assert f"--accelerator-type {accelerator} --version {image}" in calls, proc.stderr
    assert "uv venv -q --seed --python 3.11 .venv" in calls.splitlines()
    args = ("--type", "v9-8", "--", "true")
    proc = subprocess.run(tpu_vm(*args), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no default runtime image for --type v9-8; pass --version" in proc.stderr


# A shell cannot trap a signal that was ignored when it started: start the script as a
# terminal would, with SIGINT at its default and unblocked, whatever the test process (and
# the libraries loaded in it by earlier tests) did with its own.
AS_IN_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM]); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def test_tpu_script_ctrl_c_stops_the_command_cleanly(tmp_path):
    """Ctrl-C: SIGTERM reaches the command on the worker (training saves and exits), the
    script follows it to the end and reports its status."""
    env = fake_tpu(tmp_path)
    body = (
        "import signal, sys, time\n"
        "def stop(*_):\n    print('got SIGTERM', flush=True)\n    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
        "sys.exit(5)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            AS_IN_A_TERMINAL,
            *tpu_vm("--no-install", "--", "python", "-c", body),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.rstrip().endswith("] ready"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        status = Path("/proc/self/status").read_text().splitlines()
        status = [x for x in status if x.startswith(("SigIgn", "SigBlk"))]
        raise AssertionError(
            f"no exit 60 s after Ctrl-C; {''.join(lines)}; test process {status}"
        ) from None
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "sending SIGTERM to the command on every worker" in out
    assert "] got SIGTERM" in out and "ended with status 0" in out
