"""Watching batch norm work (``train --bn-stats``): what each BN layer sees at every training step.

For every normalization layer with running statistics (batch norm of every kind, batch renorm, decorrelated BN,
instance norm that tracks them), each training step's batch mean and variance of a few channels next to the
layer's running statistics after that step (the lag that makes prediction mode swing at a large learning rate):
what :meth:`tinybn.nn.norm.Normalization.watch` says; its scale and shift (γ and β) at the end of every epoch;
and for every sigmoid, the fraction of its outputs that are saturated (below 0.05 or above 0.95, where its
gradient is under 0.05 of its largest). Written to ``bn_stats.json`` and drawn in ``bn_stats.png``.

The recorder only watches, through forward hooks: it changes no value the model computes. Its statistics are
computed from each layer's input, in float64 on the host, for the first ``channels`` channels only. A training
step is a forward of the model in training mode that records a graph; evaluation and the precise-statistics pass
(under ``no_grad``) are not recorded, and a layer used twice in a step is recorded at its first use.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy

from .. import backend
from ..autograd import is_grad_enabled
from ..nn import Conv2d, Linear, Normalization, Sigmoid
from .checkpoint import replace_atomically
from .loop import Callback

SATURATED = (0.05, 0.95)


def layer_labels(model) -> dict:
    """Names as a student sees the model, by module path: "conv 1", "BN 1 (after conv 1)", "sigmoid 1 (after
    BN 1)", ... counted in the order the model holds them (the paths, "1", "5", are positions in a Sequential)."""
    labels, counts, last = {}, {}, None
    kinds = ((Conv2d, "conv"), (Linear, "dense"), (Sigmoid, "sigmoid"))
    for name, module in model.named_modules():
        kind = next((word for cls, word in kinds if isinstance(module, cls)), None)
        if isinstance(module, Normalization):          # batch norm of any kind is "BN"; the others by name
            kind = "BN" if module.batch_dependent else type(module).__name__
        if kind is None:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        short = f"{kind} {counts[kind]}"
        labels[name] = short if kind in ("conv", "dense") or last is None else f"{short} (after {last})"
        last = short
    return labels


