"""Progress and speed: a dependency-free bar that never stays silent for more than a few seconds, and the
training loop's callbacks that draw it and time the steps."""
from __future__ import annotations

import sys
import time

from .. import backend
from .loop import Callback


class Progress:
    """``with Progress(total, "epoch 1/10") as bar: bar.update(1, "loss 0.52")``.

    On a terminal the bar redraws in place (at most 10 times a second); in a log file it writes
    a line every ``interval`` seconds, so long runs show they are alive either way.
    """

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True, interval: float = 5.0):
        self.total, self.label, self.enabled, self.interval = total, label, enabled, interval
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count, self.start, self.last, self.first = 0, time.monotonic(), 0.0, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return False

    def update(self, n: int = 1, status: str = "") -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.monotonic()
        done = self.count >= self.total
        if now - self.last < (0.1 if self.tty else self.interval) and not (done and self.tty):
            return
        self.last = now
        width = 30
        filled = int(width * self.count / max(1, self.total))
        elapsed = now - self.start
        if self.first is None:                 # the first step carries the start-up (numba compiles its kernels)
            self.first = (self.count, elapsed)
        counted, before = self.first
        eta = ((elapsed - before) / (self.count - counted) * (self.total - self.count)
               if self.count > counted else None)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                f"{elapsed:5.1f}s eta {'   ?' if eta is None else format(eta, '4.0f')}s {status}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()


class ProgressBar(Callback):
    """A bar per epoch, with the loss every ``every`` steps (reading it waits for the GPU)."""

    def __init__(self, steps_per_epoch: int, enabled: bool = True, every: int = 1):
        self.steps, self.enabled, self.every = steps_per_epoch, enabled, every
        self.bar, self.loss = None, float("nan")

    def on_epoch_start(self, epoch):
        self.bar = Progress(self.steps, f"epoch {epoch}", enabled=self.enabled).__enter__()

    def on_step_end(self, step, loss):
        if self.enabled and (step % self.every == 0 or step == self.steps):
            self.loss = float(loss.data)
        self.bar.update(1, f"loss {self.loss:.4f}" if self.loss == self.loss else "")     # none read yet: no nan

    def on_epoch_end(self, epoch, row):
        self.bar.__exit__(None, None, None)


class Speed(Callback):
    """Examples per second over the training steps alone (timed with the device synchronized at the end); with
    several ranks, the examples of every rank (``batches`` gives the global batch sizes)."""

    def __init__(self, batches, device: str):
        self.batches, self.device = batches, device
        self.step_time = self.step_started = 0.0

    def on_epoch_start(self, epoch):
        self.step_time = 0.0

    def on_step_start(self, step):
        self.step_started = time.perf_counter()

    def on_step_end(self, step, loss):
        self.step_time += time.perf_counter() - self.step_started

    def on_epoch_end(self, epoch, row):
        start = time.perf_counter()
        synchronize(self.device)
        self.step_time += time.perf_counter() - start
        examples = sum(self.batches.batch_sizes()) if hasattr(self.batches, "batch_sizes") else 0
        row["examples_per_sec"] = round(examples / max(self.step_time, 1e-12), 1)


class EpochSeconds(Callback):
    """``row["seconds"]``: the epoch's time in all, from its first step to this callback (evaluation included)."""

    def __init__(self):
        self.started = 0.0

    def on_epoch_start(self, epoch):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, row):
        row["seconds"] = round(time.perf_counter() - self.started, 2)


def synchronize(device: str) -> None:
    """Wait for the GPU (a no-op on the CPU), so timers measure finished work."""
    if device.startswith("cuda"):
        backend.resolve_device(device)[1].cuda.Device().synchronize()
