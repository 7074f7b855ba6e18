"""Command line: ``python -m tinybn train|eval|bench`` (also installed as ``tinybn``): the arguments, parsed
and handed to :mod:`tinybn.app.run` (train, eval) or :mod:`tinybn.app.bench`."""
from __future__ import annotations

import argparse
import sys

from .. import distributed, kernels
from ..backend import DeviceUnavailableError
from .arguments import (Help, at_least_two, kernels_argument, momentum_value, non_negative_float, non_negative_int,
                        positive_float, positive_int)
from .data import DataError
from .models import MODELS
from .run import in_mpi_job, run_eval, run_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinybn", description="tinybn: batch normalization on NumPy and CuPy")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train LeNet or LeNet-BN on Fashion-MNIST (the chapter's recipe)",
                                formatter_class=Help)
    train.add_argument("--model", choices=MODELS, default="lenet-bn", help="the chapter's LeNet, with BN layers from scratch, or with the concise BN layers")
    train.add_argument("--epochs", type=positive_int, default=10, help="passes over the training images")
    train.add_argument("--lr", type=positive_float, default=1.0, help="learning rate")
    train.add_argument("--batch-size", type=positive_int, default=256, help="images per training step")
    train.add_argument("--device", default=None, help="cpu, gpu, cuda or cuda:N (default: $TINYBN_DEVICE or cpu)")
    train.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial weights, the shuffling and dropout")
    train.add_argument("--out", default=None, help="output folder (default: runs/MODEL)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    train.add_argument("--override-config", action="store_true",
                       help="with --resume: continue with settings (lr, batch size, ...) other than the checkpoint's")
    train.add_argument("--data", default=None, help="folder with the Fashion-MNIST files (default: $TINYBN_DATA, "
                                                    "the cache, then /usr/share/datasets/fashion-mnist)")
    train.add_argument("--download", action="store_true", help="download Fashion-MNIST if it is not found")
    train.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule")
    train.add_argument("--momentum", type=momentum_value, default=0.0, help="SGD momentum")
    train.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="L2 penalty added to every gradient, times the weight")
    train.add_argument("--train-subset", type=at_least_two, default=None, help="use only the first N training images")
    train.add_argument("--precise-bn", type=non_negative_int, default=None, metavar="N",
                       help="after every epoch, also report the accuracy with BN statistics recomputed over N "
                            "training batches (precise BN; 0: off); the final model and checkpoint keep them "
                            "(default: 50 for the models with batch norm)")
    train.add_argument("--val-size", type=non_negative_int, default=0, metavar="N",
                       help="hold out N random training images for validation")
    train.add_argument("--keep-best", action="store_true",
                       help="also keep OUT/best.npz, the epoch with the best validation accuracy (with --val-size), "
                            "else the best test accuracy (for demonstration only)")
    train.add_argument("--bn-stats", action="store_true",
                       help="record each step's batch statistics next to the moving averages, gamma and beta per "
                            "epoch and the sigmoids' saturation: OUT/bn_stats.png and OUT/bn_stats.json")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel training over the ranks of an MPI job: mpiexec -n P python -m tinybn train "
                            "--distributed (--batch-size stays the global batch; docs/distributed.md)")
    train.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                       help="with --distributed: batch norm over the whole batch (SyncBatchNorm), or with "
                            "--no-sync-bn over each rank's shard (default: on)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--no-plot", action="store_true", help="do not write metrics.png")
    kernels_argument(train)

    evaluate = commands.add_parser("eval", help="report the test accuracy of a checkpoint", formatter_class=Help)
    evaluate.add_argument("checkpoint", help="a checkpoint.npz or best.npz written by train")
    evaluate.add_argument("--device", default=None, help="cpu, gpu, cuda or cuda:N (default: $TINYBN_DEVICE or cpu)")
    evaluate.add_argument("--data", default=None, help="folder with the Fashion-MNIST files (default: as for train)")
    evaluate.add_argument("--download", action="store_true", help="download Fashion-MNIST if it is not found")
    evaluate.add_argument("--precise-bn", type=non_negative_int, default=0, metavar="N",
                          help="also report the accuracy with BN statistics recomputed over N training batches "
                               "(default: the precise statistics saved with the checkpoint, if any)")
    kernels_argument(evaluate)

    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(commands.add_parser("bench", help="measure training and prediction throughput",
                                            formatter_class=Help))
    return parser


def main(argv=None) -> int:
    ranks = distributed.launcher_size()
    if ranks is not None and ranks > 1:
        return in_mpi_job(argv, build_parser)
    try:
        args = build_parser().parse_args(argv)
        kernels.threads()   # a bad TINYBN_NUM_THREADS is reported now, in one line, not in the middle of a run
        kernels.use(args.kernels)
        if args.command == "train":
            return run_train(args)
        if args.command == "eval":
            return run_eval(args)
        from .bench import run as run_bench
        return run_bench(args)
    except (DataError, DeviceUnavailableError, FileNotFoundError, ValueError, KeyError,
            distributed.MPIUnavailableError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as error:       # a file that cannot be read or written: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
