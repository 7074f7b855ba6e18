"""The collectives a data-parallel job needs, as an interface, and the communicator that layers use by default.

A :class:`Communicator` connects the *ranks* of a job (0 to ``world_size`` − 1), each a process holding a full
copy of the model and its own shard of every batch. Its collectives (every rank must make each call, in the
same order, or the ranks wait for each other for ever):

* ``all_reduce(array)``: the sum over the ranks, a new array on every rank;
* ``all_gather(array)``: the ranks' arrays stacked along a new first axis, in rank order, on every rank;
* ``broadcast(value, root=0)``: root's array or picklable object, on every rank;
* ``barrier()``; ``abort(code)`` ends every rank of the job at once.

This module is the engine's side of data parallelism: synchronized layers and the tools that pool statistics
across ranks hold a communicator and call it, without knowing how the bytes move. :mod:`tinybn.distributed`
provides the one that moves them over MPI, and :func:`tinybn.distributed.init` makes it the default
(:func:`set_default`). Without it, :func:`default` is a :class:`LocalCommunicator`, one process, whose
collectives return their input.
"""
from __future__ import annotations

import os

__all__ = ["Communicator", "LocalCommunicator", "default", "is_initialized", "launcher_rank", "launcher_size",
           "set_default"]


class Communicator:
    """The collectives tinybn uses; see the module docstring. Subclasses move the bytes."""
    rank = 0
    world_size = 1
    local_size = 1

    def all_reduce(self, array):
        raise NotImplementedError

    def all_gather(self, array):
        """The ranks' arrays stacked in rank order; every rank must give the same shape and dtype (MPI's rule:
        tinybn's own calls see to it, and synchronized batch norm checks it)."""
        raise NotImplementedError

    def broadcast(self, value, root: int = 0):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        raise SystemExit(code)

    def tell_stopping(self) -> None:
        """Rank 0, on Ctrl-C: tell the other ranks, without waiting for them, that it will say so and end the job."""

    def heard_stopping(self, within: float) -> bool:
        """Whether rank 0 said :meth:`tell_stopping`, waiting at most ``within`` seconds for it (a rank 0 blocked in
        a collective that this rank left never says it; then this rank must speak for the job)."""
        return False

    def __deepcopy__(self, memo):
        return self          # a connection to the other ranks, not data: a copied model keeps talking to them

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


def check_summable(array) -> None:
    if array.dtype.kind not in "iufc":
        raise TypeError(f"all_reduce sums numbers; got an array of dtype {array.dtype}"
                        + (" (convert booleans to int)" if array.dtype.kind == "b" else ""))


class LocalCommunicator(Communicator):
    """One process: every collective returns (a copy of) its input."""

    def all_reduce(self, array):
        check_summable(array)
        return array.copy()

    def all_gather(self, array):
        return array[None].copy()

    def broadcast(self, value, root: int = 0):
        if root != 0:
            raise ValueError(f"broadcast: root {root} is not a rank of a one-process communicator")
        return value

    def barrier(self) -> None:
        pass


# Launchers say who is who in the environment before MPI starts: MPICH's hydra and Open MPI's mpirun.
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _from_environment(names) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_rank() -> int | None:
    """This process's rank as an MPI launcher announced it, without starting MPI; None outside a launcher."""
    return _from_environment(_RANK_VARIABLES)


def launcher_size() -> int | None:
    """The number of ranks an MPI launcher started, without starting MPI; None outside a launcher."""
    return _from_environment(_SIZE_VARIABLES)


_default: Communicator | None = None


def set_default(comm: Communicator | None) -> None:
    """Make ``comm`` the communicator that layers and tools use when given none (None: one process again)."""
    global _default
    _default = comm


def is_initialized() -> bool:
    return _default is not None


def default() -> Communicator:
    """The communicator :func:`tinybn.distributed.init` made, else a single-process one; refuses to pretend a job
    of several ranks is one process (each rank would train alone without a word)."""
    if _default is not None:
        return _default
    size = launcher_size()
    if size is not None and size > 1:
        raise RuntimeError(f"this process is one of {size} ranks started by an MPI launcher, but "
                           f"tinybn.distributed.init() was not called, so the ranks cannot talk to each other; "
                           f"call it first (python -m tinybn train takes --distributed)")
    return LocalCommunicator()
