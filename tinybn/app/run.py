"""Running a command once its arguments are parsed: training in this process, or as one rank of an MPI job
(where a rank that fails ends every rank, and rank 0 speaks for the job), and evaluating a checkpoint. Errors
become one line each and an exit status; a stopped run says what it leaves to continue from."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path

import numpy

from .. import distributed, kernels
from ..backend import DeviceUnavailableError
from . import checkpoint
from .arguments import say_kernels
from .data import DataError


def run_train(args, comm=None) -> int:
    """``train``; ``comm``: this rank's communicator when an MPI launcher started several (in_mpi_job)."""
    from .train import TrainConfig

    config = TrainConfig(model=args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         device=args.device, seed=args.seed, out=args.out or f"runs/{args.model}", resume=args.resume,
                         data=args.data, download=args.download, schedule=args.schedule, momentum=args.momentum,
                         weight_decay=args.weight_decay, train_subset=args.train_subset,
                         progress=not args.no_progress, plot=not args.no_plot, precise_bn=args.precise_bn,
                         val_size=args.val_size, keep_best=args.keep_best, overwrite=args.overwrite,
                         override_config=args.override_config, bn_stats=args.bn_stats,
                         distributed=args.distributed, sync_bn=args.sync_bn is not False)
    if not args.distributed:
        if args.sync_bn is not None:
            raise ValueError(f"--{'' if args.sync_bn else 'no-'}sync-bn chooses how batch norm works across the ranks "
                             f"of a --distributed run; without --distributed there is one process and plain batch norm")
        return train_in_this_process(config)
    return train_distributed(config, comm or distributed.init(set_blas_threads=True))


def train_in_this_process(config) -> int:
    from ..backend import resolve_device
    from .data import load_fashion_mnist
    from .train import Diverged, prepare_output, train

    # everything that can be wrong with the arguments is reported before the process is tuned or a step is run
    resolve_device(config.device)
    out = prepare_output(config.out, config.resume, config.overwrite)
    created = not out.exists()
    data = load_fashion_mnist(config.data, allow_download=config.download)
    say_kernels(config.device)
    started = time.time()
    stop = "\n" if config.progress else ""     # ends a progress bar's line first
    try:
        with numpy.errstate(all="ignore"):  # a diverging run overflows; the divergence guard says so in one line
            train(config, data=data)
        return 0
    except KeyboardInterrupt:
        print(f"{stop}interrupted. {checkpoint_words(out / 'checkpoint.npz', started, config)}", file=sys.stderr)
        return 130
    except Diverged as error:
        print(f"{stop}error: {error}. {checkpoint_words(out / 'checkpoint.npz', started, config)}", file=sys.stderr)
        return 3
    except OSError as error:    # a full disk, a folder that became unwritable: files are replaced whole or not at all
        print(f"{stop}error: could not write to {out} ({error.strerror or error}). "
              f"{checkpoint_words(out / 'checkpoint.npz', started, config)}", file=sys.stderr)
        return 2
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()                       # a run stopped before it wrote anything leaves no empty folder


def train_distributed(config, comm) -> int:
    """``train --distributed`` on one rank of an MPI job: rank 0 speaks for the job, and a rank that fails ends
    every rank at once (MPI_Abort), so that none waits for ever in a collective."""
    started = time.time()
    try:
        return _train_distributed(config, comm, started)
    except KeyboardInterrupt:          # Ctrl-C reaches every rank, wherever each is; one says it, all stop
        stop = "\n" if config.progress else ""
        path = Path(config.out) / "checkpoint.npz"
        if comm.rank == 0:
            comm.tell_stopping()
        elif comm.heard_stopping(within=5.0):
            time.sleep(60)             # rank 0 speaks and its MPI_Abort ends this rank; this is the fallback only
            comm.abort(130)
        # Rank 0, or a rank whose rank 0 is blocked in a collective that this rank left (where Python cannot see
        # the signal): it speaks for the job.
        words = (checkpoint_words(path, started, config) if comm.rank == 0 or path.parent.exists()
                 else "Rank 0 keeps the checkpoint of the last complete epoch, if one finished.")
        print(f"{stop}interrupted. {words}", file=sys.stderr, flush=True)
        comm.abort(130)
        return 130


