"""Share a fast kernel's work between the calling thread and a few resident worker threads.

NumPy runs each elementwise function and copy on one core, and releases the GIL while doing so.
:func:`map` therefore splits a kernel's work into pieces (ranges of channels, of elements or of
im2col chunks) and lets the calling thread and the workers take pieces from a shared counter until
none is left. Whoever is free takes the next piece, so a worker that starts late simply takes fewer.

Two details make this pay off on small machines, where one hand-off can cost more than the piece:

* **Workers wait by spinning, with the GIL released** (``pthread_spin_lock`` called through ctypes),
  not by sleeping: waking a sleeping thread took about 0.1 ms on the 2-vCPU development machine,
  as long as a whole pooling layer. After ``IDLE_SPIN_SECONDS`` without work a watchdog puts them
  to sleep, so an idle program does not keep a core busy; :func:`rest` does it at once.
* **OpenBLAS runs on one thread per caller** from the first fast op on (:func:`own_blas`), until
  the fast paths are switched off, which restores its thread count (:func:`release_blas`). Its own
  workers would otherwise spin on the same cores after every product and stall ours, and the pieces
  already spread the products over the cores. NumPy products elsewhere in the program run on one
  thread meanwhile.

``TINYBN_NUM_THREADS`` (or :func:`set_threads`) sets the number of threads, the caller included;
the default is the number of cores this process may run on. More threads than cores cut the work
into more pieces, but only one thread per core takes them (spinning workers would otherwise take
turns on the cores). With one thread, or where ctypes cannot reach ``pthread_spin_lock``, every
piece runs in the calling thread, in order.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import sys
import threading
import time

from . import blas

__all__ = ["map", "pieces", "rest", "set_threads", "threads"]

IDLE_SPIN_SECONDS = 0.02   # a worker idle this long goes to sleep (and costs a slow wake-up later)


def _cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _threads_from_environment() -> int:
    value = os.environ.get("TINYBN_NUM_THREADS", "").strip()
    if value:
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"TINYBN_NUM_THREADS={value!r} is not a positive whole number; unset it to use "
                             f"every core, or set it to e.g. 2")
        return count
    return _cores()


def _spin_functions():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.pthread_spin_init, libc.pthread_spin_lock
    except (OSError, AttributeError):
        return None


_spin = _spin_functions()


class _Gate:
    """A spin lock in C memory: :meth:`wait` spins with the GIL released until someone :meth:`open`\\ s it,
    and closes it again behind the waiter. Opening is a plain store, done while holding the GIL."""

    def __init__(self):
        init, self._lock = _spin
        self._word = ctypes.c_int(0)
        self._address = ctypes.byref(self._word)
        init(self._address, 0)
        self._open_value = self._word.value        # glibc's "unlocked" word differs between architectures
        self._lock(self._address)                  # start closed

    def open(self):
        self._word.value = self._open_value

    def wait(self):
        self._lock(self._address)


class _Job:
    """One :func:`map` call: the pieces, a shared counter over them, and who is still working."""

    def __init__(self, function, items):
        self.function, self.items = function, items
        self.results = [None] * len(items)
        self.counter = itertools.count()            # next(...) is atomic under the GIL
        self.closed = False                        # set by the caller once no piece is left
        self.joined = 0                            # workers inside take_pieces
        self.left = _Gate()                        # opened when the last worker leaves
        self.error = None

    def take_pieces(self):
        for index in self.counter:
            if index >= len(self.items) or self.error is not None:
                return
            try:
                self.results[index] = self.function(self.items[index])
            except BaseException as error:  # re-raised in the caller's thread
                self.error = error

    def join_as_worker(self):
        if self.closed:         # the caller finished every piece before this worker got going
            return
        self.joined += 1
        try:
            self.take_pieces()
        finally:
            self.joined -= 1
            if self.joined == 0 and self.closed:
                self.left.open()


class _Worker:
    def __init__(self):
        self.gate = _Gate()
        self.job = None
        self.asleep, self.alarm = False, threading.Lock()
        self.alarm.acquire()
        threading.Thread(target=self._loop, daemon=True, name="tinybn-worker").start()

    def _loop(self):
        while True:
            self.gate.wait()                       # spins, GIL released
            job = self.job
            if job is None:                        # told to rest: sleep until the next job
                self.asleep = True
                self.alarm.acquire()
                continue
            job.join_as_worker()

    def post(self, job):
        self.job = job
        self.gate.open()
        if self.asleep:
            self.asleep = False
            self.alarm.release()

    def rest(self):
        if not self.asleep and self.job is not None:
            self.job = None
            self.gate.open()


_threads = _threads_from_environment()
_workers: list[_Worker] = []
_running = threading.Lock()                        # one map at a time; a nested or concurrent one runs serially
_last_used = 0.0
_watchdog = None


def threads() -> int:
    """How many threads :func:`map` uses, the calling one included."""
    return _threads


def _running_threads() -> int:
    """Threads that take pieces: at most one per core, since a waiting worker spins and would take a
    core's time from the threads doing the work (4 threads on 2 cores made a training step 4x slower).
    A larger :func:`threads` still cuts the work into that many pieces."""
    return min(_threads, _cores())


def set_threads(count: int) -> None:
    """Use ``count`` threads (the calling one included) from now on; 1 runs everything in the caller."""
    global _threads
    if int(count) < 1:
        raise ValueError(f"set_threads: the thread count must be at least 1, got {count}")
    _threads = int(count)


def pieces(count: int, smallest: int = 1) -> list[range]:
    """``range(count)`` cut into one piece per thread (fewer when pieces would be shorter than ``smallest``)."""
    parts = max(1, min(count // max(1, smallest), _threads))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def map(function, items) -> list:  # noqa: A001 - the name says what it does
    """``[function(item) for item in items]``, the items shared out among the threads; results in order."""
    global _last_used
    items = list(items)
    running = _running_threads()
    if len(items) <= 1 or running == 1 or _spin is None or not _running.acquire(blocking=False):
        return [function(item) for item in items]
    try:
        _start_workers(running - 1)
        job = _Job(function, items)
        for worker in _workers[:running - 1]:
            worker.post(job)
        job.take_pieces()
        job.closed = True                          # under the GIL: no worker joins after this line
        if job.joined:
            job.left.wait()
        if job.error is not None:
            raise job.error
        return job.results
    finally:
        _last_used = time.perf_counter()
        _running.release()


def rest() -> None:
    """Stop the workers spinning now, e.g. before timing other code; they wake on the next :func:`map`."""
    with _running:
        for worker in _workers:
            worker.rest()


def _start_workers(count):
    """Called under ``_running``: at least ``count`` workers, and a watchdog while they spin."""
    global _watchdog
    while len(_workers) < count:
        _workers.append(_Worker())
    if _watchdog is None:
        _watchdog = threading.Thread(target=_watch, daemon=True, name="tinybn-watchdog")
        _watchdog.start()


def _watch():
    """Put the workers to sleep once no map has run for ``IDLE_SPIN_SECONDS``, then end (the next map
    starts a new watchdog), so an idle program has no thread waking up at all."""
    global _watchdog
    while True:
        time.sleep(IDLE_SPIN_SECONDS)
        if _running.acquire(blocking=False):   # no map running now
            try:
                if time.perf_counter() - _last_used > IDLE_SPIN_SECONDS:
                    for worker in _workers:
                        worker.rest()
                    _watchdog = None
                    return
            finally:
                _running.release()


_blas_before = None       # OpenBLAS's thread count before own_blas, restored by release_blas


def own_blas() -> None:
    """Put OpenBLAS on one thread per caller, until :func:`release_blas` (see the module docstring)."""
    global _blas_before
    if _blas_before is None:
        _blas_before = blas.get_threads() or 0
        if _blas_before > 1:
            blas.set_threads(1)


def release_blas() -> None:
    """Give OpenBLAS back the thread count it had before :func:`own_blas` (when the fast paths are switched off)."""
    global _blas_before
    if _blas_before is not None:
        if _blas_before > 1:
            blas.set_threads(_blas_before)
        _blas_before = None


def _forget_workers():
    """In a forked child the workers' threads do not exist: start afresh."""
    global _watchdog, _running
    _workers.clear()
    _watchdog = None
    _running = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
