"""A run's log: lines to stdout (process 0), scalars to ``metrics.jsonl`` and TensorBoard, and
the periodic progress line of training (`Progress`)."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from jaxembed.files import atomic_write_text, is_url

METRICS = "metrics.jsonl"  # WORKDIR/metrics.jsonl: one JSON record per logged step
# On a bucket a write uploads the whole file again: at most this often (`RunLog.flush`).
BUCKET_UPLOAD_S = 60.0


class RunLog:
    """A run's log: lines and scalars to stdout (process 0), ``metrics.jsonl``, TensorBoard."""

    def __init__(self, workdir, enabled: bool, tensorboard: bool):
        self.enabled, self.path = enabled, workdir / METRICS
        self.jsonl = None  # a local file, appended to
        self.lines = None  # on a bucket (no appends there): the file's lines, uploaded whole
        self._uploaded = time.monotonic()
        if enabled and is_url(self.path):
            self.lines = self.path.read_text().splitlines(True) if self.path.exists() else []
        elif enabled:
            self.jsonl = open(self.path, "a")  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # writes gs:// too (google-cloud-storage)

            self.tb = SummaryWriter(os.fspath(workdir / "tensorboard"))

    def forget_after(self, step: int) -> None:
        """Drops the records a resumed run will log again: those after its checkpoint
        ``step`` (all of them when it starts from scratch), so no step appears twice."""
        if not self.enabled:
            return
        if self.jsonl is not None:
            if self.jsonl.tell() == 0:
                return
            self.jsonl.close()
        lines = self.lines if self.lines is not None else self.path.read_text().splitlines(True)
        kept = [x for x in lines if step and x.strip() and json.loads(x)["step"] <= step]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(kept))
        if self.lines is not None:
            self.lines = kept
        else:
            self.jsonl = open(self.path, "a")  # noqa: SIM115

    def print(self, *args):
        if self.enabled:
            print(*args, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **values}) + "\n"
        if self.lines is not None:
            self.lines.append(line)
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                # TensorBoard tag names allow no "@": "ndcg@10" becomes "ndcg_at_10".
                self.tb.add_scalar(k.replace("@", "_at_"), v, step)
        if self.lines is None or time.monotonic() - self._uploaded >= BUCKET_UPLOAD_S:
            self.flush()

    def flush(self) -> None:
        """Writes out what was logged: locally every record (by `scalars`); on a bucket,
        where each write uploads the whole metrics and TensorBoard files again, at most every
        `BUCKET_UPLOAD_S`, before each checkpoint (the train loop calls it, so the records up
        to a saved step are on the bucket with it: a resumed run logs only what follows)
        and at close."""
        if self.lines is not None:
            atomic_write_text(self.path, "".join(self.lines))
            self._uploaded = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def eval(self, step: int, title: str, metrics: dict) -> dict:
        """Logs an evaluation (the mean of each metric on the line); returns ``metrics``."""
        self.scalars(step, metrics)
        means = [k for k in metrics if k.count("/") == 1]
        self.print(f"{title}: " + " ".join(f"{k.split('/')[1]} {metrics[k]:.4f}" for k in means))
        return metrics

    def close(self):
        self.flush()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Examples, tokens and per-task losses since the start: the periodic log line."""

    def __init__(self, global_batch: int, total_steps: int, start: int):
        self.global_batch, self.total, self.start = global_batch, total_steps, start
        self.t0, self.seen, self.tokens = time.perf_counter(), 0, 0
        self.task_losses: dict[str, list] = {}

    def add(self, task: str, loss, tokens: int) -> None:
        self.seen += self.global_batch
        self.tokens += tokens
        self.task_losses.setdefault(task, []).append(loss)  # device values: no sync here

    def report(self, step: int, metrics: dict, log: RunLog) -> dict:
        """Logs the step's metrics and rates; returns them as floats."""
        metrics = jax.device_get(metrics)
        check_finite(metrics, step)
        elapsed = time.perf_counter() - self.t0
        last = {k: float(v) for k, v in metrics.items()}
        for t, values in self.task_losses.items():
            last[f"loss/{t}"] = float(np.mean(jax.device_get(values)))
        self.task_losses = {}
        last["examples_per_s"] = self.seen / elapsed
        last["tokens_per_s"] = self.tokens / elapsed
        eta = (self.total - step) * elapsed / max(step - self.start, 1)
        log.scalars(step, last)
        log.print(
            f"step {step}/{self.total} [{100 * step / self.total:5.1f}%] loss {last['loss']:.4f} "
            f"lr {last['lr']:.2e} |g| {last['grad_norm']:.3f} "
            f"{last['examples_per_s']:.1f} ex/s {last['tokens_per_s']:.0f} tok/s "
            f"ETA {_fmt_time(eta)}"
        )
        return last


def check_finite(metrics: dict, step: int) -> None:
    for key in ("loss", "grad_norm"):
        if not np.isfinite(metrics[key]):
            raise FloatingPointError(
                f"non-finite {key} ({metrics[key]}) at step {step}; "
                "the last good checkpoint is kept"
            )


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
