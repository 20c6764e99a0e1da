"""Orbax checkpoints, in one place: every save and restore of a run goes through here.

A checkpoint step holds the train state (parameters, optimizer state, step, RNG), the data
position (a JSON ``data`` item: the next global batch; the pipeline is a pure function of
the batch index, so a resumed run reads exactly the batches an uninterrupted one would, on
any number of hosts), and a JSON ``meta`` item (`jaxembed.export_meta.run_meta`): the
run's pooling, prompts, datasets and config, enough to rebuild the encoder
(`jaxembed.trained_model`) without the original folder.

One manager (`manager`, Orbax's CheckpointManager, read-write in training, read-only in
tools) does everything: `save`; `restore` (the whole step, into any mesh) and
`restore_or_init` (the resume policy: the latest intact step, or a fresh state); and the
partial reads tools need, `read_meta` (the JSON only) and `read_params` (one named
sub-tree of the parameters, e.g. ``params["model"]``, never the optimizer state).

The state is saved by every process (each writes its own shards) and restores into any
mesh on any number of processes: Orbax reshards to the shardings of the abstract state.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it
when complete), so a run killed at any moment resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from jaxembed import distributed
from jaxembed.files import is_url, mount_type, run_path

CKPT_DIR = "checkpoints"


def manager(
    workdir: str | os.PathLike,
    *,
    keep: int = 3,
    keep_best: int = 0,
    best_metric: str = "",
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """The run's CheckpointManager under ``workdir/checkpoints``: the one way to Orbax.

    ``keep`` recent checkpoints are kept; with ``best_metric``, also the ``keep_best`` with
    the highest value of that metric (e.g. dev nDCG@10). ``read_only``: for tools that read
    a run.
    """
    options = ocp.CheckpointManagerOptions(
        # Read-only: nothing to keep or save (Orbax would warn that it resets them).
        max_to_keep=None if read_only else keep + keep_best if best_metric else keep,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    if best_metric and keep_best:
        options.best_fn = lambda metrics: metrics.get(best_metric, float("-inf"))
        options.best_mode = "max"
        options.keep_checkpoints_without_metrics = True
    if "gcsfuse" in mount_type(workdir):
        # A bucket mounted by gcsfuse renames a folder by copying every object (and refuses
        # to, by default): a step is written in place and committed by a marker file.
        options.atomicity_options = ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE
        )
    level = absl_logging.get_verbosity()
    if read_only:  # Orbax warns that the folder is read-only on every open: nothing to act on
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return ocp.CheckpointManager(ckpt_dir(workdir), item_names=ITEMS, options=options)
    finally:
        absl_logging.set_verbosity(level)


ITEMS = ("state", "data", "meta")  # what a step holds


def ckpt_dir(workdir: str | os.PathLike):
    """``WORKDIR/checkpoints``, absolute; on a bucket (gs://) Orbax and TensorStore write
    there directly, each step committed by Orbax's marker file (an object store has no
    folder rename)."""
    root = run_path(workdir, "--workdir")
    return (root if is_url(root) else root.absolute()) / CKPT_DIR


def _steps(workdir: str | os.PathLike) -> list[int]:
    if not ckpt_dir(workdir).exists():
        return []
    with manager(workdir, read_only=True) as m:
        return sorted(m.all_steps())


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The last complete checkpoint's step, or None (also when there is no checkpoint dir)."""
    steps = _steps(workdir)
    return steps[-1] if steps else None


