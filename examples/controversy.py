"""The chapter's controversy, measured: does batch norm reduce internal covariate shift, or smooth the landscape?

The original paper explained batch norm by *internal covariate shift* (ICS): each layer's input distribution
moving as the layers before it learn. Santurkar, Tsipras, Ilyas & Madry (2018, "How Does Batch Normalization
Help Optimization?") measured it and found the other way round. This script repeats their three measurements with
tinybn's LeNet and LeNet-BN on Fashion-MNIST, following their definitions in our own code:

1. **Noisy BN.** After every BN layer, noise whose mean and spread change at every step (per channel, a mean
   drawn from U(-n, n) and a standard deviation from U(0, n), then Gaussian noise per value): covariate shift
   injected on purpose, in training only. Do LeNet, LeNet-BN and noisy LeNet-BN train differently? The
   distribution of one layer's input (the second sigmoid's) over training shows the shift.
2. **ICS as a change of gradient.** For layer i at step t: its weight's gradient G at the step's weights, and G'
   after the layers before it (and only they) took this step's update, on the same batch. ICS is ||G - G'||
   and cos(G, G'): 0 and 1 when what the layer sees does not move.
3. **Landscape smoothness.** At a step with gradient g, move to W - eta * g for several step sizes eta and record
   the range of the loss (loss variation), the largest ||grad L(W - eta g) - g|| (gradient predictiveness), and
   the largest ||grad L(W - eta g) - g|| / ||eta g|| (effective beta-smoothness).

Every measurement uses the engine's public API: parameters and their ``.data``/``.grad``, buffers, forward hooks,
``train()``/``eval()``. Each runs in training mode on the step's own batch, and leaves the weights and the
running statistics as it found them. ``--quick`` (one seed, one epoch, measured every 20 steps) takes under a
minute; the full run is 3 seeds x 10 epochs of each model with the chapter's learning rates.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy

import tinybn
from tinybn import functional as F, nn
from tinybn.app.data import DataLoader, load_fashion_mnist
from tinybn.app.evaluation import evaluate
from tinybn.app.models import build_model
from tinybn.optim import SGD

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

MODELS = {"LeNet": ("lenet", 0.9, False), "LeNet-BN": ("lenet-bn", 1.0, False), "noisy LeNet-BN": ("lenet-bn", 1.0, True)}
STEP_SIZES = (0.25, 0.5, 1.0, 2.0, 4.0)    # the landscape probe's eta, around the training rates (0.9 and 1.0)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ------------------------------------------------------------------------------------------ the measurements

def gradients(model, loss_of, parameters) -> list:
    """The gradient of ``loss_of(model)`` with respect to each of ``parameters``, at the current weights (arrays
    on the parameters' device)."""
    model.zero_grad()
    loss_of(model).backward()
    xp = tinybn.backend.get_array_module
    return [xp(p.data).zeros_like(p.data) if p.grad is None else p.grad.copy() for p in parameters]   # frozen: 0


def _flat(arrays) -> numpy.ndarray:
    """One float64 vector on the host, of every array in turn."""
    return numpy.concatenate([tinybn.backend.to_numpy(a).astype(numpy.float64).ravel() for a in arrays])


class Kept:
    """``with Kept(model):`` runs the block with the model in training mode and puts every parameter, gradient and
    buffer (the running statistics: a training-mode forward updates them) and the mode back as they were."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        parameters = list(self.model.parameters())
        self.saved = [(t, t.data.copy()) for t in (*parameters, *self.model.buffers())]
        self.grads = [(p, None if p.grad is None else p.grad.copy()) for p in parameters]
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.train()
        return self

    def __exit__(self, *exc):
        for tensor, value in self.saved:
            tensor.data = value
        for p, grad in self.grads:
            p.grad = grad
        for module, training in self.modes:
            module.training = training
        return False


def check_measurable(model) -> None:
    """The measurements compare forwards of one batch: a model that draws random numbers in its forward (dropout)
    would differ between them by chance, so it is refused."""
    random = [type(m).__name__ for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if random:
        raise ValueError(f"the model has {', '.join(random)}: its forward is random, so two forwards of one batch "
                         f"differ by chance and the measurements would measure that; remove it (or p=0) to measure")


def layers_of(model) -> list[list]:
    """The model's layers for ICS: each convolution or dense layer, with the parameters of the modules after it
    up to the next one (its batch norm): ``[[weight, *its parameters], ...]``, the weight first. A layer used
    twice is one layer here, and a parameter shared by two layers belongs to the first: ICS is defined for a
    chain of distinct layers."""
    groups, leading = [], []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            groups.append([module.weight] + leading + [p for p in module.parameters() if p is not module.weight])
            leading = []
        elif isinstance(module, nn.Normalization):
            (groups[-1] if groups else leading).extend(module.parameters())   # one before any layer: the first's
    return groups


def internal_covariate_shift(model, loss_of, lr: float) -> list[tuple[float, float]]:
    """(||G - G'||, cos(G, G')) for every layer after the first: G, the gradient of its weight now; G', the same
    after the layers before it take this step's SGD update (lr times their gradient), all others unchanged."""
    check_measurable(model)
    groups = layers_of(model)
    everything = [p for group in groups for p in group]
    shifts = []
    with Kept(model):
        start = [p.data.copy() for p in everything]
        grads = gradients(model, loss_of, everything)
        updated = [w - lr * g.astype(w.dtype) for w, g in zip(start, grads)]
        before = 0
        for index, group in enumerate(groups):
            if index > 0:
                for position, p in enumerate(everything):       # the previous layers updated, the rest as they were
                    p.data = updated[position] if position < before else start[position]
                g = _flat([grads[before]])                       # this layer's weight
                g_after = _flat(gradients(model, loss_of, [group[0]]))
                distance = float(numpy.linalg.norm(g - g_after))
                norms = float(numpy.linalg.norm(g) * numpy.linalg.norm(g_after))
                cosine = float(g @ g_after / norms) if norms > 0 else (1.0 if distance == 0 else 0.0)
                shifts.append((distance, cosine))
            before += len(group)
    return shifts


