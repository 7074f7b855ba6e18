"""Tensor and reverse-mode automatic differentiation.

A :class:`Tensor` wraps an array (``.data``, NumPy or CuPy) and, when it was made by an
operation on tensors that require gradients, remembers a :class:`Node`: the backward rule of
that operation, what the rule needs (its ``cache``) and the input tensors.
``loss.backward()`` visits the nodes in reverse topological order and sends each gradient
back through its rule, adding up the contributions of every path (fan-out).

Every operation, from ``+`` to ``conv2d``, is a pair of pure array functions defined once, by name, in
the op registry (:mod:`tinybn.ops`)::

    out, cache = forward(*arrays, **params)
    input_grads = backward(dy, cache)       # one entry per input, None where not needed

and :func:`apply` runs the op by name and connects it to the graph. The arithmetic pairs live in this
file; the neural-network ones in :mod:`tinybn.functional`.

Conventions: ``dy`` is the gradient of the loss with respect to an operation's output,
``dx``/``da``/``db`` ... those with respect to its inputs, in the order of the inputs.
"""
from __future__ import annotations

import functools
import inspect
import threading
from types import SimpleNamespace

import numpy

from . import backend, ops

__all__ = ["Tensor", "tensor", "no_grad", "enable_grad", "is_grad_enabled", "apply", "Cache", "unbroadcast"]

class Cache(SimpleNamespace):
    """What a forward keeps for its backward, by name (``Cache(x_hat=..., inv_std=...)``).

    When the forward is recorded, the engine adds ``needs_input_grad``: one flag per input of the op,
    True where that input needs a gradient (PyTorch's ``ctx.needs_input_grad``). A backward may skip
    the others; called by hand, without the engine, every gradient is needed.
    """

    needs_input_grad = None

    def needs(self, i: int) -> bool:
        """Whether the gradient of input ``i`` is needed."""
        return self.needs_input_grad is None or self.needs_input_grad[i]


# Grad mode belongs to a thread, as in PyTorch: one thread predicting under no_grad() must not turn
# recording off for a thread that trains. A new thread starts with recording on.
_thread_state = threading.local()


def is_grad_enabled() -> bool:
    """Whether operations in this thread record a graph (False inside ``no_grad()``)."""
    return getattr(_thread_state, "grad_enabled", True)


