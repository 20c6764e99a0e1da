"""Multi-host runs: starting JAX's distributed runtime, and what every host must agree on.

Every command-line tool (train, mine, evaluate, convert) calls `initialize` before it touches
a device. Where the process group comes from, first match wins:

1. flags: ``--coordinator HOST:PORT --num-processes N --process-id I``;
2. environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (what ``launch/local.sh`` sets);
3. a cluster JAX detects with more than one process: Cloud TPU VM slices, SLURM tasks
   started by ``srun``, Open MPI, Kubernetes TPU JobSets (``launch/tpu_vm.sh``,
   ``launch/gpu_slurm.sbatch``);
4. otherwise this is the only process and nothing is initialised.

Failure handling. A process that dies (killed, crashed, machine lost) stops sending
heartbeats; after ``heartbeat_timeout`` seconds JAX's coordination service aborts every
other process, so nobody hangs in a collective. A process that fails with a Python error
must not exit politely: JAX's shutdown barrier would hold it for five minutes while the
others wait in the next collective. `run` exits such a process at once (``os._exit``), and
the others stop within the heartbeat timeout. Launchers shorten this further by killing the
remaining processes when one fails (``local.sh``, ``srun --kill-on-bad-exit``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
import secrets
import sys
import traceback
from collections.abc import Callable

import jax
import numpy as np
from jax._src import distributed as jax_distributed

from jaxembed.files import run_path

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "JAXEMBED_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT = 100  # JAX's default: long enough for a slow compile or a GC pause
HELP = {
    "coordinator": f"HOST:PORT of process 0's coordination service (env {ENV_COORDINATOR})",
    "num_processes": f"number of processes of a multi-host run (env {ENV_NUM_PROCESSES})",
    "process_id": f"this process's index, 0..N-1 (env {ENV_PROCESS_ID})",
    "heartbeat_timeout": (
        "seconds after which a silent process counts as dead and every other process stops "
        f"(env {ENV_HEARTBEAT}, default {DEFAULT_HEARTBEAT})"
    ),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags of every command-line tool (argparse)."""
    group = parser.add_argument_group("multi-host (see jaxembed.distributed)")
    group.add_argument("--coordinator", default=None, help=HELP["coordinator"])
    group.add_argument("--num-processes", type=int, default=None, help=HELP["num_processes"])
    group.add_argument("--process-id", type=int, default=None, help=HELP["process_id"])
    group.add_argument(
        "--heartbeat-timeout", type=int, default=None, help=HELP["heartbeat_timeout"]
    )


def initialize_from_args(args: argparse.Namespace) -> int:
    return initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _detected_cluster() -> tuple[str, int] | None:
    """``(name, process count)`` of a multi-process cluster JAX recognises, else None."""
    try:
        from jax._src.clusters import ClusterEnv  # JAX's own detection (TPU, SLURM, MPI, k8s)
    except ImportError:  # moved: explicit flags / environment still work
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present() and env.get_process_count() > 1:
                return env.__name__, env.get_process_count()
        except Exception:  # a half-configured environment is not a cluster to join
            continue
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int | None = None,
) -> int:
    """Joins the process group of a multi-host run, if this is one; returns the process count.

    Idempotent. Must run before anything creates a JAX array or asks for devices.
    """
    if jax.distributed.is_initialized():
        return jax.process_count()
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if heartbeat_timeout is None:
        heartbeat_timeout = _env_int(ENV_HEARTBEAT) or DEFAULT_HEARTBEAT
    if heartbeat_timeout < 1:
        raise ValueError(f"heartbeat timeout must be >= 1 second, got {heartbeat_timeout}")
    explicit = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k for k, v in explicit.items() if v is not None}
    if not given and _detected_cluster() is None:
        return 1
    if given == {"num_processes"} and num_processes == 1:
        return 1
    if given and len(given) < 3 and _detected_cluster() is None:
        raise ValueError(
            f"multi-host run: {', '.join(sorted(set(explicit) - given))} not given; set "
            f"--coordinator, --num-processes and --process-id (or {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}) together"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1}")
    # Values not given are filled in by JAX's detection of the cluster (TPU, SLURM, ...).
    jax.distributed.initialize(
        coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=slurm_local_devices(),
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    return jax.process_count()


def slurm_local_devices() -> list[int] | None:
    """The GPUs of this node a SLURM task drives, where JAX's own choice would be wrong.

    JAX gives a SLURM task the one device of its local rank (``SLURM_LOCALID``): right for
    one task per GPU, but one task per node would drive 1 of its 8 GPUs. With fewer tasks
    than visible GPUs on the node, each task takes an equal share. None (JAX decides): not
    SLURM, ``JAX_LOCAL_DEVICE_IDS`` set, or as many tasks as GPUs.
    """
    env = os.environ
    if "SLURM_JOB_ID" not in env or env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    gpus = len(visible.split(",")) if visible else _env_int("SLURM_GPUS_ON_NODE")
    tasks = _tasks_on_this_node()
    if not gpus or not tasks or tasks >= gpus:
        return None
    if gpus % tasks:
        raise ValueError(
            f"SLURM: {tasks} tasks on this node cannot share its {gpus} GPUs evenly; "
            "start one task per GPU (--ntasks-per-node=GPUS) or one per node"
        )
    share = gpus // tasks
    rank = _env_int("SLURM_LOCALID") or 0
    return list(range(rank * share, (rank + 1) * share))


def _tasks_on_this_node() -> int | None:
    """This node's task count from ``SLURM_STEP_TASKS_PER_NODE`` (the step's; else the
    job's ``SLURM_TASKS_PER_NODE``), written like ``8(x2),4``: counts per node in order."""
    text = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r}: not SLURM's count(xN),... form")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _env_int("SLURM_NODEID") or 0
    return counts[node] if node < len(counts) else None


