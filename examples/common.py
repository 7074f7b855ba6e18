"""Shared plumbing for the examples: arguments, data, running a variant over several seeds, tables and bands.

Every variant is trained with the chapter's recipe once per seed (``--seeds 0,1,2`` by default); tables give
the mean over the seeds with the lowest and highest value, and plots draw the mean with a band from the
lowest to the highest seed. Test accuracy is reported in prediction mode twice for models with batch norm:
with the moving averages, and with statistics recomputed over 50 training batches (precise BN), which
removes the moving averages' lag from the comparison. Every run's history is saved in ``results.json``.
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
    p.add_argument("--quick", action="store_true", help="3 epochs on 10,000 images, one seed: a smoke test only")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate (default: %(default)s, the chapter's)")
    p.add_argument("--precise-bn", type=int, default=50, help="batches for precise BN statistics (0: off)")
    p.add_argument("--device", default=None, help="cpu, gpu, cuda or cuda:N")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST files")
    p.add_argument("--out", default=None, help="folder for the PNG and results (default: runs/examples/NAME)")
    return p


def setup(args, name: str):
    if args.quick:
        args.epochs, args.train_subset, args.seeds = min(args.epochs, 3), args.train_subset or 10000, "0"
    args.seed_list = [int(s) for s in str(args.seeds).split(",")]
    out = Path(args.out or f"runs/examples/{name}")
    out.mkdir(parents=True, exist_ok=True)
    for change in tinybn.fast.tune_process():   # a script owns its process; see tinybn.fast.tune_process
        print(f"tuned this process: {change}")
    return out, load_fashion_mnist(args.data)


def run_variant(args, data, out, label: str, build, lr: float | None = None, batch_size: int = 256,
                precise_bn: int | None = None, epochs: int | None = None) -> dict:
    """Train one model variant once per seed; returns ``{"label", "lr", "batch_size", "runs": [{"seed", "history",
    "diverged"}]}``. ``precise_bn`` and ``epochs`` default to the command line's.

    A diverged run keeps the epochs it finished and says where it stopped."""
    lr = lr or args.lr
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


def band(result: dict, key: str):
    """``(epochs, mean, lowest, highest)`` of ``key`` per epoch over the runs that finished; None if none did."""
    histories = finished(result)
    if not histories:
        return None
    values = numpy.array([[row[key] for row in history] for history in histories])
    epochs = [row["epoch"] for row in histories[0]]
    return epochs, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def spread(result: dict, key: str) -> str:
    """The last epoch's ``key``: "mean (lowest – highest)" over the finished runs, and how many diverged."""
    histories = finished(result)
    diverged = sum(1 for run in result["runs"] if run["diverged"])
    if not histories:
        return f"diverged ({diverged}/{len(result['runs'])})"
    values = [history[-1][key] for history in histories]
    text = f"{numpy.mean(values):.3f} ({min(values):.3f} – {max(values):.3f})"
    return text + (f", {diverged}/{len(result['runs'])} diverged" if diverged else "")


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
    """The mean of ``key`` per epoch with a band from the lowest to the highest seed."""
    found = band(result, key)
    if found is None:
        return
    epochs, mean, low, high = found
    style.setdefault("marker", "o")
    line, = ax.plot(epochs, mean, markersize=3, label=label, **style)
    ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.18, linewidth=0)


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
    fig.suptitle(f"{title}: mean of {seeds} seed{'s' if seeds != 1 else ''}, band = lowest to highest", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    print(f"wrote {path}")
