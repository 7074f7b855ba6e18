"""Which code runs each op: the readable reference, unless you ask for a compiled kernel family.

``import tinybn`` runs the pure NumPy functions of :mod:`tinybn.functional`, the code a student reads next to its
derivation: what you read is what runs. A kernel family is a second implementation of some ops, compiled for
speed and held to the reference's answers by the tests; it runs only when asked for::

    tinybn.kernels.available()            # ["reference", "numba"] where numba is installed
    tinybn.kernels.use("fastest")         # for the process: the fastest family installed here
    with tinybn.kernels.using("reference"):   # for this thread, within the block
        ...
    tinybn.kernels.active()               # the family running in this thread
    print(tinybn.kernels.describe())      # "kernels: numba for batch_norm, conv2d, ...; the reference for the rest"

``TINYBN_KERNELS=numba`` (or ``reference``, ``fastest``) in the environment does what :func:`use` does, when
tinybn is imported. ``python -m tinybn`` and the example scripts choose ``"fastest"``, in a line at their top,
and say in their first line of output which family runs which ops (``--kernels`` chooses another).

Families: ``"numba"`` (:mod:`tinybn.numba_kernels`: plain loops compiled by numba, from the extra
``tinybn[numba]``). Kernels attach to ops in one place, the op registry (:mod:`tinybn.ops`); this module only says
which family is active and loads it. Compiled kernels run on ``TINYBN_NUM_THREADS`` threads (default: every core
this process may use; :func:`set_threads`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os

from . import ops

__all__ = ["KernelsUnavailableError", "active", "available", "covered", "describe", "set_threads", "threads", "use",
           "using"]

FAMILIES = {"numba": "tinybn.numba_kernels"}          # family -> the module that registers its kernels
INSTALL = {"numba": "pip install -e '.[numba]' from your clone of tinybn (it is not on PyPI)"}
_loaded: set[str] = set()
_threads: int | None = None


class KernelsUnavailableError(ValueError):
    """A kernel family that is not installed, or a name that is not a family."""


def available() -> list[str]:
    """The families that can run here, the reference first, the fastest last."""
    return ["reference"] + [family for family in FAMILIES if importlib.util.find_spec(family) is not None]


def resolve(name: str) -> str:
    """The family ``name`` stands for ("fastest": the last of :func:`available`); refuses an unknown name or a
    family that is not installed, saying how to install it."""
    choice = str(name).strip().lower()
    if choice == "fastest":
        return available()[-1]
    if choice != "reference" and choice not in FAMILIES:
        raise KernelsUnavailableError(f"no kernel family {name!r}; choose one of reference, "
                                      f"{', '.join(FAMILIES)} or fastest")
    if choice not in available():
        raise KernelsUnavailableError(f"the {choice} kernels need {choice}, which is not installed here: "
                                      f"{INSTALL[choice]}; or use the reference")
    return choice


def _load(family: str) -> None:
    if family != "reference" and family not in _loaded:
        importlib.import_module(FAMILIES[family])           # registers its kernels in tinybn.ops
        _loaded.add(family)


def use(name: str) -> str:
    """Run the family ``name`` (``"reference"``, ``"numba"`` or ``"fastest"``) in every thread from now on (a thread
    inside :func:`using` keeps its own until it leaves); returns the family chosen."""
    family = resolve(name)
    _load(family)
    ops.set_family(family)
    return family


@contextlib.contextmanager
def using(name: str):
    """Within the block, run the family ``name`` in the calling thread only (as ``no_grad()`` does for grad mode)."""
    family = resolve(name)
    _load(family)
    with ops.family_in_thread(family):
        yield family


def active() -> str:
    """The family that runs in the calling thread."""
    return ops.active_family()


def covered(family: str | None = None) -> list[str]:
    """The ops that ``family`` (by default the active one) has kernels for."""
    family = family or active()
    return sorted(name for name in ops.names() if any(k.label == family for k in ops.get(name).kernels))


def describe(family: str | None = None, device: str = "cpu") -> str:
    """One line for the top of a program's output: which family runs which ops on ``device`` (the compiled
    families are CPU kernels: on a GPU the reference runs every op, on CuPy)."""
    family = family or active()
    if not str(device).startswith("cpu") and family != "reference":
        return (f"kernels: the readable reference for every op on {device} (tinybn/functional, on CuPy); "
                f"{family}'s kernels run on the CPU only")
    if family == "reference":
        missing = [f for f in FAMILIES if f not in available()]
        return ("kernels: the readable reference for every op (tinybn/functional)"
                + "".join(f"; {f} is not installed, for compiled kernels: {INSTALL[f]}" for f in missing))
    return (f"kernels: {family} for {', '.join(covered(family))} on {threads()} thread(s); the readable reference "
            f"for the rest (tinybn/functional)")


def _cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads() -> int:
    """How many threads compiled kernels use: :func:`set_threads`, else ``TINYBN_NUM_THREADS``, else every core
    this process may run on (a bad ``TINYBN_NUM_THREADS`` raises ValueError here)."""
    if _threads is not None:
        return _threads
    value = os.environ.get("TINYBN_NUM_THREADS", "").strip()
    return _parse_threads(value) if value else _cores()


@functools.lru_cache(maxsize=8)
def _parse_threads(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"TINYBN_NUM_THREADS={value!r} is not a positive whole number; unset it to use every core, "
                         f"or set it to e.g. 2")
    return count


def set_threads(count: int | None) -> None:
    """Use ``count`` threads in compiled kernels (None: ``TINYBN_NUM_THREADS`` or every core again)."""
    global _threads
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"set_threads: the number of threads must be a whole number of at least 1, got {count!r}")
    _threads = count


if os.environ.get("TINYBN_KERNELS", "").strip():
    try:
        use(os.environ["TINYBN_KERNELS"])
    except KernelsUnavailableError as error:
        raise KernelsUnavailableError(f"TINYBN_KERNELS={os.environ['TINYBN_KERNELS']!r}: {error}") from None
