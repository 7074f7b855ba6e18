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
* **OpenBLAS runs on one thread while the pieces run**, and gets its thread count back when
  :func:`map` returns: its own workers would otherwise spin on the same cores after every product
  and stall ours, and the pieces already spread the products over the cores. Every product of the
  fast kernels (conv2d's, linear's) runs inside a map, so OpenBLAS's own threads never wake for them.

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

import numpy

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
        self.errstate = numpy.geterr()             # NumPy's error settings are per thread: the workers take the caller's
        self.results = [None] * len(items)
        self.counter = itertools.count()            # next(...) is atomic under the GIL
        self.lock = threading.Lock()               # guards closed and joined
        self.closed = False                        # set by the caller once no piece is left
        self.joined = 0                            # workers inside take_pieces
        self.left = _Gate()                        # opened when the last worker leaves a closed job
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
        with self.lock:
            if self.closed:     # the caller finished every piece before this worker got going
                return
            self.joined += 1
        try:
            with numpy.errstate(**self.errstate):
                self.take_pieces()
        finally:
            with self.lock:
                self.joined -= 1
                last = self.joined == 0 and self.closed
            if last:
                self.left.open()

    def finish(self):
        """Close the job to newcomers and wait for the workers inside it (each finishes its piece).
        Called again after an interruption, it does not wait twice for the one opening of ``left``."""
        with self.lock: wait = self._close()  # noqa: E701 - one line: no interrupt while the lock is held
        if wait:
            self.left.wait()

    def _close(self) -> bool:
        """Close the job; whether the caller must wait for workers (first close, some inside)."""
        first = not self.closed
        self.closed = True
        return first and self.joined > 0


class _Worker:
    """A resident thread that sleeps (no CPU) until a job is posted, then spins on its gate between jobs
    until told to rest. Only :func:`map` posts, and only while a watchdog runs that will rest it.

    The calling thread only ever touches a worker through single C calls (a store into the gate, a
    lock's release), never through Python-level synchronisation such as ``threading.Event.set``, whose
    internal lock an interrupt could leave held.
    """

    def __init__(self):
        self.gate = _Gate()
        self.job = None
        self.wake = threading.Lock()               # locked: no wake-up pending; released: one is
        self.wake.acquire()
        self.asleep = True
        threading.Thread(target=self._loop, daemon=True, name="tinybn-worker").start()

    def _loop(self):
        while True:
            # Drop a wake-up posted while awake (else a later rest could end in a spin no watchdog would
            # stop), then sleep until the next post.
            self.wake.acquire(blocking=False)
            self.asleep = True
            self.wake.acquire()
            self.asleep = False
            while True:
                self.gate.wait()                   # spins, GIL released
                job = self.job
                if job is None:                    # told to rest
                    break
                job.join_as_worker()

    def post(self, job):
        self.job = job
        self.gate.open()
        try:
            self.wake.release()
        except RuntimeError:                       # a wake-up is already pending
            pass

    def rest(self):
        self.job = None
        self.gate.open()


# The pool's state. Every change to it is written so that an exception before any line (KeyboardInterrupt
# included) leaves it usable: a map owns the workers while _owner is its token, and gives them back in a
# cleanup that runs again if it was itself interrupted; a worker that missed a post or a rest only sleeps
# longer; and a worker spins only while a watchdog runs.
_threads = None                                    # read from TINYBN_NUM_THREADS on first use
_workers: list[_Worker] = []
_claim = threading.Lock()                          # held briefly: to enter or leave a map, and by the watchdog
_owner = None                                      # the token of the map sharing its pieces; others run serially
_active: set = set()                               # the tokens of every map running, in any thread
_last_used = 0.0
_watchdog = None
_blas_before = None                                # OpenBLAS's thread count while a map has it on one


def threads() -> int:
    """How many threads :func:`map` uses, the calling one included.

    The first call reads ``TINYBN_NUM_THREADS`` (a bad value raises ValueError here, not at import)."""
    global _threads
    if _threads is None:
        _threads = _threads_from_environment()
    return _threads


def _running_threads() -> int:
    """Threads that take pieces: at most one per core, since a waiting worker spins and would take a
    core's time from the threads doing the work (4 threads on 2 cores made a training step 4x slower).
    A larger :func:`threads` still cuts the work into that many pieces."""
    return min(threads(), _cores())


def set_threads(count: int) -> None:
    """Use ``count`` threads (the calling one included) from now on; 1 runs everything in the caller."""
    global _threads
    if int(count) < 1:
        raise ValueError(f"set_threads: the thread count must be at least 1, got {count}")
    _threads = int(count)


