"""Checkpoints: one ``.npz`` file with the model, the optimizer, the epoch and the RNG states; and the training
loop's callback that writes one after every epoch (:class:`Checkpoints`).

Written atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted
run always leaves the last complete checkpoint intact. Loaded without pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy

from .. import random as tb_random
from .loop import Callback


def save(path, model, optimizer, meta: dict, precise: dict | None = None) -> Path:
    """Write ``model.state_dict()``, ``optimizer.state_dict()`` and JSON-able ``meta`` to ``path``, and
    ``precise``, BN statistics recomputed over training batches (state-dict names to arrays), when given.

    Refuses (ValueError, nothing written) when any of those arrays holds a NaN or an infinity."""
    path = Path(path)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    arrays.update({f"precise/{k}": numpy.asarray(v) for k, v in (precise or {}).items()})
    bad = [name for name, value in arrays.items() if value.dtype.kind == "f" and not numpy.isfinite(value).all()]
    if bad:  # a checkpoint is what one resumes from: it must never hold a diverged model
        raise ValueError(f"not saving a checkpoint to {path}: {', '.join(bad)} hold NaN or infinite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    replace_atomically(path, lambda out: numpy.savez(out, **arrays), mode="wb")
    return path


def replace_atomically(path: Path, write, mode: str = "w") -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place: a reader, or a run
    stopped halfway, sees the old file or the new one, never half of one. (Checkpoints, metrics and plots.)"""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with open(handle, mode, **({"newline": ""} if "b" not in mode else {})) as out:
            write(out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes it 0600; these are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path) -> tuple[dict, dict, dict]:
    """Return ``(model_state, optimizer_state, meta)``.

    Raises ValueError, naming the file and what is wrong, for anything that is not a checkpoint as
    :func:`save` writes it: not an ``.npz`` archive, damaged metadata, or arrays that are not finite numbers.
    """
    arrays, meta = _read(path)
    model = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    return model, optim, meta


def load_precise(path) -> dict:
    """The precise-BN statistics saved with a checkpoint (state-dict names to arrays); empty if it has none."""
    arrays, _ = _read(path)
    return {k[len("precise/"):]: v for k, v in arrays.items() if k.startswith("precise/")}


def _read(path) -> tuple[dict, dict]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the checkpoint file in it (checkpoint.npz or best.npz)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable tinybn checkpoint (not an .npz archive)")
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:
        raise ValueError(f"{path} is not a readable tinybn checkpoint ({type(error).__name__}: {error})") from None
    if "meta" not in arrays:
        raise ValueError(f"{path} is not a tinybn checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        problem = _meta_problem(meta)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise ValueError(f"{path} is not a readable tinybn checkpoint: its metadata is damaged ({problem})")
    bad = [key for key, value in arrays.items()
           if value.dtype.kind not in "biuf" or (value.dtype.kind == "f" and not numpy.isfinite(value).all())]
    if bad:
        raise ValueError(f"{path} is damaged: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite numbers")
    for key, value in arrays.items():        # what save() writes: counters are integers, everything else floats
        counter = key.endswith("num_batches_tracked")
        if value.dtype.kind != ("iu" if counter else "f") and not (counter and value.dtype.kind in "iu"):
            raise ValueError(f"{path} is damaged: {key} holds {value.dtype} values, where tinybn writes "
                             f"{'integers' if counter else 'floating-point numbers'}")
        if (key.endswith("moving_var") and (value < 0).any()) or (counter and (value < 0).any()):
            raise ValueError(f"{path} is damaged: {key} holds negative values")
    return arrays, meta


def _meta_problem(meta) -> str | None:
    """What is wrong with a checkpoint's metadata (as train() writes it), or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    epoch = meta.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"epoch {epoch!r} is not a whole number of epochs"
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("model"), str):
        return "no config with a model name"
    history = meta.get("history", [])
    if not isinstance(history, list) or len(history) != epoch:
        return f"the history does not list the {epoch} epoch(s) done"
    for number, row in enumerate(history, start=1):
        if not isinstance(row, dict) or row.get("epoch", number) != number or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in row.values()):
            return f"the history's row for epoch {number} is not that epoch's numbers"
    for key in ("loader_rng", "tinybn_rng"):
        if key in meta and not isinstance(meta[key], dict):
            return f"{key} is not a generator state"
    return None


class Checkpoints(Callback):
    """After every epoch, ``checkpoint.npz`` (and ``best.npz`` when ``keep_best`` says so) in ``out``: the model,
    the optimizer, the precise statistics if any, and what exact resumption needs (the history, the loader's and
    tinybn's generator states). ``write`` is False on every rank but rank 0."""

    def __init__(self, out: Path, model, optimizer, config: dict, history: list, loader, precise=None, keep_best=None,
                 write: bool = True):
        self.out, self.model, self.optimizer, self.config, self.history = out, model, optimizer, config, history
        self.loader, self.precise, self.keep_best, self.write = loader, precise, keep_best, write

    def on_epoch_end(self, epoch, row):
        if not self.write:
            return
        meta = {"epoch": epoch, "config": self.config, "history": self.history,
                "loader_rng": self.loader.get_state(), "tinybn_rng": tb_random.generator(numpy).bit_generator.state}
        statistics = self.precise.statistics if self.precise else None
        save(self.out / "checkpoint.npz", self.model, self.optimizer, meta, statistics)
        if self.keep_best and self.keep_best.best:
            save(self.out / "best.npz", self.model, self.optimizer, {**meta, "best_by": self.keep_best.key}, statistics)
