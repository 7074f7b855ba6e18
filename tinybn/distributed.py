"""Several processes training one model: a communicator over MPI (mpi4py), and nothing home-made.

Launch P copies of a program with MPI's launcher; each is a *rank* (0 to P − 1) that holds a full copy
of the model and its own shard of every batch::

    mpiexec -n 2 python -m tinybn train --distributed          # or: python -m mpi4py -m tinybn ...

In the program::

    from tinybn import distributed
    comm = distributed.init()           # MPI's COMM_WORLD; rank and world_size tell who is who
    total = comm.all_reduce(array)      # the element-wise sum over the ranks, on every rank

What the communicator offers (every call is *collective*: every rank must make it, in the same order,
or the ranks wait for each other for ever):

* ``rank``, ``world_size``, ``local_size`` (ranks on this machine);
* ``all_reduce(array)``: the sum over the ranks, a new array on every rank;
* ``all_gather(array)``: the ranks' arrays stacked along a new first axis, in rank order, on every rank;
* ``broadcast(value, root=0)``: root's array or picklable object, on every rank;
* ``barrier()``; ``abort(code)`` ends every rank of the job at once (a failed rank must not leave the
  others waiting in a collective).

Arrays travel with mpi4py's buffer methods (``Allreduce``, ``Allgather``, ``Bcast``: no pickling). A CuPy
array is copied to the host, communicated and copied back: tinybn does not assume a CUDA-aware MPI, and
the GPU transport of choice, NCCL through ``cupy.cuda.nccl``, is the next step behind this same interface
(docs/distributed.md).

Without MPI, or in a program not started by an MPI launcher, :func:`get_communicator` is a
single-process communicator whose collectives return their input: ``nn.SyncBatchNorm`` is then plain batch
norm. A program started by a launcher with several ranks that never called :func:`init` gets an error
instead of P independent trainings that look like one.
"""
from __future__ import annotations

import os
import warnings

import numpy

from . import backend, communicator, kernels
from .communicator import (Communicator, LocalCommunicator, check_summable, is_initialized, launcher_rank,
                           launcher_size)

__all__ = ["CommunicationError", "Communicator", "LocalCommunicator", "MPICommunicator", "MPIUnavailableError", "StoppedElsewhere", "agree",
           "all_reduce_gradients", "check_single_process", "get_communicator", "init", "is_initialized",
           "launcher_rank", "launcher_size", "share_cores"]

INSTALL_HINT = ("the extra from your clone of tinybn (it is not on PyPI): pip install -e '.[mpi]' (mpi4py and MPICH, "
                "both from PyPI)")


class MPIUnavailableError(RuntimeError):
    """mpi4py, or the MPI library under it, cannot be loaded."""


class CommunicationError(RuntimeError):
    """A collective failed on this rank (MPI's own words follow): most often the ranks passed arrays of
    different sizes."""


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


def _load_mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise MPIUnavailableError(f"tinybn.distributed needs mpi4py and an MPI library ({error}); "
                                  f"install them with {INSTALL_HINT}") from None
    except RuntimeError as error:  # mpi4py is there, the MPI library under it is not
        raise MPIUnavailableError(f"mpi4py could not load an MPI library ({error}); install one with "
                                  f"{INSTALL_HINT}") from None
    return MPI