def all_steps(workdir: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps, in increasing order."""
    return _steps(workdir)


def check_space(mngr: ocp.CheckpointManager, needed: int, step: int) -> None:
    """Stops with one line when the checkpoint directory has no room for another step.

    Orbax writes from background threads; a disk that fills under them ends the run in
    pages of thread tracebacks. Checking first turns the common case (a full disk) into one
    line that says what is kept. ``needed`` is the state's size in bytes.
    """
    directory = mngr.directory
    if is_url(directory):
        return  # a bucket does not fill up
    free = shutil.disk_usage(directory).free
    if free < needed * 1.1 + (16 << 20):
        last = mngr.latest_step()
        kept = f"the last checkpoint, step {last}, is intact" if last is not None else "none kept"
        raise OSError(
            f"{directory}: {free / 1e6:,.0f} MB free, but checkpointing step {step} needs about "
            f"{needed / 1e6:,.0f} MB ({kept}); free some space and rerun to resume"
        )


NO_SPACE = "No space left on device"


class _NoSpaceLogs(logging.Filter):
    """Drops Orbax's logs of a save that ran out of disk (each background thread logs it
    with its traceback): the same error reaches the training thread (`saves_reported`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return NO_SPACE not in record.getMessage() and NO_SPACE not in str(error or "")


@contextlib.contextmanager
def saves_reported(mngr: ocp.CheckpointManager):
    """Around the training loop: a disk that fills while a checkpoint is being written ends
    in one line naming the directory and the intact step, not pages of thread tracebacks
    (`check_space` catches the common case before a save starts)."""
    quiet, absl_logger = _NoSpaceLogs(), logging.getLogger("absl")
    default_hook = sys.unraisablehook

    def unraisable(u):  # TensorStore's callbacks into the failed save's closed event loop
        if not (isinstance(u.exc_value, RuntimeError) and "loop is closed" in str(u.exc_value)):
            default_hook(u)

    absl_logger.addFilter(quiet)
    sys.unraisablehook = unraisable
    try:
        yield
    except Exception as e:
        if NO_SPACE not in str(e) and getattr(e, "errno", None) != errno.ENOSPC:
            raise
        last = mngr.latest_step()
        kept = f"the last complete checkpoint, step {last}, is intact" if last else "none kept"
        raise OSError(
            f"{mngr.directory}: no space left on device while writing a checkpoint ({kept}); "
            "free some space and rerun to resume"
        ) from None
    finally:
        absl_logger.removeFilter(quiet)
        sys.unraisablehook = default_hook


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state,
    data: dict | None,
    meta: dict,
    metrics: dict | None = None,
    force: bool = False,
) -> bool:
    """Starts an (async) save of state, data position and meta at ``step``; every process calls it.

    ``data`` is the input position, e.g. ``{"next_batch": step}`` (None: no data item).
    """
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data is not None:
        args["data"] = ocp.args.JsonSave(data)
    return mngr.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)


class Restored(NamedTuple):
    """A restored step: the state, its data position and meta (None when initialised)."""

    state: object
    data: dict | None
    meta: dict | None
    step: int


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> Restored:
    """The whole step, the state in ``abstract_state``'s shardings (any mesh, any hosts).

    A step saved before the train state had ``buffers`` (a dense run's are empty) is
    restored as it was written, its empty ``buffers`` added."""

    def read(state):
        args = {"state": ocp.args.StandardRestore(state), "data": ocp.args.JsonRestore(),
                "meta": ocp.args.JsonRestore()}  # fmt: skip
        return mngr.restore(step, args=ocp.args.Composite(**args))

    try:
        out = read(abstract_state)
    except ValueError as error:
        if getattr(abstract_state, "buffers", None) != {}:
            raise
        fields = dataclasses.fields(abstract_state)
        before = {f.name: getattr(abstract_state, f.name) for f in fields if f.name != "buffers"}
        try:
            out = read(before)
        except ValueError:
            raise error from None
        return Restored(abstract_state.replace(**out["state"]), out["data"], out["meta"], step)
    return Restored(out["state"], out["data"], out["meta"], step)


def read_meta(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """``(step, meta)``: only the JSON meta item of ``step`` (default: the latest), no arrays."""
    path = ckpt_dir(workdir)
    steps = all_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint found (looked in {path})")
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; steps: {steps}")
    with manager(workdir, read_only=True) as m:
        meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, meta


def read_params(workdir: str | os.PathLike, step: int, name: str, item):
    """Only ``state.params[name]`` of a step (an Orbax partial restore), shaped as ``item``.

    ``item`` is a tree of ShapeDtypeStructs: with a ``sharding`` each array is restored as
    a global array sharded so, without one as a host (NumPy) array. The optimizer state and
    the rest of the train state are never read.
    """

    def restore_args(x):
        if getattr(x, "sharding", None) is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=x.sharding)

    state = ocp.args.PyTreeRestore(
        item={"params": {name: item}},
        restore_args={"params": {name: jax.tree.map(restore_args, item)}},
        partial_restore=True,
    )
    with manager(workdir, read_only=True) as m:
        restored = m.restore(step, args=ocp.args.Composite(state=state))["state"]
    return restored["params"][name]


