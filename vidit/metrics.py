"""Metrics to TensorBoard event files and stdout, and the machine's measured matmul peak."""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("vidit")


class MetricWriter:
    """Scalars and images to TensorBoard (tensorboardX event files) on process 0 only; a gs://
    logdir is written through google-cloud-storage, as tensorboardX does."""

    def __init__(self, logdir):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.fspath(logdir))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), step)
        self.writer.flush()

    def image(self, step: int, name: str, image_hwc: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(name, image_hwc, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


class StepTimes:
    """The device time of each step, by bucket, measured without blocking the training loop.

    A thread waits for each step's output in dispatch order; a step's time runs from when the
    previous step finished, or from its own dispatch if that came later (the device was idle:
    waiting for data, or compiling this shape), to when it finished. So compilation and host
    stalls are not counted, and with steps queued back to back the times sum to the wall time.
    """

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._times = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="step-times")
        self._thread.start()

    def add(self, key, output) -> None:
        """Call right after dispatching a step, with any array the step returns."""
        self._queue.put((key, output, time.perf_counter()))

    def _run(self):
        previous = None
        while (item := self._queue.get()) is not None:
            key, output, dispatched = item
            try:
                jax.block_until_ready(output)
            except Exception:  # pylint: disable=broad-except  (the loop reports step errors)
                previous = None
                continue
            done = time.perf_counter()
            start = dispatched if previous is None else max(previous, dispatched)
            previous = done
            with self._lock:
                self._times[key].append(done - start)

    def take(self) -> dict:
        """{key: [seconds per step]} measured since the last call (steps still running wait)."""
        with self._lock:
            times, self._times = dict(self._times), collections.defaultdict(list)
        return times

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)


def format_metrics(step: int, values: dict) -> str:
    parts = []
    for k, v in values.items():
        v = float(v)
        parts.append(f"{k}={v:.4g}" if abs(v) < 1e4 else f"{k}={v:.3e}")
    return f"step {step}: " + " ".join(parts)


def measure_matmul_peak(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of a large square matmul under XLA on this process's first device: the "peak"
    MFU is relative to.

    On a CPU there is no datasheet peak; the best this machine does on the op that dominates a
    transformer is the honest reference.
    """
    # A local device: in a multi-process run jax.devices()[0] belongs to process 0, and timing
    # work placed there from another process measured nothing (MFU ~1e-7 on process 1).
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
