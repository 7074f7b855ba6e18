"""The autograd engine against PyTorch's, on generated expression graphs (skipped without PyTorch).

Hypothesis writes a small program: a few leaves with shapes that broadcast against each other, then a
sequence of operations, each taking its operands from everything computed so far (so values are reused
and gradients fan out), among them broadcasting arithmetic, powers, exp/log, matmul, sums and means
over (negative) axes, reshape, transpose with negative axes, and indexing with ints, slices and
repeated fancy indices. The same program runs in tinybn and in PyTorch, in float64; the values and
every leaf's gradient of a random weighted sum of the results must agree.
"""
import numpy
import pytest
from hypothesis import given, strategies as st

import tinybn

from props import assert_close, budget

torch = pytest.importorskip("torch")


def _binary(name, mine, theirs):
    return name, 2, mine, theirs


BINARY = [
    _binary("add", lambda a, b: a + b, lambda a, b: a + b),
    _binary("sub", lambda a, b: a - b, lambda a, b: a - b),
    _binary("mul", lambda a, b: a * b, lambda a, b: a * b),
    _binary("div", lambda a, b: a / (b * b + 1.0), lambda a, b: a / (b * b + 1.0)),
    _binary("pow tensor", lambda a, b: (a * a + 1.0) ** (b * 0.5), lambda a, b: (a * a + 1.0) ** (b * 0.5)),
]
UNARY = [
    ("radd number", 1, lambda a: 2.0 + a, lambda a: 2.0 + a),
    ("rsub number", 1, lambda a: 1.0 - a, lambda a: 1.0 - a),
    ("rdiv number", 1, lambda a: 1.0 / (a * a + 1.0), lambda a: 1.0 / (a * a + 1.0)),
    ("rmul number", 1, lambda a: 0.5 * a, lambda a: 0.5 * a),
    ("rpow number", 1, lambda a: 2.0 ** (a * 0.5), lambda a: 2.0 ** (a * 0.5)),
    ("numpy scalar left", 1, lambda a: numpy.float64(1.5) * a, lambda a: 1.5 * a),
    ("numpy array left", 1, lambda a: numpy.full(a.shape, 0.25) - a, lambda a: torch.full(a.shape, 0.25,
                                                                                           dtype=a.dtype) - a),
    ("neg", 1, lambda a: -a, lambda a: -a),
    ("exp", 1, lambda a: (a * 0.3).exp(), lambda a: (a * 0.3).exp()),
    ("log", 1, lambda a: (a * a + 1.0).log(), lambda a: (a * a + 1.0).log()),
    ("square", 1, lambda a: a ** 2, lambda a: a ** 2),
    ("cube", 1, lambda a: a ** 3, lambda a: a ** 3),
    ("T", 1, lambda a: a.T, lambda a: a.permute(*reversed(range(a.ndim))) if a.ndim else a),
]



