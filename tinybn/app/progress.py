"""A dependency-free progress bar that never stays silent for more than a few seconds."""
from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "epoch 1/10") as bar: bar.update(1, "loss 0.52")``.

    On a terminal the bar redraws in place (at most 10 times a second); in a log file it writes
    a line every ``interval`` seconds, so long runs show they are alive either way.
    """

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True, interval: float = 5.0):
        self.total, self.label, self.enabled, self.interval = total, label, enabled, interval
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count, self.start, self.last = 0, time.monotonic(), 0.0

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
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                f"{elapsed:5.1f}s eta {eta:4.0f}s {status}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()