def run(fn: Callable[[], object]):
    """Runs an entry point; in a multi-process run, a Python error exits this process at once.

    Exiting through ``os._exit`` skips JAX's shutdown barrier (up to five minutes while the
    other processes sit in a collective); they stop within the heartbeat timeout instead.
    """
    try:
        return fn()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        if not (jax.distributed.is_initialized() and jax.process_count() > 1):
            raise
        traceback.print_exc()
        print(
            f"process {jax.process_index()} of {jax.process_count()} failed (error above); "
            "exiting now so the other processes stop instead of waiting for it",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)


# --- agreement between hosts ----------------------------------------------------------------


# Every process calls `gather` in the same order, so the n-th call is the same exchange
# everywhere: its keys and barrier are named by n.
_EXCHANGES = itertools.count()
GATHER_TIMEOUT_MS = 60 * 60 * 1000  # a dead process stops everyone sooner (heartbeats)


def gather(values) -> np.ndarray:
    """Every process's ``values`` (same shape and dtype everywhere), stacked: (processes, ...).

    Exchanged through JAX's coordination service (a key-value store on process 0, over the
    network), not a device collective: a collective queues behind the step the devices are
    running, so a host agreeing on the next batch would wait for the current step and could
    not pack and transfer the next one meanwhile.
    """
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    client = jax_distributed.global_state.client
    n, me = next(_EXCHANGES), jax.process_index()
    prefix = f"jaxembed/gather/{n}/"
    client.key_value_set_bytes(f"{prefix}{me}", values.tobytes())
    try:
        client.wait_at_barrier(f"jaxembed/gather/{n}", GATHER_TIMEOUT_MS)
    except Exception as e:  # the service's own error, whose first line names the barrier
        raise RuntimeError(
            f"process {me}: the other processes did not reach exchange {n} within "
            f"{GATHER_TIMEOUT_MS // 60000} minutes ({str(e).splitlines()[0]})"
        ) from None
    got = dict(client.key_value_dir_get_bytes(prefix))
    if n:  # all have read exchange n - 1 before reaching this barrier: its key can go
        client.key_value_delete(f"jaxembed/gather/{n - 1}/{me}")
    stacked = [got[f"{prefix}{p}"] for p in range(jax.process_count())]
    return np.stack([np.frombuffer(b, values.dtype).reshape(values.shape) for b in stacked])


def fingerprint(value: str) -> int:
    """A stable 63-bit hash of a string, for comparing descriptions across hosts."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") >> 1


def check_same(what: str, description: str) -> None:
    """Raises on every host unless all hosts have the same ``description`` of ``what``.

    Hosts that disagree (different data files, a stale config) would otherwise build
    mismatched batches or hang in a collective that one of them never enters.
    """
    if jax.process_count() == 1:
        return
    hashes = gather(np.int64(fingerprint(description)))
    if len(set(hashes.tolist())) > 1:
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(hashes.tolist()):
            groups.setdefault(h, []).append(i)
        mine = groups[hashes[jax.process_index()]]
        raise ValueError(
            f"hosts disagree on {what}: process groups {sorted(groups.values())}; this is "
            f"process {jax.process_index()} (group {mine}), which sees: {description}"
        )


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (the coordination service's,
    like `gather`: nothing queues on the devices)."""
    if jax.process_count() > 1:
        client = jax_distributed.global_state.client
        client.wait_at_barrier(f"jaxembed/barrier/{next(_EXCHANGES)}/{name}", GATHER_TIMEOUT_MS)


def check_shared_dir(path: str | os.PathLike) -> None:
    """Every process must see the same ``path``: checkpoints and the run's files live there.

    Process 0 writes a random token; a host that cannot read it back has its own, unshared
    directory (a local disk on a TPU VM), where Orbax would silently write partial
    checkpoints.
    """
    if jax.process_count() == 1:
        return
    path = run_path(path, "--workdir")  # a local folder or a bucket (gs://)
    token = gather(np.int64(secrets.randbits(62)))[0]
    probe = path / f".shared-{int(token)}"
    if jax.process_index() == 0:
        probe.write_text(str(int(token)))
    barrier("check_shared_dir")
    ok = probe.exists() and probe.read_text() == str(int(token))
    seen = gather(np.int32(ok))
    barrier("check_shared_dir done")
    if jax.process_index() == 0:
        probe.unlink(missing_ok=True)
    if not seen.all():
        blind = [i for i, s in enumerate(seen.tolist()) if not s]
        raise ValueError(
            f"{path} is not shared by all hosts: processes {blind} cannot see what process 0 "
            "writes there. Put the workdir on storage every host mounts (NFS, Filestore, a "
            "gcsfuse-mounted bucket)."
        )
