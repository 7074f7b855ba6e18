"""tinybn's random generators, one per array module, all seeded by :func:`manual_seed`."""
from __future__ import annotations

_seed = None
_generators: dict[int, object] = {}


def manual_seed(seed: int) -> None:
    """Seed every generator tinybn uses (dropout masks, initialisation, shuffling)."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def generator(xp):
    """The generator for array module ``xp`` (created, seeded, on first use)."""
    key = id(xp)
    if key not in _generators:
        _generators[key] = xp.random.default_rng(_seed)
    return _generators[key]