class MPICommunicator(Communicator):
    """An mpi4py communicator (``MPI.COMM_WORLD`` by default)."""

    def __init__(self, comm=None):
        MPI = _load_mpi()
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()
        local.Free()

    def _host(self, array):
        """A contiguous host copy (or view) of ``array``, and a function that puts a host result where it came from."""
        device = backend.device_of(array)
        host = numpy.asarray(backend.to_numpy(array), order="C")     # (ascontiguousarray would make 0-d 1-d)
        return host, (lambda result: result if device == "cpu" else backend.to_device(result, device))

    def _call(self, name, *args, **kwargs):
        try:
            return getattr(self.comm, name)(*args, **kwargs)
        except self._mpi.Exception as error:
            raise CommunicationError(f"{name} failed on rank {self.rank}: {error.Get_error_string().splitlines()[0]}"
                                     ) from None

    def all_reduce(self, array):
        host, back = self._host(array)
        check_summable(host)
        result = numpy.empty_like(host)
        self._call("Allreduce", host, result, op=self._mpi.SUM)
        return back(result)

    def all_gather(self, array):
        host, back = self._host(array)
        result = numpy.empty((self.world_size,) + host.shape, host.dtype)
        self._call("Allgather", host, result)
        return back(result)

    def broadcast(self, value, root: int = 0):
        """Root's value on every rank: a NumPy array by its buffer (every rank gets root's shape and dtype),
        anything else pickled."""
        if not 0 <= root < self.world_size:
            raise ValueError(f"broadcast: root {root} is not a rank (0 to {self.world_size - 1})")
        is_array = self.comm.bcast(isinstance(value, numpy.ndarray) and (value.shape, value.dtype.str)
                                   if self.rank == root else None, root=root)
        if not is_array:
            return self.comm.bcast(value if self.rank == root else None, root=root)
        shape, dtype = is_array
        result = numpy.asarray(value, order="C") if self.rank == root else numpy.empty(shape, numpy.dtype(dtype))
        self._call("Bcast", result, root=root)
        return result

    def barrier(self) -> None:
        self._call("Barrier")

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)

    _STOPPING = 7301        # the message tag of tell_stopping; tinybn sends no other point-to-point message

    def tell_stopping(self) -> None:
        for rank in range(1, self.world_size):
            self.comm.Isend(numpy.zeros(1, numpy.uint8), dest=rank, tag=self._STOPPING)

    def heard_stopping(self, within: float) -> bool:
        import time

        deadline = time.monotonic() + within
        while not self.comm.Iprobe(source=0, tag=self._STOPPING):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def init(comm=None, *, set_blas_threads: bool = False) -> Communicator:
    """Start MPI (if it is not running) and make its communicator the default; returns it. The ranks on one
    machine share its cores: tinybn's compiled kernels get ``cores // ranks on this machine`` threads each, and with
    ``set_blas_threads`` NumPy's BLAS too (:func:`share_cores`).

    ``comm`` may be an mpi4py communicator (``MPI.COMM_WORLD`` when omitted) or a :class:`Communicator`.
    Raises :class:`MPIUnavailableError`, saying what to install, when mpi4py or MPI is missing.
    """
    comm = comm if isinstance(comm, Communicator) else MPICommunicator(comm)
    communicator.set_default(comm)
    share_cores(comm, set_blas_threads)
    return comm