class _GradMode:
    """Sets this thread's grad mode inside a ``with`` block, and puts back exactly what it found.

    One object may be entered again while in use (nested, recursive, or by several threads): each
    entry keeps what it found on a stack of its own thread. As a decorator it runs every call of the
    function (every step of a generator) in the mode.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._found = {}  # thread id -> the modes found on entry, innermost last

    def __enter__(self):
        self._found.setdefault(threading.get_ident(), []).append(is_grad_enabled())
        _thread_state.grad_enabled = self.enabled
        return self

    def __exit__(self, *exc):
        found = self._found[threading.get_ident()]
        _thread_state.grad_enabled = found.pop()
        if not found:
            del self._found[threading.get_ident()]
        return False

    def __call__(self, function):
        enabled = self.enabled
        if inspect.isgeneratorfunction(function):
            @functools.wraps(function)
            def generator(*args, **kwargs):
                # every step of the wrapped generator runs in the mode: next()/send(), throw() and close()
                steps = function(*args, **kwargs)
                try:
                    with _GradMode(enabled):
                        item = next(steps)
                    while True:
                        try:
                            sent = yield item
                        except GeneratorExit:
                            with _GradMode(enabled):
                                steps.close()
                            raise
                        except BaseException as error:
                            with _GradMode(enabled):
                                item = steps.throw(error)
                        else:
                            with _GradMode(enabled):
                                item = steps.send(sent)
                except StopIteration as stop:
                    return stop.value
            return generator

        @functools.wraps(function)
        def call(*args, **kwargs):
            with _GradMode(enabled):
                return function(*args, **kwargs)
        return call


def no_grad(function=None):
    """Context manager (or decorator, ``@no_grad()`` or ``@no_grad``) inside which operations of this thread
    record no graph."""
    mode = _GradMode(False)
    return mode if function is None else mode(function)


def enable_grad(function=None):
    """Context manager (or decorator, ``@enable_grad()`` or ``@enable_grad``) that turns graph recording back
    on in this thread."""
    mode = _GradMode(True)
    return mode if function is None else mode(function)


class Node:
    """One recorded operation: its backward rule, the cache the rule needs and its inputs.

    ``inputs`` has one entry per input of the operation: the input's own :class:`Node` when it
    was computed by another recorded operation, the tensor itself when it is a leaf that requires a
    gradient, else None. The graph holds nodes, not intermediate tensors, so an intermediate array
    is freed as soon as nothing needs it (a backward rule that needs it keeps it in its cache).

    ``shapes`` are the inputs' shapes (each gradient must have its input's shape) and ``versions``
    the version counters of the input tensors with the value each had at the forward pass: a backward
    rule reads the arrays it cached, so one changed in place since then would give a wrong gradient.
    After ``backward()`` the node is freed (``backward`` is None) unless the graph was retained.
    """

    __slots__ = ("backward", "cache", "inputs", "name", "shapes", "versions", "dtype")

    def __init__(self, backward, cache, inputs, name, shapes, versions, dtype):
        self.backward, self.cache, self.inputs, self.name = backward, cache, inputs, name
        self.shapes, self.versions, self.dtype = shapes, versions, dtype

    def free(self):
        self.backward = self.cache = None
        self.inputs = self.versions = ()

    def check(self):
        """Raise if this node cannot be differentiated any more: freed, or an input changed in place."""
        if self.backward is None:
            raise RuntimeError(f"backward() reached the {self.name} operation, whose graph was freed by an earlier "
                               f"backward(); run the forward computation again, or pass retain_graph=True to the "
                               f"first backward() to keep the graph")
        for counter, version in self.versions:
            if counter[0] != version:
                raise RuntimeError(f"backward(): an input of the {self.name} operation was changed in place after the "
                                   f"forward pass (through .data, e.g. `t.data += ...` or an optimizer step), and its "
                                   f"backward rule reads the old values; run the forward computation again after "
                                   f"changing it")


def _as_data(value):
    return value.data if isinstance(value, Tensor) else value


def _on_one_device(name, arrays, tensors):
    """The tensors of one op live on one device, as in PyTorch; a NumPy array beside GPU tensors is a constant
    and moves to their device. (All on the CPU, the common case, costs one set of types.)"""
    if {type(t.data) for t in tensors} <= {numpy.ndarray}:
        return arrays
    devices = sorted({t.device for t in tensors})
    if len(devices) > 1:
        raise RuntimeError(f"{name}: expected all tensors on one device, got {' and '.join(devices)}; "
                           f"move them to one with .to(device) (a module with module.to(device))")
    return [backend.to_device(a, devices[0]) if type(a) is numpy.ndarray else a for a in arrays]


def apply(name: str, *inputs, **params):
    """Run the op ``name`` on the arrays of ``inputs`` and, if any input needs a gradient, record its backward.

    ``inputs`` may mix tensors, arrays and Python scalars; only tensors with ``requires_grad``
    receive gradients. ``params`` are passed to the forward unchanged (strides, modes, ...).
    The registry chooses the implementation (:func:`tinybn.ops.choose`: a kernel that applies, else
    the reference). A forward may return a tuple ``(y, *state)``: only ``y`` is differentiable, and the
    state (batch norm's batch statistics) comes back as plain tensors after it.
    """
    arrays, tensors = [], []
    for value in inputs:
        if isinstance(value, Tensor):
            arrays.append(value.data)
            tensors.append(value)
        else:
            arrays.append(value)
    arrays = _on_one_device(name, arrays, tensors)
    implementation = ops.choose(ops.get(name), arrays, params)
    forward, backward = implementation.forward, implementation.backward
    for observer in ops.observers():
        forward = observer.wrap(implementation, "forward", forward)
        backward = observer.wrap(implementation, "backward", backward)
    recording = any(t.requires_grad for t in tensors) and is_grad_enabled()
    if implementation.wants_recording:
        params = dict(params, recording=recording)
    out, cache = forward(*arrays, **params)
    extras = ()
    if isinstance(out, tuple):  # (differentiable output, *state such as batch statistics)
        out, *extras = out
    result = Tensor(out, requires_grad=recording)
    owner = _memory_owner(out)
    for t in tensors:  # a view of an input (reshape, transpose, ...) is changed by what changes the input
        if _memory_owner(t.data) is owner:
            result._version = t._version
            break
    if recording:
        needs = tuple(isinstance(value, Tensor) and value.requires_grad for value in inputs)
        cache.needs_input_grad = needs
        graph_inputs = tuple((value._node or value) if need else None for value, need in zip(inputs, needs))
        shapes = tuple(array.shape if isinstance(value, Tensor) else None for value, array in zip(inputs, arrays))
        # the inputs' arrays and the output's (exp, sigmoid and pow cache y) must not change before backward
        versions = tuple((t._version, t._version[0]) for t in (*tensors, result))
        result._node = Node(backward, cache, graph_inputs, name, shapes, versions, out.dtype)
    if extras:
        return (result, *(Tensor(extra) for extra in extras))
    return result


def _memory_owner(array):
    """The array that owns ``array``'s memory (itself, unless it is a view)."""
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


def _topological_order(root: Node) -> list:
    """The nodes reachable from ``root``, each after every node that consumes its output (iterative:
    deep graphs are fine), so that a node's gradient is complete when it is reached."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node.inputs:
            if isinstance(parent, Node) and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, so it gets ``shape``."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape) if axes else grad.reshape(shape)


def _shape(value):
    return getattr(value, "shape", ())


# ---------------------------------------------------------------- arithmetic: forward, then backward


def add_forward(a, b):
    return a + b, Cache(a_shape=_shape(a), b_shape=_shape(b))


def add_backward(dy, cache):
    return unbroadcast(dy, cache.a_shape), unbroadcast(dy, cache.b_shape)


ops.define("add", add_forward, add_backward)


def sub_forward(a, b):
    return a - b, Cache(a_shape=_shape(a), b_shape=_shape(b))


def sub_backward(dy, cache):
    return unbroadcast(dy, cache.a_shape), unbroadcast(-dy, cache.b_shape)


ops.define("sub", sub_forward, sub_backward)


def mul_forward(a, b):
    return a * b, Cache(a=a, b=b)


def mul_backward(dy, cache):
    # y = a*b:  dL/da = dy*b,  dL/db = dy*a
    return unbroadcast(dy * cache.b, _shape(cache.a)), unbroadcast(dy * cache.a, _shape(cache.b))


ops.define("mul", mul_forward, mul_backward)


def div_forward(a, b):
    return a / b, Cache(a=a, b=b)


def div_backward(dy, cache):
    # y = a/b:  dL/da = dy/b,  dL/db = -dy*a/b^2
    da = dy / cache.b
    db = -da * cache.a / cache.b
    return unbroadcast(da, _shape(cache.a)), unbroadcast(db, _shape(cache.b))


ops.define("div", div_forward, div_backward)


def pow_forward(a, b):
    y = a ** b
    return y, Cache(a=a, b=b, y=y)


def pow_backward(dy, cache):
    # y = a^b:  dL/da = dy*b*a^(b-1),  dL/db = dy*y*log(a)  (each only when that operand is an array).
    # As in PyTorch, the 0·∞ cases count as 0: dL/da where b = 0 (a^(b-1) = ∞ at a = 0), and dL/db where
    # a = 0 and b ≥ 0 (y = 0, log a = −∞), where the limit is 0.
    a, b, y = cache.a, cache.b, cache.y
    xp = backend.get_array_module(a, b)
    da = db = None
    with numpy.errstate(divide="ignore", invalid="ignore"):
        if hasattr(a, "shape"):
            da = unbroadcast(xp.where(xp.asarray(b) == 0, 0.0, dy * b * a ** (b - 1)), _shape(a))
        if hasattr(b, "shape"):
            db = unbroadcast(xp.where((xp.asarray(a) == 0) & (b >= 0), 0.0, dy * y * xp.log(a)), _shape(b))
    return da, db


ops.define("pow", pow_forward, pow_backward)


def neg_forward(a):
    return -a, Cache()


def neg_backward(dy, cache):
    return (-dy,)


ops.define("neg", neg_forward, neg_backward)


def matmul_forward(a, b):
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs operands with at least 2 dimensions, got shapes {a.shape} and {b.shape}")
    return a @ b, Cache(a=a, b=b)


def matmul_backward(dy, cache):
    # Y = A B:  dA = dY B^T,  dB = A^T dY  (summed over broadcast batch axes)
    a, b = cache.a, cache.b
    da = dy @ b.swapaxes(-1, -2)
    db = a.swapaxes(-1, -2) @ dy
    return unbroadcast(da, a.shape), unbroadcast(db, b.shape)


ops.define("matmul", matmul_forward, matmul_backward)


def exp_forward(a):
    xp = backend.get_array_module(a)
    y = xp.exp(a)
    return y, Cache(y=y)


def exp_backward(dy, cache):
    return (dy * cache.y,)


ops.define("exp", exp_forward, exp_backward)


def log_forward(a):
    xp = backend.get_array_module(a)
    return xp.log(a), Cache(a=a)


def log_backward(dy, cache):
    return (dy / cache.a,)


ops.define("log", log_forward, log_backward)


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def sum_forward(a, axis=None, keepdims=False):
    return a.sum(axis=axis, keepdims=keepdims), Cache(shape=a.shape, axes=_normalize_axis(axis, a.ndim), keepdims=keepdims)


def sum_backward(dy, cache):
    # Every input element contributes once to its sum, so it receives the sum's gradient.
    xp = backend.get_array_module(dy)
    if not cache.keepdims:
        dy = xp.expand_dims(dy, cache.axes) if cache.axes else dy
    return (xp.broadcast_to(dy, cache.shape),)


ops.define("sum", sum_forward, sum_backward)


def mean_forward(a, axis=None, keepdims=False):
    axes = _normalize_axis(axis, a.ndim)
    count = int(numpy.prod([a.shape[i] for i in axes])) if axes else 1
    return a.mean(axis=axis, keepdims=keepdims), Cache(shape=a.shape, axes=axes, keepdims=keepdims, count=count)


def mean_backward(dy, cache):
    (dx,) = sum_backward(dy, cache)
    return (dx / cache.count,)


ops.define("mean", mean_forward, mean_backward)


def reshape_forward(a, shape):
    return a.reshape(shape), Cache(shape=a.shape)


def reshape_backward(dy, cache):
    return (dy.reshape(cache.shape),)


ops.define("reshape", reshape_forward, reshape_backward)


def transpose_forward(a, axes=None):
    y = a.transpose(axes)                                      # NumPy checks the axes (negative ones allowed)
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(int(axis) % a.ndim for axis in axes)
    return y, Cache(axes=axes)


def transpose_backward(dy, cache):
    # y = x.transpose(axes) puts input axis axes[k] at output position k; the inverse permutation undoes it
    inverse = [0] * len(cache.axes)
    for position, axis in enumerate(cache.axes):
        inverse[axis] = position
    return (dy.transpose(inverse),)


ops.define("transpose", transpose_forward, transpose_backward)


def getitem_forward(a, index):
    return a[index], Cache(shape=a.shape, dtype=a.dtype, index=index)


def getitem_backward(dy, cache):
    # Scatter-add: an element picked twice by a fancy index gets both gradients.
    xp = backend.get_array_module(dy)
    dx = xp.zeros(cache.shape, dtype=cache.dtype)
    xp.add.at(dx, cache.index, dy)
    return (dx,)


ops.define("getitem", getitem_forward, getitem_backward)


# ---------------------------------------------------------------- the Tensor class


def _unwrap_index(index):
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


class Tensor:
    """An array on a device, with an optional gradient and the operation that made it.

    Build one with :func:`tinybn.autograd.tensor`. ``data`` is the NumPy or CuPy array; ``grad``
    is filled by :meth:`backward` for leaf tensors that ``requires_grad``.
    """

    __array_priority__ = 1000  # make ``ndarray + Tensor`` call Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False):
        self._data = data
        self._version = [0]  # shared with detach(); see the data setter
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node: Node | None = None

    @property
    def data(self):
        """The array (NumPy or CuPy)."""
        return self._data

    @data.setter
    def data(self, value):
        # `t.data += 1` (and an optimizer's `p.data -= lr * g`) changes the array in place, then assigns it back:
        # count that, so that a backward rule which cached the old array refuses to run (Node.check). A view
        # made by an op shares its input's counter. Writes through another name (`t.data[0] = 1`,
        # `out=t.data`) are not seen, as in PyTorch's .data.
        if value is self._data:
            self._version[0] += 1
        self._data = value

    # -- description
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        device = "" if self.device == "cpu" else f", device='{self.device}'"
        return f"tensor({backend.to_numpy(self.data)!r}{device}{grad})".replace("\n", "\n" + " " * 7)

    # -- conversion
    def numpy(self):
        """A host NumPy copy of the data (a view on the CPU), detached from the graph."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.data.reshape(-1)[0].item()

    def detach(self):
        """The same data (shared, with the same version counter), cut from the graph."""
        detached = Tensor(self.data)
        detached._version = self._version
        return detached

    def to(self, device):
        """A copy on ``device`` ("cpu", "gpu", "cuda:N"); the tensor itself if it is already there."""
        if backend.resolve_device(device)[0] == self.device:
            return self
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype):
        """A detached copy with another dtype."""
        return Tensor(self.data.astype(dtype), requires_grad=self.requires_grad)

    # -- autograd
    def backward(self, grad=None, retain_graph: bool = False):
        """Send gradients from this tensor back to every leaf that requires them.

        ``grad`` is the upstream gradient dL/dself; it may be left out only for a
        one-element tensor (then it is 1). Gradients accumulate into ``.grad`` (call
        ``zero_grad`` between steps); each leaf's ``.grad`` is an array of its own, in the
        leaf's dtype. The graph is freed as the pass goes, so that its cached arrays go; a second
        backward through it raises unless the first passed ``retain_graph=True``. When the call
        raises, no ``.grad`` has changed (the forward must be run again).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad: "
                               "no input of the computation had requires_grad=True (or it ran under no_grad()).")
        grad = self._upstream(grad)
        if self._node is None:  # a leaf: its own gradient
            _accumulate(self, grad)
            return
        order = _topological_order(self._node)
        for node in order:
            node.check()
        pending = {id(self._node): grad}      # node (or leaf) -> the sum of the gradients sent to it so far
        leaves = {}
        for node in order:
            dy = pending.pop(id(node), None)
            if dy is not None:
                if dy.dtype != node.dtype:  # a gradient has its tensor's dtype, as in PyTorch (float64 loss, float32 net)
                    dy = dy.astype(node.dtype)
                input_grads = node.backward(dy, node.cache)
                if not isinstance(input_grads, (tuple, list)):
                    raise RuntimeError(f"the backward rule of {node.name} returned a {type(input_grads).__name__}; "
                                       f"it must return a tuple with one gradient per input, None where none is "
                                       f"needed, e.g. (dx,) for one input")
                if len(input_grads) != len(node.inputs):
                    raise RuntimeError(f"the backward rule of {node.name} returned {len(input_grads)} gradient(s) for "
                                       f"{len(node.inputs)} input(s): it must return one per input, None where none "
                                       f"is needed")
                for parent, shape, d_parent in zip(node.inputs, node.shapes, input_grads):
                    if parent is None or d_parent is None:
                        continue
                    if tuple(d_parent.shape) != shape:
                        raise RuntimeError(f"the backward rule of {node.name} returned a gradient of shape "
                                           f"{tuple(d_parent.shape)} for an input of shape {shape} (a bug in the rule)")
                    if isinstance(parent, Tensor):
                        leaves[id(parent)] = parent
                    if id(parent) in pending:  # fan-out: add every path's contribution
                        pending[id(parent)] = pending[id(parent)] + d_parent
                    else:
                        pending[id(parent)] = d_parent
            if not retain_graph:
                node.free()  # free the graph as we go: each cache goes once its rule has run
        for key, leaf in leaves.items():  # only once every rule has run: a rule that raises leaves .grad alone
            _accumulate(leaf, pending[key])

    def _upstream(self, grad):
        """backward's ``grad`` as an array of this tensor's shape, on its device (1 for a one-element tensor)."""
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor, this one has shape "
                                   f"{self.shape}; pass grad= with the same shape.")
            return xp.ones_like(self.data)
        grad = _as_data(grad)
        if not hasattr(grad, "shape"):      # a number or a nested list, as the output's dtype
            try:
                grad = xp.asarray(grad, dtype=self.dtype)
            except (TypeError, ValueError) as error:
                raise TypeError(f"backward(grad): a gradient must be a tensor, an array or numbers, got "
                                f"{type(grad).__name__} ({error})") from None
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"backward(grad) got a gradient of shape {tuple(grad.shape)} for a tensor of shape {self.shape}")
        return backend.to_device(grad, self.device)     # a NumPy gradient for a GPU tensor moves to it

    def zero_grad(self):
        self.grad = None

    # -- arithmetic
    def __add__(self, other): return apply("add", self, _as_data_or_tensor(other))
    def __radd__(self, other): return apply("add", _as_data_or_tensor(other), self)
    def __sub__(self, other): return apply("sub", self, _as_data_or_tensor(other))
    def __rsub__(self, other): return apply("sub", _as_data_or_tensor(other), self)
    def __mul__(self, other): return apply("mul", self, _as_data_or_tensor(other))
    def __rmul__(self, other): return apply("mul", _as_data_or_tensor(other), self)
    def __truediv__(self, other): return apply("div", self, _as_data_or_tensor(other))
    def __rtruediv__(self, other): return apply("div", _as_data_or_tensor(other), self)
    def __pow__(self, other): return apply("pow", self, _as_data_or_tensor(other))
    def __rpow__(self, other): return apply("pow", _as_data_or_tensor(other), self)
    def __neg__(self): return apply("neg", self)
    def __matmul__(self, other): return apply("matmul", self, _as_data_or_tensor(other))
    def __rmatmul__(self, other): return apply("matmul", _as_data_or_tensor(other), self)

    def __getitem__(self, index):
        return apply("getitem", self, index=_unwrap_index(index))

    def sum(self, axis=None, keepdims=False):
        return apply("sum", self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return apply("mean", self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return apply("reshape", self, shape=tuple(shape))

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return apply("transpose", self, axes=axes or None)

    @property
    def T(self):
        return self.transpose()

    def exp(self):
        return apply("exp", self)

    def log(self):
        return apply("log", self)

    # comparisons give boolean tensors, elementwise and without a graph, as in NumPy and PyTorch
    def __eq__(self, other): return Tensor(self.data == _as_data(other))
    def __ne__(self, other): return Tensor(self.data != _as_data(other))
    def __lt__(self, other): return Tensor(self.data < _as_data(other))
    def __le__(self, other): return Tensor(self.data <= _as_data(other))
    def __gt__(self, other): return Tensor(self.data > _as_data(other))
    def __ge__(self, other): return Tensor(self.data >= _as_data(other))
    __hash__ = object.__hash__  # by identity, so tensors can be dict keys and set members

    def __bool__(self):
        # `if t:` and `t in [a, b]` (which asks bool(t == a)) mean something only for one element
        if self.size != 1:
            raise RuntimeError(f"the truth value of a tensor with {self.size} elements is ambiguous; "
                               f"use .any() or .all()")
        return bool(self.data.reshape(-1)[0])

    def any(self, axis=None):
        return Tensor(self.data.any(axis=axis))

    def all(self, axis=None):
        return Tensor(self.data.all(axis=axis))

    def argmax(self, axis=None):
        return Tensor(self.data.argmax(axis=axis))


def _accumulate(leaf: Tensor, grad) -> None:
    """Add ``grad`` to ``leaf.grad``. The first gradient is copied, in the leaf's dtype (as PyTorch casts it):
    backward rules may hand the same array to several inputs (``a + b``), return a read-only broadcast view
    (``x.sum()``) or the caller's own upstream array, and a leaf's ``.grad`` must be its own, writable."""
    xp = backend.get_array_module(grad)
    if leaf.grad is None:
        leaf.grad = xp.array(grad, dtype=leaf.dtype, copy=True)    # an array even where ops gave a NumPy scalar
    else:
        leaf.grad = xp.asarray(leaf.grad + grad, dtype=leaf.dtype)


def _as_data_or_tensor(value):
    """Other operands of arithmetic: tensors stay tensors, numbers stay numbers. A NumPy scalar becomes a Python
    number, so that it takes the tensor's dtype as PyTorch's scalars do (float32 times np.float64(2.0) stays
    float32; NumPy would make it float64)."""
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, (Tensor, int, float)) or hasattr(value, "shape"):
        return value
    raise TypeError(f"unsupported operand of type {type(value).__name__} for a Tensor operation")


_FLOAT_DEFAULT = numpy.float32


def tensor(obj, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Make a :class:`Tensor` from a list, scalar, NumPy/CuPy array or tensor.

    Python floats become float32 (as in PyTorch), Python ints int64, arrays keep their dtype
    unless ``dtype`` is given. ``device`` defaults to :func:`tinybn.get_default_device`.
    """
    if isinstance(obj, Tensor):
        obj = obj.data
    name, xp = backend.resolve_device(device)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        data = backend.to_device(obj, name)
        if data is obj:  # like torch.tensor, never share memory with the caller's array
            data = data.copy()
    else:
        host = numpy.asarray(obj)
        if host.dtype == numpy.float64 and dtype is None:
            host = host.astype(_FLOAT_DEFAULT)
        data = backend.to_device(host, name)
    if dtype is not None and data.dtype != numpy.dtype(dtype):
        data = data.astype(dtype)
    if requires_grad and data.dtype.kind != "f":
        raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
    return Tensor(data, requires_grad=requires_grad)
