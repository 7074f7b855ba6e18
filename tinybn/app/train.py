"""The trainer: the chapter's recipe (SGD, lr 1.0, batch 256, 10 epochs) with metrics, plots and checkpoints.

:func:`train` checks the settings, loads the data and builds the model (:func:`_prepare`), resumes if asked, then
hands the model, the optimizer and the batches to the training loop, :func:`tinybn.app.loop.fit`, with the
callbacks the settings ask for: progress, the divergence guard, evaluation, precise statistics, the learning-rate
schedule, speed, the keep-best rule, checkpoints, BN-statistics recording and the metrics files. Data parallelism
(:mod:`tinybn.app.parallel`) changes what the loop is given, not the loop.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy

from .. import backend
from .. import distributed as dist
from .. import functional as F
from .. import random as tb_random
from ..autograd import Tensor, no_grad
from ..functional.batchnorm import BatchTooSmallError
from ..nn import is_materialized, normalization_layers
from ..optim import SGD
from . import checkpoint, loop
from .best import KeepBest
from .bnstats import BNStatsFiles, BNStatsRecorder
from .checkpoint import Checkpoints
from .data import DataLoader, load_fashion_mnist
from .evaluation import Evaluation, evaluate
from .guard import Diverged, DivergenceGuard, non_finite_entries
from .metrics import MetricsFiles, accuracies, plot_history, plural, write_metrics
from .models import build_model
from .parallel import ShareBuffers, data_parallel, prepare_model, share_state
from .precise import PreciseStatistics, bn_statistics, set_bn_statistics, with_precise_bn
from .progress import EpochSeconds, ProgressBar, Speed, synchronize
from .schedule import LearningRateSchedule

__all__ = ["Diverged", "TrainConfig", "accuracies", "evaluate", "evaluate_checkpoint", "first_batch_norm",
           "non_finite_entries", "plot_history", "plural", "prepare_output", "synchronize", "train", "write_metrics"]


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
    train_x, train_y, test_x, test_y, val_x, val_y = _images(config, data)
    tb_random.manual_seed(config.seed)
    model = build_model(config.model, device=device) if model is None else model.to(device)
    layers = [layer for _, layer in normalization_layers(model)]
    has_bn = any(layer.batch_dependent for layer in layers)
    check_a_step(model, train_x, config.batch_size, device)      # before any file is touched
    shard = (0, 1) if comm is None else (comm.rank, comm.world_size)
    # synchronized BN needs 2 images in the whole batch, as one process does (a rank's shard may be empty);
    # batch norm on each rank's shard needs 2 on every rank
    min_batch = 2 * comm.world_size if comm is not None and has_bn and not config.sync_bn else 2
    if comm is not None:
        model = prepare_model(model, comm, config.sync_bn, train_x[:1], device)
    optimizer = SGD(model.parameters(), config.lr, config.momentum, config.weight_decay)
    train_loader = DataLoader(train_x, train_y, config.batch_size, shuffle=True, seed=config.seed, device=device,
                              min_batch=min_batch, shard=shard)
    evaluations = _evaluations(config, comm, device, (test_x, test_y), (val_x, val_y))
    precise, config = _precise_batches(config, log, layers, train_x, train_y, device, shard)
    best_by = ("val_acc" if val_x is not None else "test_acc") + ("_precise" if precise else "")
    if config.keep_best:
        criterion = ("validation" if val_x is not None else "test") + " accuracy" + (" (precise BN)" if precise else "")
        log(f"--keep-best keeps the epoch with the best {criterion} in {out / 'best.npz'}"
            + ("" if val_x is not None else "; choosing by test accuracy is for demonstration only: "
               "--val-size N chooses on held-out training images, which is the honest way"))
    _check_batches(config, log, comm, has_bn, len(train_loader), len(train_y), min_batch)
    return _Job(config, log, comm, device, out, model, optimizer, train_loader, evaluations, precise, best_by,
                f"{len(train_y)} train / {len(test_y)} test examples", has_bn)


def _images(config: TrainConfig, data):
    """(train_x, train_y, test_x, test_y, val_x, val_y): the given or loaded arrays, cut to the subsets asked for,
    the validation images held out of the training ones (None, None without --val-size)."""
    train_x, train_y, test_x, test_y = data or load_fashion_mnist(config.data, allow_download=config.download)
    if config.train_subset:
        train_x, train_y = train_x[:config.train_subset], train_y[:config.train_subset]
    if config.test_subset:
        test_x, test_y = test_x[:config.test_subset], test_y[:config.test_subset]
    train_x, train_y, val_x, val_y = split_validation(train_x, train_y, config.val_size, config.seed)
    return train_x, train_y, test_x, test_y, val_x, val_y


def _evaluations(config: TrainConfig, comm, device, test, val) -> dict:
    """name -> the accuracy of a model in prediction mode on the test (and validation) images; with several
    ranks, each takes a contiguous part and the counts are summed."""
    def held_out(images, labels):
        if comm is not None:
            part = numpy.array_split(numpy.arange(len(labels)), comm.world_size)[comm.rank]
            images, labels = images[part], labels[part]
        return DataLoader(images, labels, max(config.batch_size, 1000), device=device)

    test_loader = held_out(*test)
    evaluations = {"test_acc": lambda m: evaluate(m, test_loader, comm)}
    if val[0] is not None:
        val_loader = held_out(*val)
        evaluations["val_acc"] = lambda m: evaluate(m, val_loader, comm)
    return evaluations


def _precise_batches(config: TrainConfig, log, layers, train_x, train_y, device, shard):
    """(the batches precise BN recomputes the statistics over, or None; the config with their number, so that the
    metrics and the checkpoint record the number used, not "the default")."""
    recomputable = any(layer.pools_statistics for layer in layers)
    count = PRECISE_BN_BATCHES if config.precise_bn is None and recomputable else config.precise_bn
    precise = None
    if count and recomputable:
        precise = precise_batches(train_x, train_y, count, config.batch_size, config.seed, device, shard)
    elif count:
        log(f"{config.model} has no batch norm, so --precise-bn has nothing to recompute")
    return precise, dataclasses.replace(config, precise_bn=count if recomputable else 0)


def _check_batches(config: TrainConfig, log, comm, has_bn: bool, batches: int, images: int, min_batch: int) -> None:
    """Refuse a run without a batch to train on, or with a batch its normalization cannot use on every rank."""
    if batches == 0:
        raise ValueError(f"no training batch: {images} training image(s) with batch size {config.batch_size}, "
                         f"and batch norm needs at least {min_batch} images in a batch"
                         + (f" when {comm.world_size} ranks share it" if comm is not None else "")
                         + "; use more (--train-subset)")
    dropped = images % config.batch_size
    if comm is not None and min_batch > 2 and 2 <= dropped < min_batch:
        log(f"each epoch's last batch of {dropped} images is left out: per-shard batch norm (--no-sync-bn) needs "
            f"2 images on each of the {comm.world_size} ranks")
    if comm is not None and has_bn and config.batch_size < min_batch:
        raise ValueError(f"--batch-size {config.batch_size}: " + (
            f"batch norm on each rank's shard (--no-sync-bn) needs 2 images on each of the {comm.world_size} ranks "
            f"(a batch of at least {min_batch}); or leave out --no-sync-bn, to normalize over the whole batch"
            if not config.sync_bn else "batch norm needs at least 2 images in a batch, as in one process"))


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
    """Resume if asked, then fit epoch after epoch (with a communicator, every rank runs this)."""
    config, comm, out, model = job.config, job.comm, job.out, job.model
    root = comm is None or comm.rank == 0
    history, start_epoch = _start(job, root)
    if root:
        out.mkdir(parents=True, exist_ok=True)
    if root and not config.resume:    # a new run: what an earlier run left in the folder goes now, not later
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    recorder = _recorder(job, start_epoch) if config.bn_stats else None
    try:
        _announce(job)
        given = {"batches": job.train_loader, "optimizer": job.optimizer, "loss_fn": F.cross_entropy}
        if comm is not None:
            given = data_parallel(job.train_loader, job.optimizer, comm)
        callbacks, precise = _callbacks(job, given["optimizer"], history, recorder, root)
        loop.fit(model, epochs=config.epochs, callbacks=callbacks, first_epoch=start_epoch + 1, history=history,
                 **given)
        if history:
            _finish(job, history, precise, recorder, root)
        return {"history": history, "checkpoint": out / "checkpoint.npz", "model": model}
    finally:
        if recorder:
            recorder.close()


def _start(job: _Job, root: bool) -> tuple[list, int]:
    """(history, epochs done): a new run's, the checkpoint's on --resume; with ranks, rank 0's, on every rank."""
    history, start_epoch, failed = [], 0, None
    if job.config.resume and root:
        try:
            history, start_epoch = _resume(job, job.out / "checkpoint.npz")
        except Exception as error:     # noqa: BLE001 - raised below, with the other ranks told first
            if job.comm is None:
                raise
            failed = error
    if job.comm is None:
        return history, start_epoch
    state = None     # rank 0's model and place in the data, resumed or new: the ranks need no shared files
    if root and failed is None:
        state = {"model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(), "history": history,
                 "epoch": start_epoch, "loader_rng": job.train_loader.get_state(),
                 "tinybn_rng": tb_random.generator(numpy).bit_generator.state}
    try:
        state = share_state(job.comm, state)
    except dist.StoppedElsewhere:
        if failed is not None:         # rank 0 says why
            failed.agreed = True
            raise failed from None
        raise
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.train_loader.set_state(state["loader_rng"])
    tb_random.generator(numpy).bit_generator.state = state["tinybn_rng"]
    return state["history"], state["epoch"]