def share_cores(comm: Communicator, set_blas_threads: bool = False) -> int:
    """Give tinybn's compiled kernels ``cores // ranks on this machine`` threads each, unless ``TINYBN_NUM_THREADS``
    says otherwise; returns the count. (Two ranks with two threads each on two cores wait for each other's cores.)

    NumPy's BLAS threads belong to the program: tinybn limits them only when asked (``set_blas_threads``, as the
    command line does, through threadpoolctl); otherwise, when they would oversubscribe the cores, a warning says
    how to limit them."""
    count = kernels.threads()
    if not os.environ.get("TINYBN_NUM_THREADS", "").strip():
        count = max(1, kernels._cores() // comm.local_size)
        kernels.set_threads(count)
    limits = _blas_threads()
    if set_blas_threads and limits is not None:
        limits.limit(count)
    blas = limits.current() if limits is not None else None
    if comm.rank == 0 and blas is not None and blas > count and blas * comm.local_size > kernels._cores():
        warnings.warn(f"NumPy's BLAS runs {blas} threads in each of the {comm.local_size} ranks on this machine's "
                      f"{kernels._cores()} cores, and its waiting threads spin: a LeNet step ran 90x slower so. "
                      f"Launch with OPENBLAS_NUM_THREADS={count} (mpiexec -genv OPENBLAS_NUM_THREADS {count} ...), or "
                      f"call tinybn.distributed.init(set_blas_threads=True)", RuntimeWarning, stacklevel=3)
    return count


class _BlasThreads:
    """NumPy's BLAS thread count, through threadpoolctl."""

    def __init__(self, controller):
        self.controller = controller

    def current(self) -> int | None:
        counts = [info["num_threads"] for info in self.controller.info() if info.get("user_api") == "blas"]
        return max(counts) if counts else None

    def limit(self, count: int) -> None:
        self.controller.limit(limits=count, user_api="blas")


def _blas_threads():
    """A handle on NumPy's BLAS threads, or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return _BlasThreads(ThreadpoolController())


def get_communicator() -> Communicator:
    """The communicator :func:`init` made, else a single-process one (:func:`tinybn.communicator.default`)."""
    return communicator.default()


class StoppedElsewhere(RuntimeError):
    """Raised by :func:`agree` on a rank that did not fail, when another rank did."""


def agree(comm: Communicator, error: BaseException | None) -> None:
    """Every rank calls this at the same point, with the exception it caught on the way there or None; if any
    rank failed, every rank raises (one small collective).

    Rank 0 raises its own error if it has one, and the others :class:`StoppedElsewhere`; when rank 0 did not
    fail, each failing rank raises its own. So an error that every rank met (a bad setting, a missing file)
    is reported once, one particular to a rank is reported by it, and no rank is left waiting in a later
    collective. The error raised carries ``agreed = True``: every rank stops here, none need be aborted.
    """
    failed = comm.all_gather(numpy.array([error is not None], numpy.float64)).reshape(-1)
    if not failed.any():
        return
    if error is None or (comm.rank != 0 and failed[0]):
        error = StoppedElsewhere(f"rank {comm.rank}: another rank failed (it said why)")
    error.agreed = True
    raise error


def check_single_process(what: str = "this") -> None:
    """Refuse to run ``what`` as one of several ranks an MPI launcher started: each would do it alone."""
    ranks = launcher_size()
    if ranks is not None and ranks > 1:
        raise ValueError(f"this process is one of {ranks} that an MPI launcher started, and {what} would run in each "
                         f"of them alone (training: each its own model, into the same folder); use train "
                         f"--distributed (TrainConfig(distributed=True)) to train one model on all of them, or "
                         f"run a single process")


def all_reduce_gradients(parameters, comm: Communicator | None = None, extra=()) -> numpy.ndarray:
    """Sum every parameter's gradient over the ranks in one collective, on one flat buffer, in place.

    Each rank's gradients must be those of its share of the global loss (its mean loss times its share of
    the global batch), so that the sums are the gradients of the global loss. A parameter without a
    gradient on this rank contributes zeros (every rank sends the same layout). ``extra``: numbers summed
    in the same collective (the trainer's loss and hit count), in the buffer's dtype (the gradients', at least
    float32: whole numbers up to 2^24 are exact); returned as float64.
    """
    comm = comm or get_communicator()
    trained = [p for p in parameters if p.requires_grad]
    extra = numpy.asarray(extra, numpy.float64).reshape(-1)
    if not trained:
        return comm.all_reduce(extra) if extra.size else extra
    xp = backend.get_array_module(trained[0].data)
    # float32 gradients travel as float32; float16 ones too, so that the extras (hit counts) stay exact to 2^24
    dtype = numpy.result_type(numpy.float32, *(p.dtype for p in trained))
    flat = xp.zeros(sum(p.data.size for p in trained) + extra.size, dtype)
    start = 0
    for p in trained:
        if p.grad is not None:
            flat[start:start + p.data.size] = p.grad.reshape(-1)
        start += p.data.size
    flat[start:] = backend.to_device(extra.astype(dtype), backend.device_of(flat))
    flat = comm.all_reduce(flat)
    start = 0
    for p in trained:
        p.grad = flat[start:start + p.data.size].reshape(p.shape).astype(p.dtype)
        start += p.data.size
    return backend.to_numpy(flat[start:]).astype(numpy.float64)