class BNStatsRecorder:
    """Records, through forward hooks, what every BN layer and sigmoid of ``model`` sees in training mode."""

    def __init__(self, model, channels: int = 3, first_epoch: int = 1):
        self.channels, self.first_epoch = channels, first_epoch
        self.bn = [(name, module) for name, module in model.named_modules()
                   if isinstance(module, Normalization) and module.running_statistics]
        self.sigmoids = [(name, module) for name, module in model.named_modules() if isinstance(module, Sigmoid)]
        self.steps = 0                       # training steps recorded so far (over every epoch)
        self.epoch_ends = []                 # the step count at the end of each epoch
        self.layers = {name: {key: [] for key in ("batch_mean", "batch_var", "moving_mean", "moving_var", "gamma",
                                                  "beta")} for name, _ in self.bn}
        self.saturation = {name: [] for name, _ in self.sigmoids}
        self._recorded = {}                  # name -> the step it last recorded (a layer used twice records once)
        # each hook knows its layer by name, not by the module's identity: the module that calls it may be another
        # object sharing the hook (a layer's synchronized form, made after the recorder)
        self._handles = [module.register_forward_hook(functools.partial(self._watch_bn, name)) for name, module in self.bn]
        self._handles += [module.register_forward_hook(functools.partial(self._watch_sigmoid, name))
                          for name, module in self.sigmoids]
        self._handles.append(model.register_forward_hook(self._count_step))
        watched = {name for name, _ in (*self.bn, *self.sigmoids)}
        self.labels = {name: label for name, label in layer_labels(model).items() if name in watched}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    # --------------------------------------------------------------------------------- hooks

    @staticmethod
    def _recording(module) -> bool:
        # training steps only: not evaluation, and not the precise-statistics pass (under no_grad)
        return module.training and is_grad_enabled()

    def _first_call_of_the_step(self, name, module) -> bool:
        if not self._recording(module) or self._recorded.get(name) == self.steps:
            return False
        self._recorded[name] = self.steps
        return True

    def _count_step(self, model, inputs, output):
        """The model's own hook, after every layer's: one training step done."""
        if self._recording(model):
            self.steps += 1

    def _watch_bn(self, name, module, inputs, output):
        if not self._first_call_of_the_step(name, module):
            return None
        seen = module.watch(getattr(inputs[0], "data", inputs[0]), self.channels)   # running ones after this step
        record = self.layers[name]
        for key in record:
            if key in seen:
                record[key].append(seen[key])
        return None

    def _watch_sigmoid(self, name, module, inputs, output):
        if not self._first_call_of_the_step(name, module):
            return None
        y = output.data
        xp = backend.get_array_module(y)
        low, high = SATURATED
        self.saturation[name].append(float(xp.mean((y < low) | (y > high))) if y.size else 0.0)
        return None

    # --------------------------------------------------------------------------------- epochs and output

    def end_epoch(self) -> None:
        """Note where an epoch ended and each BN layer's γ and β (every channel)."""
        self.epoch_ends.append(self.steps)
        for name, module in self.bn:
            for key, tensor in zip(("gamma", "beta"), module.scale_and_shift()):
                if tensor is not None:
                    self.layers[name][key].append(backend.to_numpy(tensor.data).reshape(-1).astype(float).tolist())

    def to_json(self) -> dict:
        return {"channels": self.channels, "saturated_below_or_above": list(SATURATED), "first_epoch": self.first_epoch,
                "epoch_ends": self.epoch_ends, "labels": self.labels,
                "bn_layers": self.layers, "sigmoid_saturation": self.saturation}

    def load(self, document: dict, epochs_done: int) -> bool:
        """Start from an earlier run's records (as :meth:`to_json` wrote them), for ``--resume`` after
        ``epochs_done`` epochs; False (and nothing taken) unless they describe this model's epochs 1 to
        ``epochs_done`` exactly."""
        try:
            layers, saturation = document["bn_layers"], document["sigmoid_saturation"]
            if (document["channels"] != self.channels or set(layers) != set(self.layers)
                    or set(saturation) != set(self.saturation) or document.get("first_epoch", 1) != 1
                    or len(document["epoch_ends"]) != epochs_done):
                return False
            self.first_epoch = 1
            self.epoch_ends = [int(end) for end in document["epoch_ends"]]
            self.steps = self.epoch_ends[-1] if self.epoch_ends else 0
            self.layers = {name: {key: list(layers[name][key]) for key in record} for name, record in self.layers.items()}
            self.saturation = {name: list(saturation[name]) for name in self.saturation}
        except (KeyError, TypeError, ValueError):
            return False
        return True


