"""The trainer: the chapter's recipe (SGD, lr 1.0, batch 256, 10 epochs) with metrics, plots and checkpoints."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy

from .. import backend
from .. import distributed as dist
from .. import functional as F
from .. import random as tb_random
from ..autograd import Tensor, no_grad
from ..functional.batchnorm import BatchTooSmallError
from ..nn import convert_sync, is_materialized, normalization_layers, recompute_batch_norm_statistics, running_statistics
from ..optim import SGD, learning_rate
from . import checkpoint
from .checkpoint import replace_atomically
from .bnstats import BNStatsRecorder, write as write_bn_stats
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
    precise_bn: int | None = 0  # after every epoch, BN statistics recomputed over this many training batches (0: off;
    #                             None: PRECISE_BN_BATCHES where the model has batch norm, as the command line does)
    keep_best: bool = False    # also keep best.npz, the epoch with the best validation (else test) accuracy
    val_size: int = 0          # training images held out for validation
    bn_stats: bool = False     # record what every BN layer and sigmoid sees (bn_stats.json and bn_stats.png)
    overwrite: bool = False    # replace a run already in ``out`` (else only resume may use that folder)
    override_config: bool = False   # resume with settings that differ from the checkpoint's
    distributed: bool = False  # data-parallel over the ranks of tinybn.distributed's communicator (MPI)
    sync_bn: bool = True       # with distributed: batch norm over the global batch (SyncBatchNorm), else per shard


PRECISE_BN_BATCHES = 50        # 20 to 200 batches gave the same test accuracy within 0.07 points (docs/results.md)
# What a run writes into its folder; a new run refuses a folder that holds any of them (unless told to overwrite).
RUN_FILES = ("checkpoint.npz", "best.npz", "metrics.csv", "metrics.json", "metrics.png", "bn_stats.json", "bn_stats.png")
# Settings that shape the training trajectory: resuming with other values needs override_config.
TRAJECTORY = ("batch_size", "lr", "momentum", "weight_decay", "schedule", "train_subset", "val_size", "seed")


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


def evaluate(model, loader, comm=None) -> float:
    """Accuracy in prediction mode (moving averages, no dropout); the model's mode is restored.

    With ``comm``, each rank's loader holds its share of the images and the accuracy is over all of them
    (one all_reduce of the hit and image counts; every rank must call this)."""
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
    if comm is not None:
        correct, count = comm.all_reduce(numpy.array([0 if correct is None else float(correct), count], numpy.float64))
    return float(correct) / max(1.0, float(count))


def train_epoch(model, optimizer, loader, epoch: int, lr_at, step0: int, progress: bool = True,
                check_every: int = 1, comm=None) -> dict:
    """One pass over ``loader``; returns loss, accuracy and examples/sec (timed over the steps only).

    ``check_every`` steps the per-step losses are copied to the host and checked for NaN/inf
    (every step on the CPU, where that costs nothing; less often on the GPU, to avoid syncs).

    With ``comm`` (data parallel), ``loader`` yields this rank's shard of each global batch. Each rank's
    loss is its shard's mean loss times its share of the global batch, so the gradients summed over the
    ranks, in one all_reduce per step (:func:`tinybn.distributed.all_reduce_gradients`), are those of the
    global batch's mean loss; the loss and hit count ride in the same collective, so every rank sees, and
    checks, the global loss. The result is the global batch's, on every rank.
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
    global_sizes = loader.batch_sizes()
    with Progress(len(loader), f"epoch {epoch}", enabled=progress) as bar:
        for step, (images, labels) in enumerate(loader, start=1):
            start = time.perf_counter()
            optimizer.lr = lr_at(step0 + step - 1)
            logits = model(images)
            optimizer.zero_grad()
            n = len(labels)
            if comm is None:
                loss = F.cross_entropy(logits, labels)
                loss.backward()
                hits = (logits.data.argmax(axis=1) == labels.data).sum()
            else:
                n = global_sizes[step - 1]
                share = dist.shard_loss(logits, labels, n)    # an empty shard gives 0 (and still runs backward)
                share.backward()
                hits = (logits.data.argmax(axis=1) == labels.data).sum()
                loss_sum_hits = dist.all_reduce_gradients(optimizer.params, comm, extra=(share.data, hits))
                loss, hits = Tensor(numpy.asarray(loss_sum_hits[0])), loss_sum_hits[1]
            optimizer.step()
            step_time += time.perf_counter() - start
            batch_loss = loss.data.astype("float64") * n     # float32 sums of large losses overflow
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = hits if correct is None else correct + hits
            count += n
            pending.append((step, loss.data))
            if step % check_every == 0 or step == len(loader):
                last_loss = check_pending()
            bar.update(1, f"loss {last_loss:.4f}" if math.isfinite(last_loss) else "")   # none read yet on a GPU
    start = time.perf_counter()
    synchronize(device)
    step_time += time.perf_counter() - start
    return {"train_loss": float(loss_sum) / count, "train_acc": float(correct) / count,
            "examples_per_sec": count / step_time, "steps": len(loader)}


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


