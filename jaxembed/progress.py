"""Progress of long jobs: a bar on a terminal, a plain line now and then in a log file.

A bar redrawn in place is what a person at a terminal wants; in CI logs and files the same
redraws become thousands of lines, so there a job prints one line every ``every`` seconds
(and a last one when it ends, if it printed any). Short jobs print nothing.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "encoding") as p: ... p.update(n)``."""

    def __init__(self, total: int, desc: str, unit: str = "texts", every: float = 30.0,
                 enabled: bool = True):  # fmt: skip
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.printed = False
        self.bar = None
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=False)
        self.enabled = enabled

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last, self.printed = now, True
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} "
                f"({100 * self.done / max(self.total, 1):.0f}%, {rate:,.0f}/s, "
                f"{eta:.0f}s left)",
                flush=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed:
            took = time.perf_counter() - self.t0
            print(f"{self.desc}: {self.done:,} {self.unit} in {took:.0f}s", flush=True)