def _recorder(job: _Job, start_epoch: int) -> BNStatsRecorder:
    """The BN-statistics recorder, continuing an earlier run's records on --resume where they fit."""
    recorder = BNStatsRecorder(job.model, first_epoch=start_epoch + 1)
    if job.config.resume:
        try:
            earlier = json.loads((job.out / "bn_stats.json").read_text())
        except (OSError, ValueError):
            earlier = {}
        if not recorder.load(earlier, start_epoch):
            job.log(f"--bn-stats: no records of epochs 1 to {start_epoch} of this model in "
                    f"{job.out / 'bn_stats.json'}; they start at epoch {start_epoch + 1}")
    return recorder


def _announce(job: _Job) -> None:
    """What is about to be trained, and how, said before the first step."""
    config, log, comm = job.config, job.log, job.comm
    log(f"training {config.model} on {job.device}: {job.sizes}, "
        f"batch {config.batch_size}, lr {config.lr:g} ({config.schedule}), {plural(config.epochs, 'epoch')}")
    if comm is not None:
        norm = ("the model has no layer that normalizes over the batch" if not job.has_bn else
                "normalization over the whole batch (synchronized layers)" if config.sync_bn else
                "normalization over each rank's shard (--no-sync-bn)")
        log(f"data parallel over {plural(comm.world_size, 'rank')}: each takes its shard of every batch of "
            f"{config.batch_size}, {norm}")
    if job.precise:
        log(f"precise BN: after each epoch, BN's statistics are also recomputed over {len(job.precise)} training "
            f"batches with the weights frozen (the moving averages lag behind the weights), and the test accuracy "
            f"is measured with them too")