def plot(document: dict, path: Path, title: str = "") -> bool:
    """``bn_stats.png``: per BN layer, the batch mean and variance of each step against the moving averages;
    then the sigmoids' saturation and γ and β per epoch."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    first = document.get("first_epoch", 1)
    if not document["bn_layers"]:          # no batch norm: the sigmoids' saturation is the whole story
        fig = Figure(figsize=(6, 3.6), dpi=110)
        _saturation_panel(fig.subplots(), document, first)
        heading = "(no batch-norm layer)"
    else:
        fig, heading = _layer_panels(document, first)
    fig.suptitle((title + "\n" if title else "") + heading, fontsize=9)
    fig.tight_layout()
    replace_atomically(Path(path), fig.savefig, mode="wb")
    return True


def _layer_panels(document: dict, first: int):
    """Rows 1 and 2: each BN layer's batch and moving statistics; row 3: saturation, γ and β. Returns the
    figure and the heading that explains its lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers, ends = document["bn_layers"], document["epoch_ends"]
    columns = max(len(layers), 3)
    fig = Figure(figsize=(3.1 * columns, 7.8), dpi=110)
    axes = fig.subplots(3, columns, squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]

    def epochs_of(count):
        return step_positions(ends, first, count)

    for column, (name, record) in enumerate(layers.items()):
        for row, (batch, moving, label) in enumerate((("batch_mean", "moving_mean", "mean"),
                                                      ("batch_var", "moving_var", "variance"))):
            ax = axes[row][column]
            values, averages = numpy.array(record[batch]), numpy.array(record[moving])
            if values.size == 0:
                continue
            x = epochs_of(len(values))
            for channel in range(values.shape[1]):
                color = colors[channel % len(colors)]
                ax.plot(x, values[:, channel], color=color, alpha=0.25, linewidth=0.6)
                if averages.size:          # (decorrelated BN keeps a whitening matrix, not a variance per channel)
                    ax.plot(x, averages[:, channel], color=color, linewidth=1.4, label=f"channel {channel}")
            ax.set_title(f"{_label(document, name, 'BN layer')}: {label}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    for column in range(len(layers), columns):
        axes[0][column].axis("off")
        axes[1][column].axis("off")

    _saturation_panel(axes[2][0], document, first)
    for ax, key in ((axes[2][1], "gamma"), (axes[2][2], "beta")):
        _scale_panel(ax, document, key, first, colors)
    for column in range(3, columns):
        axes[2][column].axis("off")
    shown = ", ".join(f"{color.split(':')[1]} = channel {c}" for c, color in enumerate(colors[:document["channels"]]))
    return fig, (f"top rows: thin lines are each training batch's statistics, thick lines the layer's moving "
                 f"averages after that step ({shown})")


def _scale_panel(ax, document: dict, key: str, first: int, colors: list) -> None:
    """γ or β (``key``) of every BN layer after each epoch: the mean over channels, and a band from min to max."""
    from matplotlib.ticker import MaxNLocator

    layers = document["bn_layers"]
    for column, (name, record) in enumerate(layers.items()):
        values = record[key]
        if not values:
            continue
        epochs = numpy.arange(first, first + len(values))
        ax.set_xlim(first - 0.5, first + len(values) - 0.5)
        mean = numpy.array([numpy.mean(v) for v in values])
        low_, high_ = numpy.array([numpy.min(v) for v in values]), numpy.array([numpy.max(v) for v in values])
        color = colors[column % len(colors)]
        ax.plot(epochs, mean, marker="o", markersize=3, color=color, label=_label(document, name, "layer").split(" (")[0])
        ax.fill_between(epochs, low_, high_, color=color, alpha=0.12)
    ax.set_title(f"{'γ' if key == 'gamma' else 'β'} after each epoch\n(line: mean over channels; band: min to max)",
                 fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if layers:
        ax.legend(fontsize=6)


def step_positions(ends: list[int], first_epoch: int, count: int) -> list[float]:
    """Each recorded step's position in epochs: step k (from 1) of epoch e of n steps is at e − 1 + k / n."""
    positions, start = [], 0
    for offset, end in enumerate(ends):
        n = max(end - start, 1)
        positions += [first_epoch - 1 + offset + (k + 1) / n for k in range(end - start)]
        start = end
    last = float(first_epoch - 1 + len(ends))
    return positions[:count] + [last] * max(0, count - len(positions))


def _saturation_panel(ax, document: dict, first: int) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, values in document["sigmoid_saturation"].items():
        if values:
            ax.plot(step_positions(document["epoch_ends"], first, len(values)), values, linewidth=0.8,
                    label=_label(document, name, "sigmoid"))
    low, high = document["saturated_below_or_above"]
    ax.set_title(f"sigmoid outputs < {low} or > {high}", fontsize=9)
    ax.set_ylabel("fraction of outputs", fontsize=8)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if document["sigmoid_saturation"]:
        ax.legend(fontsize=6)


def _label(document: dict, name: str, kind: str) -> str:
    """A layer's label as :func:`layer_labels` gave it (older records have none: then its kind and path)."""
    return document.get("labels", {}).get(name, f"{kind} {name}")


def write(recorder: BNStatsRecorder, out: Path, title: str = "") -> None:
    document = recorder.to_json()
    replace_atomically(out / "bn_stats.json", lambda handle: handle.write(json.dumps(document)))
    plot(document, out / "bn_stats.png", title)


class BNStatsFiles(Callback):
    """The training loop's callback for ``--bn-stats``: each epoch's end noted in ``recorder``, then
    ``bn_stats.json`` and ``bn_stats.png`` written into ``out`` (after the checkpoint)."""

    def __init__(self, recorder: BNStatsRecorder, out: Path, title: str = ""):
        self.recorder, self.out, self.title = recorder, out, title

    def on_epoch_end(self, epoch, row):
        self.recorder.end_epoch()
        write(self.recorder, self.out, self.title)
