"""Shared plumbing for the examples: arguments, data, running a variant over several seeds, tables and bands.

Every variant is trained with the chapter's recipe once per seed (``--seeds 0,1,2`` by default); tables give
the mean over the seeds with the lowest and highest value, and plots draw the mean with a band from the
lowest to the highest seed. A seed that did not train (its final test accuracy at most 0.2, twice chance) is
left out of the mean and the band, drawn as a thin line of its own, and counted in the tables: a mean of runs
at 0.8 and one at chance would be a line no run followed. Test accuracy is reported in prediction mode twice
for models with batch norm: with the moving averages, and with statistics recomputed over 50 training batches
(precise BN), which removes the moving averages' lag from the comparison. Every run's history is saved in
``results.json``; ``--replot`` draws the figure and the tables again from it without training.

``--quick`` trains 1 epoch on all 60,000 training images, seed 0 (and fewer variants where a script says so): a
smoke test that finishes in about a minute. One epoch on all the images lands where PyTorch's first epoch does
(LeNet-BN's test accuracy about 0.75 – 0.81); a few epochs on a small subset, as before, left the moving
averages in an unstable regime that looked like a bug.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy

import tinybn
from tinybn.app.data import load_fashion_mnist
from tinybn.app.train import Diverged, TrainConfig, accuracies, train


def parser(description: str, epochs: int = 10) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs, help="epochs per run (default: %(default)s, the chapter's)")
    p.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all 60,000)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every variant runs once per seed")
    p.add_argument("--quick", action="store_true",
                   help="1 epoch on all 60,000 images, seed 0, fewer variants: a smoke test of about a minute")
    p.add_argument("--replot", action="store_true", help="draw the figure and tables again from the results.json "
                                                         "in --out, without training")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate (default: %(default)s, the chapter's)")
    p.add_argument("--precise-bn", type=int, default=50, help="batches for precise BN statistics (0: off)")
    p.add_argument("--device", default=None, help="cpu, gpu, cuda or cuda:N")
    p.add_argument("--kernels", choices=("fastest", "numba", "reference"), default=None,
                   help="which implementation runs each op (default: what the script chose at its top, 'fastest')")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST files")
    p.add_argument("--out", default=None, help="folder for the PNG and results (default: runs/examples/NAME, "
                                               "or NAME-quick with --quick)")
    return p


_replotting = False     # set by setup() for --replot: nothing is trained or saved

QUICK_WORDS = ("quick mode: 1 epoch on {images} training images, seed 0{fewer}. A smoke test: its numbers show "
               "where each variant is after one epoch, not the chapter's 10-epoch results, which are in "
               "docs/results.md.")


def setup(args, name: str, quick: dict | None = None, fewer: str = ""):
    """Apply ``--quick`` (1 epoch, all the images, seed 0, and the script's own ``quick`` settings, e.g. fewer
    learning rates, described by ``fewer``) and say what it is; returns ``(out, data)``. With ``--replot`` the
    saved results are read instead (``data`` is None and :func:`run_variant` returns them)."""
    if args.kernels:
        tinybn.kernels.use(args.kernels)
    print(tinybn.kernels.describe(), flush=True)           # the first line: which code runs
    if args.quick:
        args.epochs, args.train_subset, args.seeds = 1, None, "0"
        for key, value in (quick or {}).items():
            setattr(args, key, value)
        images = f"the first {args.train_subset:,}" if args.train_subset else "all 60,000"
        print(QUICK_WORDS.format(images=images, fewer=f", {fewer}" if fewer else ""), flush=True)
    args.seed_list = [int(s) for s in str(args.seeds).split(",")]
    out = Path(args.out or f"runs/examples/{name}" + ("-quick" if args.quick else ""))   # never mixed with full runs
    if args.replot:
        global _replotting
        _replotting = True
        path = out / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: --replot: no {path}; train first (without --replot), or name the folder that "
                             f"holds it with --out")
        args.saved = json.loads(path.read_text())
        runs = [run for part in ("results", "compare", "sweep") for result in args.saved.get(part, [])
                for run in result["runs"]]
        args.seed_list = sorted({run["seed"] for run in runs})          # what was saved, not the defaults
        args.seeds = ",".join(map(str, args.seed_list))
        args.epochs = max((len(run["history"]) for run in runs), default=args.epochs)
        return out, None
    out.mkdir(parents=True, exist_ok=True)
    return out, load_fashion_mnist(args.data)


def saved_variant(args, label: str, lr: float, batch_size: int) -> dict:
    """``--replot``: the saved result of one variant; at the rate it was saved with when that variant was saved at
    one rate only (a rate the script chose from a sweep that is not here)."""
    saved = args.saved.get("results", []) + args.saved.get("compare", []) + args.saved.get("sweep", [])
    for result in saved:
        if (result["label"], result["lr"], result.get("batch_size", 256)) == (label, lr, batch_size):
            return result
    same = [result for result in saved if (result["label"], result.get("batch_size", 256)) == (label, batch_size)]
    if len(same) == 1:
        return same[0]
    raise SystemExit(f"error: --replot: the saved results have no {label!r} at lr {lr:g}, batch {batch_size}; "
                     f"give the arguments of the run that wrote them")


def run_variant(args, data, out, label: str, build, lr: float | None = None, batch_size: int = 256,
                precise_bn: int | None = None, epochs: int | None = None) -> dict:
    """Train one model variant once per seed; returns ``{"label", "lr", "batch_size", "runs": [{"seed", "history",
    "diverged"}]}``. ``precise_bn`` and ``epochs`` default to the command line's.

    A diverged run keeps the epochs it finished and says where it stopped."""
    lr = lr or args.lr
    if getattr(args, "saved", None) is not None:
        return saved_variant(args, label, lr, batch_size)
    precise_bn = args.precise_bn if precise_bn is None else precise_bn
    result = {"label": label, "lr": lr, "batch_size": batch_size, "runs": []}
    for seed in args.seed_list:
        tinybn.manual_seed(seed)
        model = build()
        folder = out / (f"{label}_lr{lr:g}" + (f"_batch{batch_size}" if batch_size != 256 else "")
                        + f"_seed{seed}").replace(" ", "_").replace("/", "-")
        config = TrainConfig(model=label, epochs=epochs or args.epochs, lr=lr, batch_size=batch_size,
                             device=args.device, seed=seed, out=str(folder), train_subset=args.train_subset,
                             progress=False, plot=False, overwrite=True, precise_bn=precise_bn)
        lines = []
        try:
            history = train(config, log=lines.append, data=data, model=model)["history"]
            diverged = None
        except Diverged as error:
            history = json.loads((folder / "metrics.json").read_text())["history"] if (folder / "metrics.json").exists() else []
            diverged = f"epoch {error.epoch}, step {error.step}"
        result["runs"].append({"seed": seed, "history": history, "diverged": diverged})
        last = history[-1] if history else {}
        print(f"-- {label}, lr {lr:g}, batch {batch_size}, seed {seed}: " + (f"diverged at {diverged}" if diverged else
              f"train acc {last['train_acc']:.3f}, {accuracies(last, 3)}"), flush=True)
    return result


def test_key(result: dict) -> str:
    """The prediction-mode accuracy to compare variants on: precise BN where the model has batch norm."""
    rows = [row for run in result["runs"] for row in run["history"]]
    return "test_acc_precise" if rows and all("test_acc_precise" in row for row in rows) else "test_acc"


def finished(result: dict) -> list[list[dict]]:
    """The histories of the runs that did not diverge."""
    return [run["history"] for run in result["runs"] if not run["diverged"] and run["history"]]


def final_test(result: dict) -> list[float]:
    """Each finished run's last test accuracy (precise BN where the model has batch norm)."""
    key = test_key(result)
    return [history[-1][key] for history in finished(result)]