@st.composite
def programs(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    family = [(rows, cols), (1, cols), (rows, 1), (cols,), (cols, rows), (rows, cols, 2)]
    leaves = [draw(st.sampled_from(family)) for _ in range(draw(st.integers(1, 3)))]
    shapes, steps = list(leaves), []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["binary", "unary", "matmul", "reduce", "reshape", "transpose", "index"]))
        a = draw(st.integers(0, len(shapes) - 1))
        shape = shapes[a]
        if kind == "binary":
            b = draw(st.integers(0, len(shapes) - 1))
            try:
                out = numpy.broadcast_shapes(shape, shapes[b])
            except ValueError:
                continue
            name = draw(st.sampled_from([op[0] for op in BINARY]))
            steps.append(dict(kind=kind, name=name, args=(a, b)))
        elif kind == "unary":
            name = draw(st.sampled_from([op[0] for op in UNARY]))
            out = shape[::-1] if name == "T" else shape
            steps.append(dict(kind=kind, name=name, args=(a,)))
        elif kind == "matmul":
            partners = [b for b, other in enumerate(shapes) if len(shape) >= 2 and len(other) == 2
                        and other[0] == shape[-1]]
            if not partners:
                continue
            b = draw(st.sampled_from(partners))
            out = shape[:-1] + shapes[b][1:]
            steps.append(dict(kind=kind, args=(a, b)))
        elif kind == "reduce":
            axis = None
            if shape:
                axes = st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=len(shape),
                                unique_by=lambda axis: axis % len(shape)).map(tuple)
                axis = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1), axes))
            keepdims, mean = draw(st.booleans()), draw(st.booleans())
            out = numpy.zeros(shape).sum(axis=axis, keepdims=keepdims).shape
            steps.append(dict(kind=kind, args=(a,), axis=axis, keepdims=keepdims, mean=mean))
        elif kind == "reshape":
            size = int(numpy.prod(shape))
            target = draw(st.sampled_from([(size,), (size, 1), (1, size), (-1,), (-1, 1)]))
            out = numpy.zeros(shape).reshape(target).shape
            steps.append(dict(kind=kind, args=(a,), shape=target))
        elif kind == "transpose":
            if len(shape) < 2:
                continue
            order = draw(st.permutations(range(len(shape))))
            negative = tuple(axis - len(shape) if draw(st.booleans()) else axis for axis in order)
            out = tuple(shape[axis] for axis in order)
            steps.append(dict(kind=kind, args=(a,), axes=negative))
        else:  # index along the first axis
            if not shape:
                continue
            n = shape[0]
            start = draw(st.integers(0, n - 1))
            index = draw(st.one_of(st.integers(-n, n - 1),
                                   st.builds(slice, st.just(start), st.integers(start + 1, n), st.integers(1, 2)),
                                   st.lists(st.integers(-n, n - 1), min_size=1, max_size=4)))
            out = numpy.zeros(shape)[index].shape
            steps.append(dict(kind=kind, args=(a,), index=index))
        shapes.append(tuple(out))
    return dict(leaves=leaves, steps=steps, shapes=shapes)


def run(program, values, weights, library):
    """Run ``program`` in tinybn or PyTorch; returns the leaves and every intermediate value."""
    if library == "tinybn":
        pool = [tinybn.Tensor(v.copy(), requires_grad=True) for v in values]
    else:
        pool = [torch.tensor(v, requires_grad=True) for v in values]
    leaves = list(pool)
    table = {op[0]: op for op in BINARY + UNARY}
    for step in program["steps"]:
        operands = [pool[i] for i in step["args"]]
        kind = step["kind"]
        if kind in ("binary", "unary"):
            _, _, mine, theirs = table[step["name"]]
            out = (mine if library == "tinybn" else theirs)(*operands)
        elif kind == "matmul":
            out = operands[0] @ operands[1]
        elif kind == "reduce":
            a = operands[0]
            if library == "tinybn":
                out = (a.mean if step["mean"] else a.sum)(axis=step["axis"], keepdims=step["keepdims"])
            elif step["axis"] is None:
                out = a.mean() if step["mean"] else a.sum()
                out = out.reshape((1,) * a.ndim) if step["keepdims"] else out
            else:
                out = (a.mean if step["mean"] else a.sum)(dim=step["axis"], keepdim=step["keepdims"])
        elif kind == "reshape":
            out = operands[0].reshape(step["shape"])
        elif kind == "transpose":
            a = operands[0]
            out = a.transpose(*step["axes"]) if library == "tinybn" else a.permute(*step["axes"])
        else:
            index = step["index"]
            out = operands[0][index if not isinstance(index, list) else (torch.tensor(index) if library == "torch"
                                                                          else numpy.array(index))]
        pool.append(out)
    loss = None
    for value, weight in zip(pool[len(values):], weights):
        term = (value * (weight if library == "tinybn" else torch.tensor(weight))).sum()
        loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    return leaves, pool


@budget(400)
@given(program=programs(), seed=st.integers(0, 2**32 - 1))
def test_engine_matches_pytorch_autograd(program, seed):
    rng = numpy.random.default_rng(seed)
    values = [rng.standard_normal(shape) for shape in program["leaves"]]
    weights = [rng.standard_normal(shape) for shape in program["shapes"][len(values):]]
    mine, my_pool = run(program, values, weights, "tinybn")
    theirs, their_pool = run(program, values, weights, "torch")
    for k, (a, b) in enumerate(zip(my_pool, their_pool)):
        assert_close(f"value {k}", a.numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-10)
    for k, (leaf, reference) in enumerate(zip(mine, theirs)):
        expected = numpy.zeros(reference.shape) if reference.grad is None else reference.grad.numpy()
        actual = numpy.zeros(leaf.shape) if leaf.grad is None else leaf.grad
        assert_close(f"gradient of leaf {k} {leaf.shape}", actual, expected, rtol=1e-9, atol=1e-9)
