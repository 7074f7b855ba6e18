"""Shared plumbing for the examples: arguments, data, running variants, a table and a plot."""
from __future__ import annotations

import argparse
from pathlib import Path

import tinybn
from tinybn.app.data import load_fashion_mnist
from tinybn.app.train import Diverged, TrainConfig, train


def parser(description: str, epochs: int = 10) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all 60,000)")
    p.add_argument("--quick", action="store_true", help="3 epochs on 10,000 images: a run of a few minutes")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the PNG and results (default: runs/examples/NAME)")
    return p


def setup(args, name: str):
    if args.quick:
        args.epochs, args.train_subset = min(args.epochs, 3), args.train_subset or 10000
    out = Path(args.out or f"runs/examples/{name}")
    out.mkdir(parents=True, exist_ok=True)
    for change in tinybn.fast.tune_process():   # a script owns its process; see tinybn.fast.tune_process
        print(f"tuned this process: {change}")
    return out, load_fashion_mnist(args.data)


def run_variant(args, data, out, label: str, build, lr: float | None = None, progress=False) -> list[dict]:
    """Train one model variant with the chapter's recipe; returns its per-epoch history."""
    tinybn.manual_seed(args.seed)
    model = build()
    config = TrainConfig(model=label, epochs=args.epochs, lr=lr or args.lr, device=args.device, seed=args.seed,
                         out=str(out / label.replace(" ", "_")), train_subset=args.train_subset, progress=progress,
                         plot=False, overwrite=True)       # an example re-run replaces its own earlier run
    print(f"-- {label} (lr {config.lr:g})")
    try:
        return train(config, log=lambda line: print("   ", line) if line.startswith("epoch") else None,
                     data=data, model=model)["history"]
    except Diverged as error:
        print(f"    diverged: {error}")
        return []


def table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r[c]}".ljust(w) for c, w in zip(columns, widths)))


def plot_curves(path: Path, curves: dict[str, list[dict]], key: str = "test_acc", title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for label, history in curves.items():
        if history:
            ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def summary(history: list[dict]) -> dict:
    if not history:
        return {"train acc": "diverged", "test acc": "diverged", "train loss": "nan"}
    last = history[-1]
    return {"train loss": f"{last['train_loss']:.3f}", "train acc": f"{last['train_acc']:.3f}",
            "test acc": f"{last['test_acc']:.3f}"}