class CheckpointDamaged(ValueError):
    """A checkpoint step cannot be restored; the message names the step and what to do."""


DAMAGED_DIR = "damaged_checkpoints"  # where ``fallback`` moves steps that cannot be restored


def restore_or_init(
    mngr: ocp.CheckpointManager, init: Callable[[], object], abstract_state, fallback=False
) -> Restored:
    """The latest checkpoint if the run has one, else ``init()`` (at step 0, data and meta
    None). A workdir with a checkpoint always
    resumes: the initialisation (e.g. loading HF weights) is not even run then. When the
    latest step cannot be restored (a corrupted file, a bad copy), the newest intact one is
    looked for and the run stops with one line naming both, unless ``fallback``: then the
    damaged steps are moved to ``WORKDIR/damaged_checkpoints`` (kept, not deleted) and the
    run resumes from the intact step, retraining the steps after it.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return Restored(init(), None, None, 0)
    damaged, first = [], ""
    for step in steps:
        try:
            restored = restore(mngr, step, abstract_state)
        except Exception as e:  # any damage (a bad file, a partial copy): try an older step
            damaged.append(step)
            first = first or (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            continue
        if damaged and not fallback:
            raise CheckpointDamaged(
                f"{mngr.directory}: checkpoint step {damaged[0]} cannot be restored ({first}); "
                f"step {step} is intact: rerun with --config.ckpt.fallback=true to resume from "
                f"it (which moves the damaged steps {damaged} to {DAMAGED_DIR}/)"
            )
        if damaged:
            _move_aside(mngr, damaged)
            if jax.process_index() == 0:
                print(
                    f"warning: checkpoint steps {damaged} cannot be restored ({first}); moved "
                    f"to {DAMAGED_DIR}/, resuming from step {step}",
                    flush=True,
                )
        return restored
    raise CheckpointDamaged(
        f"{mngr.directory}: no checkpoint can be restored (tried steps {steps}); the newest "
        f"error: {first}; use a new --workdir (this one's files are left as they are)"
    )


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged steps out of the checkpoint directory, so the run can save them anew
    (Orbax never saves a step at or below its latest), keeping the files for inspection."""
    directory = mngr.directory  # a local path or a bucket folder (epath): both rename
    aside = directory.parent / DAMAGED_DIR
    if jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            n = 1
            while target.exists():  # damaged twice at the same step: keep both
                target, n = aside / f"{step}.{n}", n + 1
            (directory / str(step)).rename(target)
    distributed.barrier("checkpoint_move_aside")
    mngr.reload()


def changed_settings(saved_meta: dict, config: dict, keys) -> list[str]:
    """``config.KEY=old -> new`` for each of ``keys`` ("model.lora.rank") that differs between
    the config a checkpoint was written with (its meta) and ``config`` (a JSON-like dict);
    keys a checkpoint predates are skipped."""
    saved = saved_meta.get("config", {})
    saved = json.loads(saved) if isinstance(saved, str) else saved
    changed = []
    for key in keys:
        was, now = saved, config
        for part in key.split("."):
            if not isinstance(was, dict) or part not in was:
                break  # a checkpoint written before the key existed
            was, now = was[part], now[part]
        else:
            if json.dumps(was, sort_keys=True) != json.dumps(now, sort_keys=True):
                changed.append(f"config.{key}={was!r} -> {now!r}")
    return changed


def check_resumable(saved_meta: dict, config: dict, keys, allow: bool, workdir) -> str | None:
    """Refuses to resume with a config that changes ``keys`` (the model or the data of the
    run), naming every changed key, unless ``allow``: then the warning to print, else None."""
    changed = changed_settings(saved_meta, config, keys)
    if changed and allow:
        return f"warning: resuming {workdir} with changed {'; '.join(changed)}"
    if changed:
        raise ValueError(
            f"{workdir} holds a run with other settings ({'; '.join(changed)}): resuming "
            "would silently change the run; use a new --workdir, the old values, or "
            "--config.train.allow_config_change=true"
        )
    return None


def tree_bytes(tree) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (a state: what a checkpoint writes)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