def landscape(model, loss_of, step_sizes=STEP_SIZES) -> dict:
    """Along the gradient g from the current weights W, for each eta: the loss at W - eta g and how far its
    gradient is from g. Returns the loss variation (largest minus smallest loss), the gradient predictiveness
    (the largest gradient change) and the effective beta-smoothness (the largest gradient change over the
    distance moved), with the per-eta values."""
    check_measurable(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    losses, changes, slopes = [], [], []
    with Kept(model):
        start = [p.data.copy() for p in parameters]
        steps = gradients(model, loss_of, parameters)
        g = _flat(steps)
        for eta in step_sizes:
            for p, w, step in zip(parameters, start, steps):
                p.data = (w - eta * step).astype(w.dtype)
            with tinybn.no_grad():
                losses.append(float(loss_of(model).data))
            change = float(numpy.linalg.norm(_flat(gradients(model, loss_of, parameters)) - g))
            changes.append(change)
            slopes.append(change / max(eta * float(numpy.linalg.norm(g)), 1e-300))
    return {"loss_variation": max(losses) - min(losses), "gradient_predictiveness": max(changes),
            "beta_smoothness": max(slopes), "losses": losses, "gradient_changes": changes}


def add_noise(model, rng: numpy.random.Generator, n: float = 1.0) -> list:
    """Noisy BN: after every normalization layer, in training mode, Gaussian noise whose per-channel mean
    (U(-n, n)) and standard deviation (U(0, n)) are drawn anew at every step. Returns the hooks' handles."""
    def hook(module, inputs, output):
        if not module.training:
            return None
        shape = (1, output.shape[1]) + (1,) * (output.ndim - 2)
        mean, std = rng.uniform(-n, n, shape), rng.uniform(0, n, shape)
        noise = mean + std * rng.standard_normal(output.shape)
        return output + tinybn.tensor(noise.astype(output.dtype), device=output.device)
    return [layer.register_forward_hook(hook) for layer in model.modules() if isinstance(layer, nn.Normalization)]


class Activations:
    """The quantiles of one layer's input (the second sigmoid's: a pre-activation), channel 0, over the batch and
    the positions, at the steps asked for (one channel: noisy BN's shift is per channel, and pooling the channels
    would average it away)."""

    def __init__(self, model):
        sigmoids = [m for m in model.modules() if isinstance(m, nn.Sigmoid)]
        self.wanted, self.rows = False, []
        self.handle = sigmoids[1].register_forward_hook(self.record)

    def record(self, module, inputs, output):
        if self.wanted and module.training:
            values = tinybn.backend.to_numpy(inputs[0].data)[:, 0].ravel()
            self.rows.append([float(q) for q in numpy.quantile(values, QUANTILES)])
            self.wanted = False


# ------------------------------------------------------------------------------------------ one training run

def run(label: str, seed: int, data, epochs: int, every: int, device=None) -> dict:
    """Train one model with its chapter's learning rate, measuring every ``every`` steps; returns the history."""
    name, lr, noisy = MODELS[label]
    train_x, train_y, test_x, test_y = data
    tinybn.manual_seed(seed)
    model = build_model(name, device=device)
    noise = add_noise(model, numpy.random.default_rng([seed, 7])) if noisy else []
    watch = Activations(model)
    optimizer = SGD(model.parameters(), lr)
    loader = DataLoader(train_x, train_y, 256, shuffle=True, seed=seed, device=device)
    tests = DataLoader(test_x, test_y, 1000, device=device)
    record = {"label": label, "seed": seed, "lr": lr, "every": every, "epochs": [], "steps": [], "ics": [],
              "landscape": []}
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for X, y in loader:
            loss_of = lambda m, X=X, y=y: F.cross_entropy(m(X), y)     # noqa: E731 - this step's batch
            if step % every == 0:
                record["steps"].append(step)
                if not noisy:           # noise would make the loss random: these two are for LeNet and LeNet-BN
                    record["ics"].append(internal_covariate_shift(model, loss_of, lr))
                    record["landscape"].append(landscape(model, loss_of))
                watch.wanted = True
            loss = loss_of(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.data))
            step += 1
        record["epochs"].append({"epoch": epoch, "train_loss": float(numpy.mean(losses)),
                                 "test_acc": evaluate(model, tests)})
    record["activations"], record["steps_per_epoch"] = watch.rows, len(loader)
    for handle in (*noise, watch.handle):
        handle.remove()
    return record


