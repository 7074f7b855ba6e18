"""Command line: ``python -m tinybn train|eval|bench`` (also installed as ``tinybn``)."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy

from ..backend import DeviceUnavailableError
from . import checkpoint
from .data import DataError
from .models import MODELS


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinybn", description="tinybn: batch normalization on NumPy and CuPy")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train LeNet or LeNet-BN on Fashion-MNIST (the chapter's recipe)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--model", choices=MODELS, default="lenet-bn")
    train.add_argument("--epochs", type=positive_int, default=10)
    train.add_argument("--lr", type=positive_float, default=1.0, help="learning rate")
    train.add_argument("--batch-size", type=positive_int, default=256)
    train.add_argument("--device", default=None, help="cpu, gpu, cuda or cuda:N (default: $TINYBN_DEVICE or cpu)")
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--out", default=None, help="output folder (default: runs/MODEL)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    train.add_argument("--data", default=None, help="folder with the Fashion-MNIST files (default: $TINYBN_DATA, "
                                                    "the cache, then /usr/share/datasets/fashion-mnist)")
    train.add_argument("--download", action="store_true", help="download Fashion-MNIST if it is not found")
    train.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule")
    train.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--train-subset", type=positive_int, default=None, help="use only the first N training images")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--no-plot", action="store_true", help="do not write metrics.png")

    evaluate = commands.add_parser("eval", help="report the test accuracy of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--data", default=None)
    evaluate.add_argument("--download", action="store_true")

    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(commands.add_parser("bench", help="measure training and prediction throughput",
                                            formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def tune_process() -> None:
    """The command line owns its process: set the allocator thresholds the fast kernels want, and say so."""
    from .. import fast

    if fast.enabled():
        for change in fast.tune_process():
            print(f"tinybn: tuned this process: {change}", file=sys.stderr)


def run_train(args) -> int:
    from ..backend import resolve_device
    from .data import load_fashion_mnist
    from .train import Diverged, TrainConfig, prepare_output, train

    config = TrainConfig(model=args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         device=args.device, seed=args.seed, out=args.out or f"runs/{args.model}", resume=args.resume,
                         data=args.data, download=args.download, schedule=args.schedule, momentum=args.momentum,
                         weight_decay=args.weight_decay, train_subset=args.train_subset,
                         progress=not args.no_progress, plot=not args.no_plot)
    # everything that can be wrong with the arguments is reported before the process is tuned or a step is run
    resolve_device(config.device)
    checkpoint_path = prepare_output(config.out) / "checkpoint.npz"
    data = load_fashion_mnist(config.data, allow_download=config.download)
    tune_process()
    started = time.time()
    try:
        with numpy.errstate(all="ignore"):  # a diverging run overflows; the divergence guard says so in one line
            train(config, data=data)
    except KeyboardInterrupt:
        print(f"\ninterrupted. {checkpoint_words(checkpoint_path, started, config.resume)}", file=sys.stderr)
        return 130
    except Diverged as error:
        print(f"\nerror: {error}. {checkpoint_words(checkpoint_path, started, config.resume)}", file=sys.stderr)
        return 3
    return 0


def checkpoint_words(path, started: float, resumed: bool) -> str:
    """What a stopped run leaves behind to continue from, said truthfully."""
    try:
        written = os.path.getmtime(path) >= started
    except OSError:
        return "No epoch finished in this run, so it wrote no checkpoint."
    if written:
        return f"The checkpoint of the last complete epoch is {path}; the same command plus --resume continues from it."
    if resumed:
        return f"No epoch finished in this run; {path} is unchanged, and --resume continues from it again."
    return (f"No epoch finished in this run; {path} is from an earlier run (--resume continues that run, "
            f"and a run without it starts afresh).")


def run_eval(args) -> int:
    from .train import evaluate_checkpoint

    checkpoint.load(args.checkpoint)   # a file that is not a checkpoint is reported before the process is tuned
    tune_process()
    accuracy, meta = evaluate_checkpoint(args.checkpoint, args.data, args.device, args.download)
    print(f"{args.checkpoint}: {meta['config']['model']} after {meta['epoch']} epochs, test acc {accuracy:.4f}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..fast import parallel
        parallel.threads()  # a bad TINYBN_NUM_THREADS is reported now, in one line, not in the middle of a run
        if args.command == "train":
            return run_train(args)
        if args.command == "eval":
            return run_eval(args)
        from .bench import run as run_bench
        return run_bench(args)
    except (DataError, DeviceUnavailableError, FileNotFoundError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as error:       # a full disk, a folder that became unwritable: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