def _set_up_every_rank(config, comm):
    """(the output folder on rank 0, else None; the data), on every rank. A set-up error may be every rank's (a bad
    setting) or one rank's (no data on its machine): the ranks agree on whether any failed before going on, so it
    is said once, by the rank it concerns."""
    from ..backend import resolve_device
    from .data import load_fashion_mnist
    from .train import prepare_output

    root, failure, out, data = comm.rank == 0, None, None, None
    try:
        resolve_device(config.device)
        out = prepare_output(config.out, config.resume, config.overwrite) if root else None
        if root:                      # a download (--download) happens once, before the other ranks look
            data = load_fashion_mnist(config.data, allow_download=config.download)
    except Exception as error:        # noqa: BLE001 - raised again by agree
        failure = error
    comm.barrier()
    try:
        if not root and failure is None:
            data = load_fashion_mnist(config.data, allow_download=False)
    except Exception as error:        # noqa: BLE001
        failure = error
    distributed.agree(comm, failure)
    return out, data


def _train_distributed(config, comm, started) -> int:
    from .train import Diverged, train

    root = comm.rank == 0
    try:
        out, data = _set_up_every_rank(config, comm)
    except distributed.StoppedElsewhere:
        return 2
    except (DataError, DeviceUnavailableError, FileNotFoundError, ValueError, OSError) as error:
        print(f"error{'' if root else f' on rank {comm.rank}'}: {error}", file=sys.stderr)
        return 2
    if root:
        say_kernels(config.device)
    if root and not os.environ.get("TINYBN_NUM_THREADS", "").strip():
        print(f"tinybn: the compiled kernels and NumPy's BLAS use {kernels.threads()} thread(s) in each of the "
              f"{comm.local_size} rank(s) on this machine; TINYBN_NUM_THREADS overrides", file=sys.stderr)
    created = root and not out.exists()
    stop = "\n" if config.progress else ""
    try:
        with numpy.errstate(all="ignore"):
            train(config, data=data, comm=comm, log=print if root else (lambda *args: None))
        return 0
    except Diverged as error:         # every rank sees the same global loss and weights, so all stop here
        if root:
            print(f"{stop}error: {error}. {checkpoint_words(Path(config.out) / 'checkpoint.npz', started, config)}",
                  file=sys.stderr)
        return 3
    except distributed.StoppedElsewhere:     # another rank failed and said why
        return 2
    except (DataError, FileNotFoundError, ValueError, KeyError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if isinstance(error, OSError) and root:
            # only rank 0 writes: a full disk, a folder that became unwritable (files are replaced whole or not at all)
            message = (f"could not write to {out} ({error.strerror or error}). "
                       f"{checkpoint_words(out / 'checkpoint.npz', started, config)}")
        print(f"{stop}error{'' if root else f' on rank {comm.rank}'}: {message}", file=sys.stderr, flush=True)
        if not getattr(error, "agreed", False):    # the other ranks may be waiting for this one: end them too
            comm.abort(2)
        return 2
    except Exception:
        import traceback
        print(f"{stop}rank {comm.rank} of {comm.world_size} failed; ending the job:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        comm.abort(1)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return 1


def checkpoint_words(path, started: float, config) -> str:
    """What a stopped run leaves behind to continue from, said truthfully."""
    try:
        written = os.path.getmtime(path) >= started
    except OSError:
        return "No epoch finished in this run, so it wrote no checkpoint."
    if written:
        how = ("the same command with --resume in place of --overwrite" if config.overwrite
               else "the same command" + ("" if config.resume else " plus --resume"))
        return f"The checkpoint of the last complete epoch is {path}; {how} continues from it."
    if config.resume:
        return f"No epoch finished in this run; {path} is unchanged, and --resume continues from it again."
    return (f"No epoch finished in this run; {path} is from an earlier run (--resume continues that run, "
            f"and a run without it starts afresh).")


def run_eval(args) -> int:
    from .train import accuracies, evaluate_checkpoint, plural

    from ..backend import resolve_device

    checkpoint.load(args.checkpoint)   # a file that is not a checkpoint, or a device that is not there, is
    resolve_device(args.device)        # reported before anything else is said
    say_kernels(args.device)
    result, meta = evaluate_checkpoint(args.checkpoint, args.data, args.device, args.download,
                                       precise_bn=args.precise_bn)
    print(f"{args.checkpoint}: {meta['config']['model']} after {plural(meta['epoch'], 'epoch')}, {accuracies(result)}")
    return 0


def _code_fingerprint() -> str:
    """A digest of tinybn's Python source, so that ranks running different versions are told apart."""
    import hashlib

    root = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def in_mpi_job(argv, build_parser) -> int:
    """The command line (``build_parser``'s) on one of several ranks an MPI launcher started. MPI starts first, so that anything that goes wrong on any
    rank from here on is agreed on and said once (by the rank it concerns), and no rank waits for ever."""
    try:
        comm = distributed.MPICommunicator()
    except distributed.MPIUnavailableError as error:     # every rank meets this
        if distributed.launcher_rank() in (None, 0):
            print(f"error: {error}", file=sys.stderr)
        return 2
    root = comm.rank == 0
    said, failure = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):   # help, argparse's errors
            args = build_parser().parse_args(argv)
        kernels.threads()      # a bad TINYBN_NUM_THREADS is reported now, in one line, not in the middle of a run
        kernels.use(args.kernels)
        distributed.init(comm, set_blas_threads=True)    # the command line owns its process
        ours = {"arguments": vars(args), "tinybn": _code_fingerprint()}
        theirs = comm.broadcast(ours)                    # every rank must run rank 0's command with rank 0's code
        if ours["tinybn"] != theirs["tinybn"]:
            raise ValueError(f"this rank runs another tinybn ({Path(__file__).parents[1]}) than rank 0: the ranks "
                             f"must run the same version")
        differ = [f"--{name.replace('_', '-')} {ours['arguments'][name]} (rank 0: {theirs['arguments'].get(name)})"
                  for name in ours["arguments"] if ours["arguments"][name] != theirs["arguments"].get(name)]
        if differ:
            raise ValueError(f"this rank was started with other arguments than rank 0: {'; '.join(differ)}; every "
                             f"rank must run the same command")
        if args.command == "train" and not args.distributed:
            raise ValueError(f"this process is one of {comm.world_size} that an MPI launcher started, and without "
                             f"--distributed each would train its own model into the same folder; add --distributed "
                             f"to train one model on all of them")
        if args.command != "train":
            raise ValueError(f"this process is one of {comm.world_size} that an MPI launcher started, and "
                             f"`{args.command}` would run in each of them alone; run it as one process (under MPI, "
                             f"tinybn runs train --distributed)")
    except (SystemExit, Exception) as error:    # noqa: BLE001 - agreed on below
        failure = error
    try:
        distributed.agree(comm, failure)
    except distributed.StoppedElsewhere:
        return 2
    except SystemExit as stop:            # --help, or an argument argparse refused: its own words, once
        text = said.getvalue()
        print(text if root else "".join(f"rank {comm.rank}: {line}\n" for line in text.splitlines()),
              end="", file=sys.stdout if stop.code == 0 else sys.stderr)
        return stop.code if isinstance(stop.code, int) else 2
    except Exception as error:            # noqa: BLE001
        print(f"error{'' if root else f' on rank {comm.rank}'}: {error}", file=sys.stderr)
        return 2
    try:
        return run_train(args, comm)
    except (DataError, DeviceUnavailableError, FileNotFoundError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if root:                           # argument checks before MPI's work: the same on every rank
            print(f"error: {message}", file=sys.stderr)
        return 2