def pieces(count: int, smallest: int = 1) -> list[range]:
    """``range(count)`` cut into one piece per thread (fewer when pieces would be shorter than ``smallest``)."""
    parts = max(1, min(count // max(1, smallest), threads()))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def map(function, items) -> list:  # noqa: A001 - the name says what it does
    """``[function(item) for item in items]``, the items shared out among the threads; results in order.

    While any map runs, in any thread, NumPy's OpenBLAS runs on one thread (each piece is already one
    thread's work, and OpenBLAS's own spinning threads would take the cores); its thread count is back once
    the last of them returns or raises. A map nested in a piece, or started while another thread's map has
    the workers, runs its pieces in its own thread.
    """
    items = list(items)
    running = _running_threads()
    if running == 1 or _spin is None or not items:
        return [function(item) for item in items]
    token, job = object(), None
    try:
        try:
            with _claim: _enter(token)  # noqa: E701 - one line: no interrupt between taking the lock and leaving it
            if _owner is not token or len(items) == 1:
                return [function(item) for item in items]
            _ensure_watchdog()                     # before any worker spins for this job
            while len(_workers) < running - 1:
                _workers.append(_Worker())
            job = _Job(function, items)
            for worker in _workers[:running - 1]:
                worker.post(job)
            job.take_pieces()
            job.finish()
            if job.error is not None:
                raise job.error
            return job.results
        finally:
            if token in _active or _owner is token:
                _leave(token, job)
    finally:
        if token in _active or _owner is token:   # the cleanup above was itself interrupted: once more
            _leave(token, job)


def _enter(token) -> None:
    """Called under _claim: count the map as running, give it the workers if they are free, and put
    OpenBLAS on one thread. Registered first, so that _leave undoes whatever part of this happened."""
    global _owner
    _active.add(token)
    if _owner is None: _owner = token  # noqa: E701 - one statement, so the pool is taken entirely or not at all
    _blas_on_one_thread()


def _leave(token, job) -> None:
    """End a map (idempotent): its workers leave its job, the pool is free if it had it, and OpenBLAS gets its
    threads back if no other map runs. Each step runs even when the one before it raised."""
    try:
        if _owner is token and job is not None:
            job.finish()
    finally:
        with _claim: _release(token)  # noqa: E701 - one line, as in map


def _release(token) -> None:
    global _owner, _last_used
    try:
        if _owner is token:
            _last_used = time.perf_counter()
            _owner = None
    finally:
        _active.discard(token)
        if not _active:
            _blas_restore()


def rest() -> None:
    """Stop the workers spinning now, e.g. before timing other code; they wake on the next :func:`map`.

    Safe at any time: a worker told to rest during a map leaves its pieces to the others.
    """
    for worker in list(_workers):
        worker.rest()
    with _claim: _restore_if_idle()  # noqa: E701


def _restore_if_idle() -> None:
    if not _active:
        _blas_restore()


def _ensure_watchdog():
    """Start a watchdog unless one runs (called by the pool's owner, so a running one cannot end meanwhile)."""
    global _watchdog
    if _watchdog is None:
        watchdog = threading.Thread(target=_watch, daemon=True, name="tinybn-watchdog")
        watchdog.start()
        _watchdog = watchdog   # after start: interrupted in between, the next map starts another (harmless)


def _watch():
    """Put the workers to sleep once no map has run for ``IDLE_SPIN_SECONDS``, then end (the next map
    starts a new watchdog), so an idle program has no thread waking up at all."""
    global _watchdog
    while True:
        time.sleep(IDLE_SPIN_SECONDS)
        with _claim:
            if _owner is None and time.perf_counter() - _last_used > IDLE_SPIN_SECONDS:
                for worker in list(_workers):
                    worker.rest()
                _restore_if_idle()                 # (after an interrupt left OpenBLAS on one thread)
                if _watchdog is threading.current_thread():
                    _watchdog = None
                return


def _blas_on_one_thread() -> None:
    global _blas_before
    if _blas_before is None:                       # else a map interrupted before restoring: keep its value
        count = blas.get_threads()
        if count is None or count <= 1:
            return
        _blas_before = count
    blas.set_threads(1)


def _blas_restore() -> None:
    global _blas_before
    if _blas_before is not None:
        blas.set_threads(_blas_before)
        _blas_before = None


def _forget_workers():
    """In a forked child the workers' threads do not exist, nor the map that may have had OpenBLAS on one
    thread when another thread forked: start afresh, with OpenBLAS's thread count given back."""
    global _watchdog, _claim, _owner, _active
    _blas_restore()
    _workers.clear()
    _watchdog = None
    _claim = threading.Lock()
    _owner = None
    _active = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
