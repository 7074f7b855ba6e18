"""P ranks as threads of one process, for testing collectives without MPI (and within Hypothesis' budget).

``run_ranks(P, work)`` calls ``work(comm)`` on P threads at once, each with its own
:class:`ThreadCommunicator`, and returns their results in rank order (an exception in any rank is raised
here; the others are released rather than left waiting). The collectives meet at a barrier and combine in
rank order, as MPI's would.
"""
from __future__ import annotations

import copy
import threading

import numpy

from tinybn import backend
from tinybn.distributed import Communicator


class _Group:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size


class ThreadCommunicator(Communicator):
    def __init__(self, group, rank):
        self.group, self.rank, self.world_size, self.local_size = group, rank, group.size, group.size
        self.calls = []          # the collectives this rank made, in order

    def _exchange(self, value):
        group = self.group
        group.barrier.wait()
        group.slots[self.rank] = value
        group.barrier.wait()
        values = list(group.slots)
        group.barrier.wait()
        return values

    def all_reduce(self, array):
        self.calls.append(("all_reduce", array.size))
        values = self._exchange(backend.to_numpy(array).copy())
        total = values[0].copy()
        for value in values[1:]:
            total = total + value
        return backend.to_device(total, backend.device_of(array))

    def all_gather(self, array):
        self.calls.append(("all_gather", array.size))
        values = self._exchange(backend.to_numpy(array).copy())
        return backend.to_device(numpy.stack(values), backend.device_of(array))

    def broadcast(self, value, root=0):
        """Root's value, a copy of its own on every other rank (as MPI's is: ranks share no object)."""
        self.calls.append(("broadcast", None))
        value = self._exchange(value)[root]
        return value if self.rank == root else copy.deepcopy(value)

    def barrier(self):
        self._exchange(None)


def run_ranks(size, work):
    group = _Group(size)
    results, errors = [None] * size, [None] * size

    def run(rank):
        try:
            results[rank] = work(ThreadCommunicator(group, rank))
        except BaseException as error:   # noqa: BLE001 - reraised below, in the caller's thread
            errors[rank] = error
            group.barrier.abort()        # the other ranks stop waiting for this one

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None and not isinstance(error, threading.BrokenBarrierError):
            raise error
    for error in errors:
        if error is not None:
            raise error
    return results
