"""The trainer: the chapter's recipe (SGD, lr 1.0, batch 256, 10 epochs) with metrics, plots and checkpoints."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import numpy

from .. import backend
from .. import functional as F
from .. import random as tb_random
from ..autograd import no_grad
from ..optim import SGD, learning_rate
from . import checkpoint
from .data import DataLoader, load_fashion_mnist
from .models import build_model
from .progress import Progress


@dataclasses.dataclass
class TrainConfig:
    model: str = "lenet-bn"
    epochs: int = 10
    lr: float = 1.0
    batch_size: int = 256
    device: str | None = None
    seed: int = 0
    out: str = "runs/lenet-bn"
    resume: bool = False
    data: str | None = None
    download: bool = False
    schedule: str = "constant"
    momentum: float = 0.0
    weight_decay: float = 0.0
    train_subset: int | None = None
    test_subset: int | None = None
    progress: bool = True
    plot: bool = True


class Diverged(RuntimeError):
    """The loss, or a parameter or buffer, became NaN or infinite."""

    def __init__(self, epoch: int, step: int, what: str, lr: float):
        self.epoch, self.step = epoch, step
        super().__init__(f"{what} at epoch {epoch}, step {step} (lr {lr:g}); "
                         f"try a smaller learning rate, e.g. --lr {lr / 2:g}")


def non_finite_entries(model) -> list[str]:
    """Names of the parameters and buffers that hold a NaN or an infinity."""
    bad = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        xp = backend.get_array_module(tensor.data)
        if tensor.dtype.kind == "f" and not bool(xp.isfinite(tensor.data).all()):
            bad.append(name)
    return bad


def synchronize(device: str) -> None:
    """Wait for the GPU (a no-op on the CPU), so timers measure finished work."""
    if device.startswith("cuda"):
        backend.resolve_device(device)[1].cuda.Device().synchronize()


def evaluate(model, loader) -> float:
    """Accuracy in prediction mode (moving averages, no dropout); the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct = None
    count = 0
    with no_grad():
        for images, labels in loader:
            hits = (model(images).data.argmax(axis=1) == labels.data).sum()
            correct = hits if correct is None else correct + hits
            count += len(labels)
    model.train(was_training)
    return float(correct) / max(1, count)


def train_epoch(model, optimizer, loader, epoch: int, lr_at, step0: int, progress: bool = True,
                check_every: int = 1) -> dict:
    """One pass over ``loader``; returns loss, accuracy and examples/sec (timed over the steps only).

    ``check_every`` steps the per-step losses are copied to the host and checked for NaN/inf
    (every step on the CPU, where that costs nothing; less often on the GPU, to avoid syncs).
    """
    model.train()
    device = loader.device
    loss_sum = correct = None
    count, step_time = 0, 0.0
    pending = []  # (step, loss array) not yet checked on the host

    def check_pending():
        if not pending:
            return 0.0
        values = [float(v) for _, v in pending]
        for (step, _), value in zip(pending, values):
            if not math.isfinite(value):
                raise Diverged(epoch, step, f"the training loss became {value}", optimizer.lr)
        pending.clear()
        return values[-1]

    last_loss = float("nan")
    with Progress(len(loader), f"epoch {epoch}", enabled=progress) as bar:
        for step, (images, labels) in enumerate(loader, start=1):
            start = time.perf_counter()
            optimizer.lr = lr_at(step0 + step - 1)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_time += time.perf_counter() - start
            n = len(labels)
            batch_loss = loss.data.astype("float64") * n     # float32 sums of large losses overflow
            hits = (logits.data.argmax(axis=1) == labels.data).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = hits if correct is None else correct + hits
            count += n
            pending.append((step, loss.data))
            if step % check_every == 0 or step == len(loader):
                last_loss = check_pending()
            bar.update(1, f"loss {last_loss:.4f}")
    start = time.perf_counter()
    synchronize(device)
    step_time += time.perf_counter() - start
    return {"train_loss": float(loss_sum) / count, "train_acc": float(correct) / count,
            "examples_per_sec": count / step_time, "steps": len(loader)}