def saved_config(meta: dict, path) -> dict:
    """A checkpoint's training settings, each checked against the kind :class:`TrainConfig` gives it: a
    hand-edited ``"batch_size": "64"`` is refused in one line, not met as a crash later (or as "64 -> 64")."""
    config = meta["config"]
    for field in dataclasses.fields(TrainConfig):
        if field.name not in config:
            continue
        value, kinds = config[field.name], [_KINDS[kind.strip()] for kind in str(field.type).split("|")]
        fits = any(isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind) for kind in kinds)
        if not fits:
            raise ValueError(f"{path} is damaged: its settings say {field.name} {value!r}, where tinybn writes "
                             f"{' or '.join(str(field.type).split(' | '))}")
    return config


def config_changes(saved: dict, config: TrainConfig) -> list[str]:
    """The trajectory settings in which ``config`` differs from a checkpoint's, as "--lr 1 -> 0.5"."""
    defaults = TrainConfig()
    changes = []
    names = TRAJECTORY + (("epochs",) if "cosine" in (saved.get("schedule"), config.schedule) else ())
    for name in names:       # the cosine schedule spans all the epochs: more epochs change every later rate
        before, now = saved.get(name, getattr(defaults, name)), getattr(config, name)
        if before != now:
            changes.append(f"--{name.replace('_', '-')} {before} -> {now}"
                           + (" (the cosine schedule spans the epochs)" if name == "epochs" else ""))
    return changes


def write_metrics(out: Path, config: TrainConfig, history: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in history for key in row))   # a resumed run may add columns

    def write_csv(handle):
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)

    replace_atomically(out / "metrics.csv", write_csv)
    document = json.dumps({"config": dataclasses.asdict(config), "history": history}, indent=2)
    replace_atomically(out / "metrics.json", lambda handle: handle.write(document))


def plot_history(path: Path, history: list[dict], title: str = "", log=print) -> bool:
    """Loss and accuracies against epoch, as the chapter's animated plot shows; the prediction-mode accuracies
    with the moving averages and, where recorded, with precise BN statistics."""
    try:
        from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend and state stay as they are
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log("matplotlib is not installed, so no plot was written; `pip install 'tinybn[plot]'` adds it")
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


def prepare_output(out, resume: bool = False, overwrite: bool = False) -> Path:
    """Check the output folder before any work, so that one that cannot be written, that holds another
    run, or that has no checkpoint to resume is reported at once. Nothing is created or removed here: the
    folder is made, and an overwritten run's files removed, when training starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file; name a folder for the checkpoint and metrics (--out)")
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it: give one")
    if resume and not (out / "checkpoint.npz").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint.npz'}; run without --resume to "
                                f"start afresh")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (resume or overwrite):
        raise ValueError(f"{out} already holds a run ({', '.join(existing)}); add --resume to continue it, "
                         f"--overwrite to replace it, or name another folder with --out")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to the output folder {out} ({ancestor} is "
                         f"{'not a folder' if not ancestor.is_dir() else 'not writable'}); "
                         f"name a folder you can write to (--out)")
    return out


def split_validation(train_x, train_y, val_size: int, seed: int):
    """``val_size`` training images, drawn at random (seeded), held out: ``(train_x, train_y, val_x, val_y)``."""
    if not val_size:
        return train_x, train_y, None, None
    if val_size >= len(train_y) - 1:
        raise ValueError(f"--val-size {val_size} leaves fewer than 2 of the {len(train_y)} training images to train on")
    order = numpy.random.default_rng([seed, 1]).permutation(len(train_y))
    held, kept = numpy.sort(order[:val_size]), numpy.sort(order[val_size:])
    return train_x[kept], train_y[kept], train_x[held], train_y[held]


def precise_batches(train_x, train_y, num_batches: int, batch_size: int, seed: int, device,
                    shard=(0, 1)) -> DataLoader:
    """The training batches that precise BN averages over: the same ``num_batches`` random batches every epoch
    (seeded, and apart from the training loader's generator, so switching precise BN on changes no weight);
    ``shard``: a data-parallel rank's share of each (the ranks' statistics are then pooled)."""
    count = min(len(train_y), num_batches * batch_size)
    chosen = numpy.sort(numpy.random.default_rng([seed, 2]).permutation(len(train_y))[:count])
    return DataLoader(train_x[chosen], train_y[chosen], batch_size, device=device, min_batch=2, shard=shard)


def bn_statistics(model) -> dict:
    """Copies of every normalization layer's running statistics, by state-dict name."""
    return {name: tensor.data.copy() for name, tensor in running_statistics(model).items()}


