"""What a run reports: ``metrics.csv`` and ``metrics.json`` after every epoch, the epoch's line on the console,
and ``metrics.png`` at the end (loss and accuracies against epoch, as the chapter's animated plot shows)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .checkpoint import replace_atomically
from .loop import Callback


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def accuracies(row: dict, digits: int = 4) -> str:
    """"test acc 0.7750 (moving averages) / 0.8712 (precise BN)", and the same for validation when present."""
    words = []
    for name in ("val_acc", "test_acc"):
        if name in row:
            text = f"{name.replace('_', ' ')} {row[name]:.{digits}f}"
            if f"{name}_precise" in row:
                text += f" (moving averages) / {row[name + '_precise']:.{digits}f} (precise BN)"
            words.append(text)
    return ", ".join(words)


def write_metrics(out: Path, config: dict, history: list[dict]) -> None:
    """``metrics.csv`` (a column per number; a resumed run may add columns) and ``metrics.json`` (with the
    settings), each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in history for key in row))

    def write_csv(handle):
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)

    replace_atomically(out / "metrics.csv", write_csv)
    document = json.dumps({"config": config, "history": history}, indent=2)
    replace_atomically(out / "metrics.json", lambda handle: handle.write(document))


def plot_history(path: Path, history: list[dict], title: str = "", log=print) -> bool:
    """Loss and accuracies against epoch; the prediction-mode accuracies with the moving averages and, where
    recorded, with precise BN statistics."""
    try:
        from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend and state stay as they are
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log("matplotlib is not installed, so no plot was written; `pip install -e '.[plot]'` adds it")
        return False
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(5.6, 3.6), dpi=120)
    ax = fig.subplots()
    lines = [("train_loss", "train loss", "-", None), ("train_acc", "train acc (training mode)", "--", None),
             ("test_acc", "test acc, moving averages", "-.", None), ("test_acc_precise", "test acc, precise BN", "-", "o"),
             ("val_acc", "val acc, moving averages", ":", None), ("val_acc_precise", "val acc, precise BN", ":", "s")]
    for key, label, style, marker in lines:
        if any(key in row for row in history):
            ax.plot(epochs, [row.get(key, float("nan")) for row in history], style, marker=marker, markersize=3,
                    label=label)
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    replace_atomically(path, fig.savefig, mode="wb")
    return True


class MetricsFiles(Callback):
    """The metrics files after every epoch (rank 0 alone writes: ``write``), and the epoch's line, said once the
    epoch is saved: a run stopped after it continues from that epoch with --resume."""

    def __init__(self, out: Path, config: dict, history: list, epochs: int, log=print, keep_best=None,
                 write: bool = True):
        self.out, self.config, self.history, self.epochs = out, config, history, epochs
        self.log, self.keep_best, self.write = log, keep_best, write

    def on_epoch_end(self, epoch, row):
        if self.write:
            write_metrics(self.out, self.config, self.history)
        best = " (best so far)" if self.keep_best and self.keep_best.best else ""
        self.log(f"epoch {epoch:2d}/{self.epochs}: train loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, "
                 f"{accuracies(row)}, {row['examples_per_sec']:.0f} examples/sec{best}")
