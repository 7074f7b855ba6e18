"""Softmax cross-entropy with integer labels, averaged over the batch.

For logits z (N, K) and labels t (N,) with values in [0, K)::

    log p[n, k] = z[n, k] − log Σ_j e^{z[n, j]}           (computed after subtracting max_j z[n, j])
    L = −(1/N) Σ_n log p[n, t[n]]
    dz[n, k] = dL · (p[n, k] − [k = t[n]]) / N

Subtracting the row maximum first keeps every exponent ≤ 0, so logits of ±1e4 are fine.
Derivation: docs/derivations.md, "Softmax cross-entropy".
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module


def cross_entropy_forward(logits, labels):
    xp = get_array_module(logits)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, classes), got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy expects labels of shape ({logits.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy expects integer class labels, got dtype {labels.dtype}")
    n, classes = logits.shape
    if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"cross_entropy labels must lie in [0, {classes}), got values from {int(labels.min())} "
                         f"to {int(labels.max())}")
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    rows = xp.arange(n)
    loss = -log_p[rows, labels].mean()
    return xp.asarray(loss, dtype=logits.dtype), Cache(log_p=log_p, labels=labels, rows=rows)


def cross_entropy_backward(dy, cache):
    xp = get_array_module(dy)
    n = cache.log_p.shape[0]
    dz = xp.exp(cache.log_p)
    dz[cache.rows, cache.labels] -= 1.0
    dz *= dy / n
    return dz, None


ops.define("cross_entropy", cross_entropy_forward, cross_entropy_backward)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of ``logits`` (N, K) against integer ``labels`` (N,)."""
    return apply("cross_entropy", logits, labels)