CHANCE_LIMIT = 0.2    # a final test accuracy at most twice chance (0.1): the run did not train


def trained(result: dict) -> list[list[dict]]:
    """The histories of the finished runs that trained (final test accuracy above :data:`CHANCE_LIMIT`)."""
    key = test_key(result)
    return [history for history in finished(result) if history[-1][key] > CHANCE_LIMIT]


def untrained(result: dict) -> list[list[dict]]:
    """The histories of the finished runs that stayed at chance."""
    kept = [id(history) for history in trained(result)]
    return [history for history in finished(result) if id(history) not in kept]


def band(result: dict, key: str, histories=None):
    """``(epochs, mean, lowest, highest)`` of ``key`` per epoch over the runs that trained (or ``histories``);
    None if there are none."""
    histories = trained(result) if histories is None else histories
    if not histories:
        return None
    values = numpy.array([[row[key] for row in history] for history in histories])
    epochs = [row["epoch"] for row in histories[0]]
    return epochs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def spread(result: dict, key: str) -> str:
    """The last epoch's ``key``: "mean (lowest – highest)" over the runs that trained, and how many did not or
    diverged."""
    histories = trained(result)
    total = len(result["runs"])
    notes = [f"{count}/{total} {what}" for count, what in
             ((len(untrained(result)), "stayed at chance"), (sum(1 for run in result["runs"] if run["diverged"]),
                                                              "diverged")) if count]
    if not histories:
        return ", ".join(notes) or "no run"
    values = [history[-1][key] for history in histories]
    text = f"{numpy.mean(values):.3f} ({min(values):.3f} – {max(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"
    return text + "".join(f", {note}" for note in notes)


