"""Checkpoints: one ``.npz`` file with the model, the optimizer, the epoch and the RNG states.

Written atomically (a temporary file in the same folder, then ``os.replace``), so an interrupted
run always leaves the last complete checkpoint intact. Loaded without pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy


def save(path, model, optimizer, meta: dict) -> Path:
    """Write ``model.state_dict()``, ``optimizer.state_dict()`` and JSON-able ``meta`` to ``path``.

    Refuses (ValueError, nothing written) when any of those arrays holds a NaN or an infinity."""
    path = Path(path)
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    bad = [name for name, value in arrays.items() if value.dtype.kind == "f" and not numpy.isfinite(value).all()]
    if bad:  # a checkpoint is what one resumes from: it must never hold a diverged model
        raise ValueError(f"not saving a checkpoint to {path}: {', '.join(bad)} hold NaN or infinite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            numpy.savez(out, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(path) -> tuple[dict, dict, dict]:
    """Return ``(model_state, optimizer_state, meta)``; raises ValueError for a file that is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:
        raise ValueError(f"{path} is not a readable tinybn checkpoint ({type(error).__name__}: {error})") from None
    if "meta" not in arrays:
        raise ValueError(f"{path} is not a tinybn checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        meta["epoch"], meta["config"]["model"]  # noqa: B018 - what every reader of a checkpoint needs
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable tinybn checkpoint: its metadata is damaged "
                         f"({type(error).__name__}: {error})") from None
    model = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    return model, optim, meta
