"""The command line's argument types, its help formatter, and the kernels option and line every command shares."""
from __future__ import annotations

import argparse
import math
import sys

from .. import kernels


def argument(convert, accept, wanted: str):
    """An argparse type: ``convert(text)``, refused with "must be WANTED, got TEXT" unless ``accept(value)``."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


positive_int = argument(int, lambda v: v >= 1, "a positive whole number (at least 1)")
non_negative_int = argument(int, lambda v: v >= 0, "a whole number of at least 0")
at_least_two = argument(int, lambda v: v >= 2, "at least 2 images (batch norm needs 2 per batch)")
positive_float = argument(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
non_negative_float = argument(float, lambda v: v >= 0 and math.isfinite(v), "a finite number of at least 0")
momentum_value = argument(float, lambda v: 0 <= v < 1, "at least 0 and below 1")


class Help(argparse.HelpFormatter):
    """Each option's default, said once: appended where the help text does not already say it; not for flags."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" not in text and not unset and action.option_strings:
            text += " (default: %(default)s)"
        return text


def kernels_argument(parser) -> None:
    parser.add_argument("--kernels", choices=("fastest", "numba", "reference"), default="fastest",
                        help="which implementation runs each op: the fastest installed here (numba's compiled kernels "
                             "where installed), numba's, or the readable reference of tinybn/functional")


def say_kernels(device=None, file=None) -> None:
    """The first line of a command's output: which kernel family runs which ops on ``device``."""
    from ..backend import resolve_device

    print(kernels.describe(device=resolve_device(device)[0]), file=file or sys.stdout, flush=True)