def summary(result: dict) -> dict:
    row = {"variant": result["label"], "lr": f"{result['lr']:g}", "train acc": spread(result, "train_acc"),
           "test acc, moving averages": spread(result, "test_acc")}
    key = test_key(result)
    row["test acc, precise BN"] = spread(result, key) if key == "test_acc_precise" else "(no BN)"
    return row


def table(rows: list[dict]) -> str:
    """Print a Markdown table of ``rows`` (and return it)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    text = "\n".join(lines)
    print(text)
    return text


def save(out: Path, results: list[dict], extra: dict | None = None) -> None:
    if _replotting:
        return                                          # --replot draws what was saved, and changes nothing
    (out / "results.json").write_text(json.dumps({"results": results, **(extra or {})}, indent=1))
    print(f"wrote {out / 'results.json'}")


def best_rate(label: str, default: float, sweep: Path = Path("runs/examples/learning_rates/results.json")) -> float:
    """The rate at which ``label`` reached the best mean final test accuracy in the learning-rate sweep."""
    if not sweep.is_file():
        return default
    scored = [(numpy.mean(final_test(result)), result["lr"]) for result in json.loads(sweep.read_text())["results"]
              if result["label"] == label and final_test(result)]
    return max(scored)[1] if scored else default


def plot_band(ax, result: dict, key: str, label: str, **style) -> None:
    """The mean of ``key`` per epoch over the seeds that trained, with a band from the lowest to the highest, and
    each seed that stayed at chance as a thin line of its own."""
    found = band(result, key)
    style.setdefault("marker", "o")
    color = style.pop("color", None)
    if found is not None:
        epochs, mean, low, high = found
        line, = ax.plot(epochs, mean, markersize=3, label=label, color=color, **style)
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
        color = line.get_color()
    failed = untrained(result)
    for index, history in enumerate(failed):
        words = f"{label}: {len(failed)} of {len(result['runs'])} seeds stayed at chance" if label else None
        line, = ax.plot([row["epoch"] for row in history], [row[key] for row in history], color=color, linewidth=0.8,
                        linestyle=":", label=words if index == 0 else None)
        color = line.get_color()


def accuracy_axes(ax, title: str, ylabel: str = "accuracy") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)


def compare_plot(path: Path, results: list[dict], title: str, seeds: int) -> None:
    """Two panels: training accuracy (training mode) and test accuracy (prediction mode, precise BN where the
    model has batch norm), mean over the seeds with a min–max band, one line per variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=120)
    left, right = fig.subplots(1, 2)
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]    # lines that coincide stay visible
    for index, result in enumerate(results):
        label = f"{result['label']} (lr {result['lr']:g})"
        linestyle, marker = styles[index % len(styles)]
        plot_band(left, result, "train_acc", label, linestyle=linestyle, marker=marker)
        key = test_key(result)
        plot_band(right, result, key, label + (", precise BN" if key == "test_acc_precise" else ""),
                  linestyle=linestyle, marker=marker)
    accuracy_axes(left, "training accuracy (training mode)")
    accuracy_axes(right, "test accuracy (prediction mode; precise BN where the model has BN)")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    stuck = any(untrained(result) for result in results)
    fig.suptitle(f"{title}: mean of {seeds} seed{'s' if seeds != 1 else ''}"
                 + (", band = lowest to highest" if seeds > 1 else "")
                 + (" (a seed that stayed at chance: dotted, outside the mean)" if stuck else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    print(f"wrote {path}")