def _callbacks(job: _Job, optimizer, history: list, recorder, root: bool) -> tuple[list, PreciseStatistics | None]:
    """The callbacks around the loop, in the order they act at the end of an epoch."""
    config, comm, steps = job.config, job.comm, len(job.train_loader)
    check_every = 1 if job.device == "cpu" else 25       # reading a GPU loss waits for the GPU
    agree = None if comm is None else (lambda bad: int(comm.all_reduce(numpy.array([bad], numpy.float64))[0]))
    precise = PreciseStatistics(job.model, job.precise, job.evaluations, comm) if job.precise else None
    best = KeepBest(job.best_by, history) if config.keep_best else None
    settings = dataclasses.asdict(config)
    callbacks = [ProgressBar(steps, config.progress and root, check_every),
                 # rank 0's running statistics go to every rank before the guard checks them: all ranks check the
                 # same model, and stop together or not at all
                 ShareBuffers(job.model, comm) if comm is not None and not config.sync_bn else None,
                 DivergenceGuard(job.model, optimizer, steps, check_every, agree),
                 Evaluation(job.model, job.evaluations), precise, Speed(job.train_loader, job.device),
                 LearningRateSchedule(optimizer, config.schedule, config.lr, steps, config.epochs), EpochSeconds(),
                 best, Checkpoints(job.out, job.model, optimizer, settings, history, job.train_loader, precise, best,
                                   write=root),
                 BNStatsFiles(recorder, job.out, f"{config.model}, lr {config.lr:g}") if recorder else None,
                 MetricsFiles(job.out, settings, history, config.epochs, job.log, best, write=root)]
    return [callback for callback in callbacks if callback is not None], precise


def _finish(job: _Job, history: list, precise, recorder, root: bool) -> None:
    """The run's last lines: the summary, the precise statistics put into the model, γ and β, the files written."""
    config, log, comm, out, model = job.config, job.log, job.comm, job.out, job.model
    ckpt_path, best_path, last = out / "checkpoint.npz", out / "best.npz", history[-1]
    log(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, {accuracies(last, 3)}")
    log(f"{last['examples_per_sec']:.1f} examples/sec on {job.device}")
    statistics = None
    if precise and comm is not None:     # only rank 0 wrote the checkpoint
        statistics = comm.broadcast(checkpoint.load_precise(ckpt_path) if root else None)
    elif precise:
        statistics = checkpoint.load_precise(ckpt_path)
    if statistics:  # the model returned predicts with the precise statistics, as its checkpoint does
        set_bn_statistics(model, statistics)
        log(f"the model now predicts with BN statistics recomputed over {len(job.precise)} training batches "
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


def _silent(*args, **kwargs) -> None:
    """The log of a rank other than 0: rank 0 speaks for the job."""


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