def set_bn_statistics(model, statistics: dict) -> None:
    """Put running statistics (as :func:`bn_statistics` returns them) into ``model``; checks them all first."""
    buffers = running_statistics(model)
    for name, value in statistics.items():
        if name not in buffers:
            raise ValueError(f"precise BN statistics: {name} is not a running statistic of a normalization layer "
                             f"of this model")
        if tuple(value.shape) != buffers[name].shape:
            raise ValueError(f"precise BN statistics: {name} has shape {tuple(value.shape)}, "
                             f"the model's {buffers[name].shape}")
    for name, value in statistics.items():
        buffers[name].data = backend.to_device(value, backend.device_of(buffers[name].data)).astype(buffers[name].dtype)


def check_a_step(model, train_x, batch_size: int, device) -> None:
    """One training-mode forward of a copy of the model on a batch of ``batch_size`` images (no weight changes, no
    graph): a batch its normalization layers cannot train on is refused now, before a run deletes or writes a
    file, and not at step 1."""
    import copy

    images = backend.to_device(train_x[:batch_size].astype(numpy.float32) / 255, device)
    try:
        with no_grad():
            copy.deepcopy(model).train()(Tensor(images))
    except BatchTooSmallError as error:
        raise ValueError(f"--batch-size {batch_size}: the model cannot train on batches of {len(images)} image(s): "
                         f"{error.reason} Use --batch-size 2 or more.") from None


def with_precise_bn(model, batches, evaluations: dict, comm=None) -> tuple[dict, dict]:
    """Recompute the BN statistics over ``batches`` (with ``comm``, over every rank's batches together), run each
    of ``evaluations`` (name -> function of the model) with them, and put the moving averages back; returns
    (results, the precise statistics)."""
    moving = bn_statistics(model)
    try:
        recompute_batch_norm_statistics(model, batches, comm=comm)
        results = {name: run(model) for name, run in evaluations.items()}
        precise = bn_statistics(model)
    finally:
        set_bn_statistics(model, moving)
    return results, precise


def first_batch_norm(model):
    """The first layer that normalizes over the batch and has a learned scale: the one whose γ and β the chapter
    prints."""
    for _, layer in normalization_layers(model):
        scale = layer.scale_and_shift()[0]
        if layer.batch_dependent and scale is not None and is_materialized(scale):
            return layer
    return None


def train(config: TrainConfig, log=print, data=None, model=None, comm=None) -> dict:
    """Run a whole training job as configured; returns ``{"history", "checkpoint", "model"}``.

    ``data`` may pass the four arrays already loaded, and ``model`` a model built elsewhere instead of
    ``config.model`` (the examples do both to compare variants).

    ``config.distributed``: every rank of :func:`tinybn.distributed.get_communicator` runs this function (the
    command line's ``--distributed`` starts MPI first). Each trains on its shard of every global batch of
    ``batch_size`` with rank 0's weights; rank 0 alone logs, writes metrics and checkpoints, and reads the
    checkpoint to resume, which any number of ranks may do (docs/distributed.md). ``comm`` may name another
    communicator.
    """
    if not config.distributed:
        if comm is not None:
            raise ValueError("train: a communicator was given but config.distributed is False; set "
                             "distributed=True to train one model on its ranks")
        dist.check_single_process("train()")
        return _run(_prepare(config, log, data, model, None))
    comm = comm or dist.get_communicator()
    error = None      # until the ranks first talk, a rank that fails must tell the others (dist.agree)
    try:
        job = _prepare(config, log if comm.rank == 0 else _silent, data, model, comm)
    except Exception as caught:       # noqa: BLE001 - raised again, on every rank, by agree
        error = caught
    dist.agree(comm, error)
    return _run(job)