# ------------------------------------------------------------------------------------------ figures

def _band(ax, x, runs, label, color):
    values = numpy.array(runs)
    ax.plot(x, values.mean(axis=0), color=color, label=label, linewidth=1.3, marker="o", markersize=2.5)
    if len(values) > 1:
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.18, linewidth=0)


COLORS = {"LeNet": "tab:blue", "LeNet-BN": "tab:orange", "noisy LeNet-BN": "tab:green"}


def _by_label(records):
    found = {}
    for record in records:
        found.setdefault(record["label"], []).append(record)
    return found


def plot_training(records, path: Path, seeds: int) -> None:
    """Train loss and test accuracy per epoch, and the second sigmoid's input over training, per model."""
    from matplotlib.figure import Figure

    runs = _by_label(records)
    fig = Figure(figsize=(13, 6.6), dpi=110)
    axes = fig.subplots(2, 3)
    for label, group in runs.items():
        epochs = [row["epoch"] for row in group[0]["epochs"]]
        _band(axes[0][0], epochs, [[r["train_loss"] for r in g["epochs"]] for g in group], label, COLORS[label])
        _band(axes[0][1], epochs, [[r["test_acc"] for r in g["epochs"]] for g in group], label, COLORS[label])
    axes[0][0].set_title("training loss", fontsize=9)
    axes[0][1].set_title("test accuracy (prediction mode, moving averages)", fontsize=9)
    for ax in axes[0][:2]:
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    names = list(runs)
    finals = [[g["epochs"][-1]["test_acc"] for g in runs[label]] for label in names]
    means = [numpy.mean(f) for f in finals]
    axes[0][2].bar(range(len(names)), means, color=[COLORS[label] for label in names],
                   yerr=[[m - min(f) for m, f in zip(means, finals)], [max(f) - m for m, f in zip(means, finals)]])
    axes[0][2].set_xticks(range(len(names)), names, fontsize=8)
    axes[0][2].set_ylim(min(min(f) for f in finals) - 0.05, 1.0)
    axes[0][2].set_title("final test accuracy (bar: mean; whiskers: lowest to highest)", fontsize=9)
    axes[0][2].grid(alpha=0.3, axis="y")
    for ax, (label, group) in zip(axes[1], runs.items()):      # one scale for the three: the spreads compare
        first = group[0]
        x = numpy.array(first["steps"][:len(first["activations"])]) / first["steps_per_epoch"]
        q = numpy.array(first["activations"])
        ax.fill_between(x, q[:, 0], q[:, 4], color=COLORS[label], alpha=0.15, linewidth=0, label="5 % to 95 %")
        ax.fill_between(x, q[:, 1], q[:, 3], color=COLORS[label], alpha=0.35, linewidth=0, label="25 % to 75 %")
        ax.plot(x, q[:, 2], color=COLORS[label], linewidth=1.2, label="median")
        ax.set_title(f"{label}: second sigmoid's input, channel 0 (seed {first['seed']})", fontsize=9)
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    low = min(min(row[0] for row in g[0]["activations"]) for g in runs.values())
    high = max(max(row[-1] for row in g[0]["activations"]) for g in runs.values())
    for ax in axes[1]:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    fig.suptitle(f"Noisy BN: covariate shift injected after every BN layer ({seeds} seed(s), band: lowest to "
                 f"highest)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_ics(records, path: Path, seeds: int) -> None:
    """||G - G'|| and cos(G, G') per layer over training, LeNet against LeNet-BN."""
    from matplotlib.figure import Figure

    runs = {label: group for label, group in _by_label(records).items() if group[0]["ics"]}
    layers = len(next(iter(runs.values()))[0]["ics"][0])
    fig = Figure(figsize=(3.2 * layers, 5.8), dpi=110)
    axes = fig.subplots(2, layers, squeeze=False)
    names = ["conv 2", "dense 1", "dense 2", "dense 3"]
    for label, group in runs.items():
        x = numpy.array(group[0]["steps"]) / group[0]["steps_per_epoch"]
        for layer in range(layers):
            for row, what in enumerate(("l2", "cos")):
                values = [[shift[layer][row] for shift in g["ics"]] for g in group]
                _band(axes[row][layer], x, values, label, COLORS[label])
                axes[row][layer].set_title(f"{names[layer]}: " + ("||G - G'||" if what == "l2" else "cos(G, G')"),
                                           fontsize=9)
    for ax in axes.ravel():
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.set_yscale("log")
    fig.suptitle(f"Internal covariate shift as a change of gradient when the previous layers take their step "
                 f"({seeds} seed(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_landscape(records, path: Path, seeds: int, step_sizes=STEP_SIZES) -> None:
    """Loss variation, gradient predictiveness and effective beta-smoothness over training, with and without BN."""
    from matplotlib.figure import Figure

    runs = {label: group for label, group in _by_label(records).items() if group[0]["landscape"]}
    fig = Figure(figsize=(13, 3.8), dpi=110)
    axes = fig.subplots(1, 3)
    titles = {"loss_variation": "loss variation (range over eta)", "gradient_predictiveness":
              "gradient predictiveness: max ||grad(W - eta g) - g||", "beta_smoothness":
              "effective beta-smoothness: max change / ||eta g||"}
    for label, group in runs.items():
        x = numpy.array(group[0]["steps"]) / group[0]["steps_per_epoch"]
        for ax, key in zip(axes, titles):
            _band(ax, x, [[point[key] for point in g["landscape"]] for g in group], label, COLORS[label])
    for ax, title in zip(axes, titles.values()):
        ax.set_title(title, fontsize=9), ax.set_xlabel("epoch"), ax.set_yscale("log"), ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"The loss landscape along the gradient, eta in {', '.join(map(str, step_sizes))} "
                 f"({seeds} seed(s), band: lowest to highest)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def summarize(records) -> list[str]:
    """One line per model: final test accuracy, and the medians of the measurements over the run."""
    lines = []
    for label, group in _by_label(records).items():
        final = [g["epochs"][-1]["test_acc"] for g in group]
        words = [f"{label}: final test acc {numpy.mean(final):.3f} ({min(final):.3f} - {max(final):.3f})"]
        if group[0]["ics"]:
            for index, name in enumerate(("l2", "cos")):
                values = [numpy.median([shift[layer][index] for shift in g["ics"]]) for g in group
                          for layer in range(len(g["ics"][0]))]
                words.append(f"median ICS {name} over layers {numpy.median(values):.3g}")
            for key in ("loss_variation", "gradient_predictiveness", "beta_smoothness"):
                words.append(f"median {key.replace('_', ' ')} "
                             f"{numpy.median([p[key] for g in group for p in g['landscape']]):.3g}")
        lines.append("; ".join(words))
    return lines


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers separated by commas, e.g. 0,1,2; got {text!r}") from None
    return seeds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _arguments(argv):
    """The parsed arguments, every one checked (and the saved results read, for --replot) before anything is
    written or trained."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--epochs", type=_positive, default=10, help="epochs per run (default: %(default)s, the chapter's)")
    p.add_argument("--every", type=_positive, default=47, help="measure every N steps (default: %(default)s, 5 an epoch)")
    p.add_argument("--quick", action="store_true",
                   help="seed 0, 1 epoch, measured every 20 steps (in place of --seeds, --epochs, --every): under a minute")
    p.add_argument("--replot", action="store_true", help="draw the figures again from --out's results.json")
    p.add_argument("--device", default=None, help="cpu, gpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="folder for results.json and the figures "
                                               "(default: runs/examples/controversy, or controversy-quick)")
    args = p.parse_args(argv)
    try:
        args.device = tinybn.backend.resolve_device(args.device)[0]
    except (ValueError, TypeError, tinybn.DeviceUnavailableError) as error:
        p.error(f"--device: {error}")
    if args.quick:
        args.seeds, args.epochs, args.every = [0], 1, 20
    args.out = Path(args.out or "runs/examples/controversy" + ("-quick" if args.quick else ""))
    args.saved = None
    if args.replot:
        path = args.out / "results.json"
        try:
            args.saved = json.loads(path.read_text())
            assert args.saved["records"] and all("label" in r for r in args.saved["records"])
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            p.error(f"--replot: {path} is missing or holds no results; train first (without --replot), or name the "
                    f"folder that holds them with --out")
    elif args.out.exists() and not args.out.is_dir():
        p.error(f"--out: {args.out} is a file; name a folder")
    return args


def main(argv=None) -> int:
    args = _arguments(argv)
    print(tinybn.kernels.describe(device=args.device), flush=True)
    if args.quick:
        print("quick mode: seed 0, 1 epoch of each model, measured every 20 steps; a smoke test: after one epoch "
              "LeNet has not left its plateau, so its tiny gradients make every measure small. The 10-epoch "
              "results are in docs/results.md.", flush=True)
    out, seeds, step_sizes = args.out, args.seeds, STEP_SIZES
    if args.saved is not None:
        records, step_sizes = args.saved["records"], tuple(args.saved.get("step_sizes", STEP_SIZES))
        seeds = sorted({r["seed"] for r in records})
    else:
        data = load_fashion_mnist()
        out.mkdir(parents=True, exist_ok=True)
        records, started = [], time.time()
        for seed in seeds:
            for label in MODELS:
                records.append(run(label, seed, data, args.epochs, args.every, args.device))
                print(f"{label}, seed {seed}: test acc {records[-1]['epochs'][-1]['test_acc']:.4f} "
                      f"({time.time() - started:.0f} s so far)", flush=True)
        (out / "results.json").write_text(json.dumps({"records": records, "step_sizes": list(STEP_SIZES)}))
    plot_training(records, out / "controversy-training.png", len(seeds))
    plot_ics(records, out / "controversy-ics.png", len(seeds))
    plot_landscape(records, out / "controversy-landscape.png", len(seeds), step_sizes)
    print("\n".join(summarize(records)))
    print(f"wrote {out / 'results.json'} and the figures controversy-{{training,ics,landscape}}.png in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
