"""Progress of long work: a tqdm bar on a terminal, one log line every few seconds elsewhere.

Redrawn bars fill CI, SLURM and TPU VM logs with carriage returns (tens of KB for a short run);
where stderr is not a terminal, `bar` logs `train: 1200/4800 steps (25%), 6.1 steps/s, 9m50s
left, loss=0.1081` every `every_s` seconds and at the end instead. Both take the same calls:
update(n), set_postfix(**values), close().
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("vidit")


class LogLines:
    """tqdm's update/set_postfix/close, written as a log line every `every_s` seconds."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it",
                 every_s: float = 30.0):
        self.total, self.n, self.desc, self.unit, self.every_s = total, initial, desc, unit, every_s
        self.start_n, self.start = initial, time.perf_counter()
        self.last = self.start
        self.postfix: dict = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 60)}m{int(left % 60):02d}s left" if left != float("inf") else "?"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s "
                f"({100 * self.n / max(self.total, 1):.0f}%), {rate:.2f} {self.unit}s/s, {eta}"
                f"{extra}")

    def set_postfix(self, refresh: bool = False, **values) -> None:
        del refresh
        self.postfix.update(values)

    def close(self) -> None:
        pass


def bar(total: int, *, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
        every_s: float = 30.0):
    """A tqdm bar on a terminal (stderr), else LogLines; a silent tqdm when not `enabled`."""
    from tqdm import tqdm
    if enabled and not sys.stderr.isatty():
        return LogLines(total, initial, desc, unit, every_s)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not enabled, file=sys.stderr)