@dataclasses.dataclass
class _Job:
    """What :func:`_prepare` sets up for :func:`_run`."""
    config: TrainConfig
    log: object
    comm: object
    device: str
    out: Path
    model: object
    optimizer: SGD
    train_loader: DataLoader
    evaluations: dict
    precise: DataLoader | None
    best_by: str
    sizes: str          # "N train / M test examples"
    has_bn: bool


def _prepare(config: TrainConfig, log, data, model, comm) -> _Job:
    """Everything before the ranks first talk: check the settings, load the data, build the model and loaders."""
    root = comm is None or comm.rank == 0
    if comm is not None and config.bn_stats:
        raise ValueError("--bn-stats records what one process sees; run it without --distributed")
    device = backend.resolve_device(config.device)[0]
    out = prepare_output(config.out, config.resume, config.overwrite) if root else Path(config.out)
    train_x, train_y, test_x, test_y = data or load_fashion_mnist(config.data, allow_download=config.download)
    if config.train_subset:
        train_x, train_y = train_x[:config.train_subset], train_y[:config.train_subset]
    if config.test_subset:
        test_x, test_y = test_x[:config.test_subset], test_y[:config.test_subset]
    train_x, train_y, val_x, val_y = split_validation(train_x, train_y, config.val_size, config.seed)

    tb_random.manual_seed(config.seed)
    model = build_model(config.model, device=device) if model is None else model.to(device)
    layers = [layer for _, layer in normalization_layers(model)]
    has_bn = any(layer.batch_dependent for layer in layers)
    shard, min_batch = (0, 1), 2
    check_a_step(model, train_x, config.batch_size, device)      # before any file is touched
    if comm is not None:
        shard = (comm.rank, comm.world_size)
        # synchronized BN needs 2 images in the whole batch, as one process does (a rank's shard may be empty);
        # batch norm on each rank's shard needs 2 on every rank
        if has_bn and not config.sync_bn:
            min_batch = 2 * comm.world_size
        if config.sync_bn:
            model = convert_sync(model, comm)
        if not all(is_materialized(t) for t in (*model.parameters(), *model.buffers())):
            with no_grad():           # lazy layers take their sizes from one image, so that rank 0's state can go out
                model.eval()(Tensor(backend.to_device(train_x[:1].astype(numpy.float32), device)))
                model.train()
    optimizer = SGD(model.parameters(), config.lr, config.momentum, config.weight_decay)
    train_loader = DataLoader(train_x, train_y, config.batch_size, shuffle=True, seed=config.seed, device=device,
                              min_batch=min_batch, shard=shard)

    def held_out(images, labels):   # evaluated in prediction mode; with several ranks, each takes a contiguous part
        if comm is not None:
            part = numpy.array_split(numpy.arange(len(labels)), comm.world_size)[comm.rank]
            images, labels = images[part], labels[part]
        return DataLoader(images, labels, max(config.batch_size, 1000), device=device)

    test_loader = held_out(test_x, test_y)
    evaluations = {"test_acc": lambda m: evaluate(m, test_loader, comm)}
    if val_x is not None:
        val_loader = held_out(val_x, val_y)
        evaluations["val_acc"] = lambda m: evaluate(m, val_loader, comm)
    precise = None
    recomputable = any(layer.pools_statistics for layer in layers)
    precise_count = PRECISE_BN_BATCHES if config.precise_bn is None and recomputable else config.precise_bn
    if precise_count and recomputable:
        precise = precise_batches(train_x, train_y, precise_count, config.batch_size, config.seed, device, shard)
    elif precise_count:
        log(f"{config.model} has no batch norm, so --precise-bn has nothing to recompute")
    # the metrics and the checkpoint record the number of batches used, not "the default"
    config = dataclasses.replace(config, precise_bn=precise_count if recomputable else 0)
    best_by = ("val_acc" if val_x is not None else "test_acc") + ("_precise" if precise else "")
    best_path = out / "best.npz"
    if config.keep_best:
        criterion = ("validation" if val_x is not None else "test") + " accuracy" + (" (precise BN)" if precise else "")
        log(f"--keep-best keeps the epoch with the best {criterion} in {best_path}"
            + ("" if val_x is not None else "; choosing by test accuracy is for demonstration only: "
               "--val-size N chooses on held-out training images, which is the honest way"))
    if len(train_loader) == 0:
        raise ValueError(f"no training batch: {len(train_y)} training image(s) with batch size {config.batch_size}, "
                         f"and batch norm needs at least {min_batch} images in a batch"
                         + (f" when {comm.world_size} ranks share it" if comm is not None else "")
                         + "; use more (--train-subset)")
    dropped = len(train_y) % config.batch_size
    if comm is not None and min_batch > 2 and 2 <= dropped < min_batch:
        log(f"each epoch's last batch of {dropped} images is left out: per-shard batch norm (--no-sync-bn) needs "
            f"2 images on each of the {comm.world_size} ranks")
    if comm is not None and has_bn and config.batch_size < min_batch:
        raise ValueError(f"--batch-size {config.batch_size}: " + (
            f"batch norm on each rank's shard (--no-sync-bn) needs 2 images on each of the {comm.world_size} ranks "
            f"(a batch of at least {min_batch}); or leave out --no-sync-bn, to normalize over the whole batch"
            if not config.sync_bn else "batch norm needs at least 2 images in a batch, as in one process"))
    return _Job(config, log, comm, device, out, model, optimizer, train_loader, evaluations, precise, best_by,
                f"{len(train_y)} train / {len(test_y)} test examples", has_bn)


