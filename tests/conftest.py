"""Test setup: eight host CPU devices, forced before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The flags the suite is started with reach the processes tests start (helpers.xla_flags):
# `XLA_FLAGS=--xla_cpu_prefer_vector_width=512 pytest` runs everything in that summation order.
# Before them, LLVM's optimisation level 0 for the CPU code XLA emits (the level of LLVM's
# code generation only): the suite's programs are tiny and compiled far more than run
# (whole suite: 1,040 s at the default level, 876 s and 914 s at 0, 443 passed each time,
# 2026-12-04); `XLA_FLAGS=--xla_backend_optimization_level=2 pytest` runs it optimised.
os.environ.setdefault(
    "JAXEMBED_SUITE_XLA_FLAGS",
    f"--xla_backend_optimization_level=0 {os.environ.get('XLA_FLAGS', '')}".strip(),
)
os.environ["XLA_FLAGS"] = (
    os.environ["JAXEMBED_SUITE_XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# At least twice as many XLA:CPU threads as devices: a collective holds a thread until all
# 8 devices join it, and a program loaded from the compilation cache below may let two
# devices enter two collectives in opposite orders; with 8 threads all may wait (a CI
# deadlock: docs/design.md, convention 7). Same time: test_train_step + test_multi_vector
# took 232 s with 8 threads, 228 s with 16.
os.environ.setdefault("PJRT_NPROC", str(max(16, os.cpu_count() or 1)))
# One XLA compilation cache for the session and the processes it starts: many tests compile
# the same tiny train step (a new jit object per `train.main`), and an identical program is
# then loaded instead of compiled again (test_train_main, test_sparse and test_multi_vector:
# 241 s -> 165 s). A fresh folder per session, so nothing of an earlier run is reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxembed-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest

# The data readers' open cache (jaxembed.data.readers.open_cache) of this session only:
# the suite neither fills ~/.cache nor reads what an earlier run left there.
os.environ["JAXEMBED_DATA_CACHE"] = tempfile.mkdtemp(prefix="jaxembed-data-cache-")
atexit.register(shutil.rmtree, os.environ["JAXEMBED_DATA_CACHE"], True)


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory):
    """Tiny model, two training sets and a dev set (`trainrun.make_train_setup`)."""
    from trainrun import make_train_setup

    return make_train_setup(tmp_path_factory.mktemp("trainmain"))


@pytest.fixture(scope="session")
def straight_run(train_setup, tmp_path_factory):
    """An uninterrupted one-process, 8-device run of STEPS steps (two tasks, dropout on):
    the reference for resumed and multi-host runs."""
    from trainrun import STEPS, tiny_config

    from jaxembed import train

    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train.main(tiny_config(train_setup, steps=STEPS), workdir)


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """``gs://jaxembed-test``: a local Google Cloud Storage (tests/fake_gcs.py, in memory,
    in a process of its own) that gcsfs, google-cloud-storage and TensorStore all talk to,
    as they would to the real one; local copies of its folders in a temp dir."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fake_gcs.py")), str(port), "jaxembed-test"],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's arrays
        "JAXEMBED_BUCKET_CACHE": str(tmp_path_factory.mktemp("bucket-copies")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield "gs://jaxembed-test"
    # The server stays up until this process exits (tests/fake_gcs.py), not just this
    # session: writers still flush to it at interpreter exit.
    assert server.poll() is None, "the local GCS server died during the tests"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