def write_metrics(out: Path, config: TrainConfig, history: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    (out / "metrics.json").write_text(json.dumps({"config": dataclasses.asdict(config), "history": history}, indent=2))


def plot_history(path: Path, history: list[dict], title: str = "", log=print) -> bool:
    """Loss, train accuracy and test accuracy against epoch, as the chapter's animated plot shows."""
    try:
        from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend and state stay as they are
    except ImportError:
        log("matplotlib is not installed, so no plot was written; `pip install 'tinybn[plot]'` adds it")
        return False
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot(epochs, [row["train_loss"] for row in history], label="train loss")
    ax.plot(epochs, [row["train_acc"] for row in history], "--", label="train acc")
    ax.plot(epochs, [row["test_acc"] for row in history], "-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return True


def prepare_output(out) -> Path:
    """Create the output folder now, so that one that cannot be written is reported before any training."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file; name a folder for the checkpoint and metrics (--out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise ValueError(f"cannot write to the output folder {out} ({error.strerror or error}); "
                         f"name a folder you can write to (--out)") from None
    return out


def first_batch_norm(model):
    from ..nn import BatchNorm, BatchNorm1d, is_materialized

    for module in model.modules():
        if isinstance(module, (BatchNorm, BatchNorm1d)) and is_materialized(module.gamma):
            return module
    return None


def train(config: TrainConfig, log=print, data=None, model=None) -> dict:
    """Run a whole training job as configured; returns ``{"history", "checkpoint", "model"}``.

    ``data`` may pass the four arrays already loaded, and ``model`` a model built elsewhere instead of
    ``config.model`` (the examples do both to compare variants).
    """
    device = backend.resolve_device(config.device)[0]
    out = prepare_output(config.out)
    ckpt_path = out / "checkpoint.npz"
    train_x, train_y, test_x, test_y = data or load_fashion_mnist(config.data, allow_download=config.download)
    if config.train_subset:
        train_x, train_y = train_x[:config.train_subset], train_y[:config.train_subset]
    if config.test_subset:
        test_x, test_y = test_x[:config.test_subset], test_y[:config.test_subset]

    tb_random.manual_seed(config.seed)
    model = build_model(config.model, device=device) if model is None else model.to(device)
    optimizer = SGD(model.parameters(), config.lr, config.momentum, config.weight_decay)
    train_loader = DataLoader(train_x, train_y, config.batch_size, shuffle=True, seed=config.seed, device=device,
                              min_batch=2)
    test_loader = DataLoader(test_x, test_y, max(config.batch_size, 1000), device=device)
    if len(train_loader) == 0:
        raise ValueError(f"no training batch: {len(train_y)} training image(s) with batch size {config.batch_size}, "
                         f"and batch norm needs at least 2 images in a batch; use more (--train-subset)")
    history, start_epoch = [], 0
    if config.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start afresh")
        model_state, optim_state, meta = checkpoint.load(ckpt_path)
        if meta["config"]["model"] != config.model:
            raise ValueError(f"--resume: {ckpt_path} holds a {meta['config']['model']!r} model, not {config.model!r}")
        try:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
        except (KeyError, ValueError) as error:
            message = error.args[0] if error.args else error
            raise ValueError(f"--resume: {ckpt_path} does not fit this run: {message}") from None
        train_loader.set_state(meta["loader_rng"])
        tb_random.generator(numpy).bit_generator.state = meta["tinybn_rng"]
        history, start_epoch = meta["history"], meta["epoch"]
        log(f"resuming from {ckpt_path} after epoch {start_epoch}")
        if start_epoch >= config.epochs:
            log(f"the checkpoint already has {start_epoch} epochs; ask for more with --epochs")

    total_steps = config.epochs * len(train_loader)
    lr_at = lambda step: learning_rate(config.schedule, config.lr, step, total_steps)  # noqa: E731
    log(f"training {config.model} on {device}: {len(train_y)} train / {len(test_y)} test examples, "
        f"batch {config.batch_size}, lr {config.lr:g} ({config.schedule}), {config.epochs} epochs")
    check_every = 1 if device == "cpu" else 25
    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        stats = train_epoch(model, optimizer, train_loader, epoch, lr_at, (epoch - 1) * len(train_loader),
                            config.progress, check_every)
        bad = non_finite_entries(model)  # the last step's update is after its loss was checked
        if bad:
            raise Diverged(epoch, len(train_loader), f"{len(bad)} of the model's parameters and buffers became NaN "
                           f"or infinite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})", optimizer.lr)
        test_acc = evaluate(model, test_loader)
        row = {"epoch": epoch, "train_loss": round(stats["train_loss"], 6), "train_acc": round(stats["train_acc"], 6),
               "test_acc": round(test_acc, 6), "examples_per_sec": round(stats["examples_per_sec"], 1),
               "lr": round(optimizer.lr, 6), "seconds": round(time.perf_counter() - started, 2)}
        history.append(row)
        meta = {"epoch": epoch, "config": dataclasses.asdict(config), "history": history,
                "loader_rng": train_loader.get_state(), "tinybn_rng": tb_random.generator(numpy).bit_generator.state}
        checkpoint.save(ckpt_path, model, optimizer, meta)
        write_metrics(out, config, history)
        # said once the epoch is saved: a run stopped after this line continues from this epoch with --resume
        log(f"epoch {epoch:2d}/{config.epochs}: train loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, "
            f"test acc {row['test_acc']:.4f}, {row['examples_per_sec']:.0f} examples/sec")

    if history:
        last = history[-1]
        log(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}")
        log(f"{last['examples_per_sec']:.1f} examples/sec on {device}")
        bn = first_batch_norm(model)
        if bn is not None:
            with numpy.printoptions(precision=4, suppress=True):  # NumPy's global options stay the caller's
                log(f"first BN layer gamma: {bn.gamma.numpy().reshape(-1)}")
                log(f"first BN layer beta:  {bn.beta.numpy().reshape(-1)}")
        if config.plot and plot_history(out / "metrics.png", history, f"{config.model}, lr {config.lr:g}", log):
            log(f"wrote {out / 'metrics.png'}, {out / 'metrics.csv'}, {out / 'metrics.json'}, {ckpt_path}")
    return {"history": history, "checkpoint": ckpt_path, "model": model}


def evaluate_checkpoint(path, data_dir=None, device=None, download=False, batch_size=1000) -> tuple[float, dict]:
    """Test accuracy of a saved checkpoint (prediction mode)."""
    model_state, _, meta = checkpoint.load(path)
    device = backend.resolve_device(device)[0]
    model = build_model(meta["config"]["model"], device=device)
    try:
        model.load_state_dict(model_state)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else error
        raise ValueError(f"{path} does not hold a usable {meta['config']['model']} model: {message}") from None
    _, _, test_x, test_y = load_fashion_mnist(data_dir, allow_download=download)
    return evaluate(model, DataLoader(test_x, test_y, batch_size, device=device)), meta