def _resume(job: _Job, ckpt_path) -> tuple[list, int]:
    """Load ``ckpt_path`` into the job's model, optimizer and generators; returns (history, epochs done)."""
    config, log, model, optimizer, train_loader, best_by = (job.config, job.log, job.model, job.optimizer,
                                                            job.train_loader, job.best_by)
    model_state, optim_state, meta = checkpoint.load(ckpt_path)
    saved = saved_config(meta, ckpt_path)
    if saved["model"] != config.model:
        raise ValueError(f"--resume: {ckpt_path} holds a {saved['model']!r} model, not {config.model!r}")
    changed = config_changes(saved, config)
    if changed and not config.override_config:
        raise ValueError(f"--resume: {ckpt_path} was trained with other settings ({'; '.join(changed)}); "
                         f"give the same ones, or add --override-config to continue with the new ones")
    if changed:
        log(f"resuming with changed settings: {'; '.join(changed)}")
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else error
        raise ValueError(f"--resume: {ckpt_path} does not fit this run: {message}") from None
    try:
        train_loader.set_state(meta["loader_rng"])
        tb_random.generator(numpy).bit_generator.state = meta["tinybn_rng"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--resume: {ckpt_path} is damaged: its random generators' states cannot be restored "
                         f"({type(error).__name__}: {error})") from None
    history, start_epoch = meta["history"], meta["epoch"]
    log(f"resuming from {ckpt_path} after epoch {start_epoch}")
    if start_epoch >= config.epochs:
        log(f"the checkpoint already has {plural(start_epoch, 'epoch')}; ask for more with --epochs")
    if config.keep_best and history and any(best_by not in row for row in history):
        log(f"--keep-best: the earlier epochs have no {best_by}, so the best is chosen among the epochs from "
            f"now on")
    return history, start_epoch


def _run(job: _Job) -> dict:
    """Resume if asked, then train epoch after epoch (with a communicator, every rank runs this)."""
    config, log, comm, device, out, model, optimizer, train_loader = (
        job.config, job.log, job.comm, job.device, job.out, job.model, job.optimizer, job.train_loader)
    evaluations, precise, best_by = job.evaluations, job.precise, job.best_by
    root = comm is None or comm.rank == 0
    ckpt_path, best_path = out / "checkpoint.npz", out / "best.npz"
    history, start_epoch = [], 0
    failed = None
    if config.resume and root:
        try:
            history, start_epoch = _resume(job, ckpt_path)
        except Exception as error:     # noqa: BLE001 - raised below, with the other ranks told first
            if comm is None:
                raise
            failed = error
    if comm is not None:   # rank 0's model and place in the data, resumed or new: the ranks need no shared files
        state = None
        if root and failed is None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                     "epoch": start_epoch, "loader_rng": train_loader.get_state(),
                     "tinybn_rng": tb_random.generator(numpy).bit_generator.state}
        state = comm.broadcast(state)
        if state is None:                   # rank 0 could not resume: every rank stops here, rank 0 says why
            error = failed if root else dist.StoppedElsewhere("rank 0 could not resume (it said why)")
            error.agreed = True
            raise error
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train_loader.set_state(state["loader_rng"])
        tb_random.generator(numpy).bit_generator.state = state["tinybn_rng"]
        history, start_epoch = state["history"], state["epoch"]

    if root:
        out.mkdir(parents=True, exist_ok=True)
    if root and not config.resume:    # a new run: what an earlier run left in the folder goes now, not later
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    recorder = BNStatsRecorder(model, first_epoch=start_epoch + 1) if config.bn_stats else None
    if recorder and config.resume:
        try:
            earlier = json.loads((out / "bn_stats.json").read_text())
        except (OSError, ValueError):
            earlier = {}
        if not recorder.load(earlier, start_epoch):
            log(f"--bn-stats: no records of epochs 1 to {start_epoch} of this model in {out / 'bn_stats.json'}; "
                f"they start at epoch {start_epoch + 1}")
    try:
        total_steps = config.epochs * len(train_loader)
        lr_at = lambda step: learning_rate(config.schedule, config.lr, step, total_steps)  # noqa: E731
        log(f"training {config.model} on {device}: {job.sizes}, "
            f"batch {config.batch_size}, lr {config.lr:g} ({config.schedule}), {plural(config.epochs, 'epoch')}")
        if comm is not None:
            norm = ("the model has no layer that normalizes over the batch" if not job.has_bn else
                    "normalization over the whole batch (synchronized layers)" if config.sync_bn else
                    "normalization over each rank's shard (--no-sync-bn)")
            log(f"data parallel over {plural(comm.world_size, 'rank')}: each takes its shard of every batch of "
                f"{config.batch_size}, {norm}")
        if precise:
            log(f"precise BN: after each epoch, BN's statistics are also recomputed over {len(precise)} training batches "
                f"with the weights frozen (the moving averages lag behind the weights), and the test accuracy is "
                f"measured with them too")
        check_every = 1 if device == "cpu" else 25
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            stats = train_epoch(model, optimizer, train_loader, epoch, lr_at, (epoch - 1) * len(train_loader),
                                config.progress and root, check_every, comm)
            if recorder:
                recorder.end_epoch()
            if comm is not None and not config.sync_bn:
                # per-shard batch norm leaves each rank its own moving averages; rank 0's go to every rank (as
                # PyTorch's DistributedDataParallel broadcasts them), so that all evaluate and save one model
                for tensor in model.buffers():
                    tensor.data = backend.to_device(comm.broadcast(backend.to_numpy(tensor.data)), device)
            bad = non_finite_entries(model)  # the last step's update is after its loss was checked
            if bad:
                raise Diverged(epoch, len(train_loader), f"{len(bad)} of the model's parameters and buffers became NaN "
                               f"or infinite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})", optimizer.lr)
            row = {"epoch": epoch, "train_loss": round(stats["train_loss"], 6), "train_acc": round(stats["train_acc"], 6)}
            row.update({name: round(run(model), 6) for name, run in evaluations.items()})
            statistics = None
            if precise:
                results, statistics = with_precise_bn(model, precise, evaluations, comm)
                row.update({f"{name}_precise": round(value, 6) for name, value in results.items()})
                statistics = {name: backend.to_numpy(value) for name, value in statistics.items()}
            row.update({"examples_per_sec": round(stats["examples_per_sec"], 1), "lr": round(optimizer.lr, 6),
                        "seconds": round(time.perf_counter() - started, 2)})
            history.append(row)
            meta = {"epoch": epoch, "config": dataclasses.asdict(config), "history": history,
                    "loader_rng": train_loader.get_state(), "tinybn_rng": tb_random.generator(numpy).bit_generator.state}
            best = config.keep_best and row[best_by] >= max(r.get(best_by, -1.0) for r in history)
            if root:
                checkpoint.save(ckpt_path, model, optimizer, meta, statistics)
                if best:
                    checkpoint.save(best_path, model, optimizer, {**meta, "best_by": best_by}, statistics)
                write_metrics(out, config, history)
            if recorder:
                write_bn_stats(recorder, out, f"{config.model}, lr {config.lr:g}")
            # said once the epoch is saved: a run stopped after this line continues from this epoch with --resume
            log(f"epoch {epoch:2d}/{config.epochs}: train loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, "
                f"{accuracies(row)}, {row['examples_per_sec']:.0f} examples/sec" + (" (best so far)" if best else ""))

        if history:
            last = history[-1]
            log(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, {accuracies(last, 3)}")
            log(f"{last['examples_per_sec']:.1f} examples/sec on {device}")
            if precise and comm is not None:     # only rank 0 wrote the checkpoint
                statistics = comm.broadcast(checkpoint.load_precise(ckpt_path) if root else None)
            else:
                statistics = checkpoint.load_precise(ckpt_path) if precise else None
            if statistics:  # the model returned predicts with the precise statistics, as its checkpoint does
                set_bn_statistics(model, statistics)
                log(f"the model now predicts with BN statistics recomputed over {len(precise)} training batches "
                    f"(precise BN); the checkpoint keeps them next to the moving averages")
            bn = first_batch_norm(model)
            if bn is not None:
                gamma, beta = bn.scale_and_shift()
                with numpy.printoptions(precision=4, suppress=True):  # NumPy's global options stay the caller's
                    log(f"first BN layer gamma: {gamma.numpy().reshape(-1)}")
                    log(f"first BN layer beta:  {beta.numpy().reshape(-1)}")
            if root and config.plot and plot_history(out / "metrics.png", history, f"{config.model}, lr {config.lr:g}", log):
                log(f"wrote {out / 'metrics.png'}, {out / 'metrics.csv'}, {out / 'metrics.json'}, {ckpt_path}"
                    + (f", {best_path}" if config.keep_best and best_path.exists() else "")
                    + (f", {out / 'bn_stats.png'}, {out / 'bn_stats.json'}" if recorder else ""))
        return {"history": history, "checkpoint": ckpt_path, "model": model}
    finally:
        if recorder:
            recorder.close()


def _silent(*args, **kwargs) -> None:
    """The log of a rank other than 0: rank 0 speaks for the job."""


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


def evaluate_checkpoint(path, data_dir=None, device=None, download=False, batch_size=1000,
                        precise_bn: int = 0) -> tuple[dict, dict]:
    """Test accuracy of a saved checkpoint (prediction mode): ``({"test_acc": ..., maybe "test_acc_precise"}, meta)``.

    ``test_acc`` uses the moving averages. ``test_acc_precise`` uses BN statistics recomputed over ``precise_bn``
    training batches when that is given, else the precise statistics saved with the checkpoint, if any.
    """
    model_state, _, meta = checkpoint.load(path)
    precise = checkpoint.load_precise(path)
    device = backend.resolve_device(device)[0]
    name = saved_config(meta, path)["model"]
    model = build_model(name, device=device)
    try:
        model.load_state_dict(model_state)
        moving = bn_statistics(model)
        if precise:
            set_bn_statistics(model, precise)   # checks them
            set_bn_statistics(model, moving)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else error
        raise ValueError(f"{path} does not hold a usable {name} model: {message}") from None
    has_bn = bool(moving)
    if precise_bn and not has_bn:
        raise ValueError(f"{path} holds a {name} model, which has no batch norm: --precise-bn has nothing to recompute")
    train_x, train_y, test_x, test_y = load_fashion_mnist(data_dir, allow_download=download)
    test_loader = DataLoader(test_x, test_y, batch_size, device=device)
    result = {"test_acc": evaluate(model, test_loader)}
    if precise_bn:
        config = saved_config(meta, path)      # the run's own training images: its subset, less its validation split
        if config.get("train_subset"):
            train_x, train_y = train_x[:config["train_subset"]], train_y[:config["train_subset"]]
        train_x, train_y, _, _ = split_validation(train_x, train_y, config.get("val_size", 0), config.get("seed", 0))
        batches = precise_batches(train_x, train_y, precise_bn, config.get("batch_size", 256), config.get("seed", 0),
                                  device)
        result["test_acc_precise"] = with_precise_bn(model, batches, {"acc": lambda m: evaluate(m, test_loader)})[0]["acc"]
    elif precise:
        set_bn_statistics(model, precise)
        result["test_acc_precise"] = evaluate(model, test_loader)
    return result, meta
