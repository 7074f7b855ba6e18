"""Module, Parameter and Sequential: the bookkeeping that layers share."""
from __future__ import annotations

from collections import OrderedDict

import numpy

from .. import backend
from ..autograd import Tensor


class Parameter(Tensor):
    """A tensor that a module trains: it always requires a gradient."""

    def __init__(self, data):
        super().__init__(data, requires_grad=True)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class _Uninitialized:
    """A parameter or buffer of a layer that learns its size from its first input (``BatchNorm2d()``).

    It is a real object from the start, so an optimizer built before the first call holds the
    parameter that will be trained (as with PyTorch's lazy modules): :meth:`materialize` gives it its
    array in place and turns it into a plain :class:`Parameter` (or :class:`Tensor`), keeping
    ``requires_grad``. Until then it has no array, and asking for one says why.
    """

    becomes = None  # the class it turns into

    def __init__(self):
        super().__init__(None)

    @property
    def data(self):
        raise RuntimeError("this parameter or buffer has no size yet: its layer infers it from the first input. "
                           "Run one batch through the model (or give the layer its num_features) first.")

    def materialize(self, data) -> None:
        self._data = data
        self.__class__ = self.becomes

    def __repr__(self):
        return f"{type(self).__name__}(<size inferred from the first input>)"


class UninitializedParameter(_Uninitialized, Parameter):
    becomes = Parameter


class UninitializedBuffer(_Uninitialized, Tensor):
    becomes = Tensor


def is_materialized(tensor) -> bool:
    """False for the parameters and buffers of a lazy layer that has not seen an input yet."""
    return not isinstance(tensor, _Uninitialized)


class Module:
    """Base class of every layer and model.

    Assigning a :class:`Parameter` or a :class:`Module` to an attribute registers it; buffers
    (state that is saved but not trained, such as batch norm's moving averages) are registered
    with :meth:`register_buffer`. ``training`` is True after construction and after
    :meth:`train`, False after :meth:`eval`.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting attributes")
        # A registered name keeps its kind, as in PyTorch: a plain tensor assigned to a parameter's name would
        # otherwise drop out of parameters() and state_dict() without a word, and never be trained again.
        for registry, kind, what in ((self._parameters, Parameter, "a Parameter"), (self._modules, Module, "a Module"),
                                     (self._buffers, Tensor, "a Tensor")):
            if name in registry and value is not None and not isinstance(value, kind):
                hint = " (nn.Parameter(array) makes one)" if kind is Parameter else ""
                raise TypeError(f"cannot assign an object of type {type(value).__name__} to {type(self).__name__}.{name}, "
                                f"which is registered as {what}: assign {what} or None{hint}")
        if isinstance(value, Parameter) or (value is None and name in self._parameters):
            home = self._parameters
        elif isinstance(value, Module) or (value is None and name in self._modules):
            home = self._modules
        elif name in self.__dict__.get("_buffer_names", ()):
            home = self._buffers
        else:
            home = None                             # a plain attribute
        for registry in (self._parameters, self._buffers, self._modules):
            if registry is not home:
                registry.pop(name, None)
        if home is not None:
            home[name] = value                      # a name already there keeps its place in the order
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: Tensor | None):
        """Register ``value`` as state that ``state_dict`` saves and ``to`` moves, but no optimizer trains."""
        self.__dict__.setdefault("_buffer_names", set()).add(name)
        setattr(self, name, value)

    def register_parameter(self, name: str, value: Parameter | None):
        """Register a parameter; None reserves the name (a layer that infers its size later)."""
        setattr(self, name, value)
        if value is None:
            self._parameters[name] = None

    # -- traversal
    # A module or tensor reachable by several paths (a layer used twice, a weight shared by two layers) is
    # listed once, under the first name it is met by, as PyTorch does: an optimizer given a parameter
    # twice would step it twice.
    def named_modules(self, prefix: str = "", _seen=None):
        """``(dotted_name, module)`` for this module and every submodule, each once, depth first."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        return [module for _, module in self.named_modules()]

    def children(self):
        return list({id(child): child for child in self._modules.values()}.values())

    def _named_entries(self, registries=("_parameters",)):
        """``(dotted_name, owner, name_in_owner, tensor)`` for each tensor of the given registries, each once."""
        seen = set()
        for prefix, module in self.named_modules():
            for registry in registries:
                for name, tensor in getattr(module, registry).items():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        yield (f"{prefix}.{name}" if prefix else name), module, name, tensor

    def _named_tensors(self, registry: str):
        for name, _, _, tensor in self._named_entries((registry,)):
            yield name, tensor

    def named_parameters(self):
        """``(dotted_name, parameter)`` for every parameter, each once, in registration order."""
        return self._named_tensors("_parameters")

    def parameters(self):
        return [param for _, param in self.named_parameters()]

    def named_buffers(self):
        """``(dotted_name, buffer)`` for every buffer, each once, in registration order."""
        return self._named_tensors("_buffers")

    def buffers(self):
        return [buffer for _, buffer in self.named_buffers()]

    # -- modes and devices
    def train(self, mode: bool = True):
        """Training mode: batch norm uses batch statistics and dropout drops."""
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        """Prediction mode: batch norm uses its moving averages and dropout is the identity."""
        return self.train(False)

    def to(self, device=None, dtype=None):
        """Move every parameter and buffer to ``device`` and/or cast floating ones to ``dtype``, in place.

        Returns the module, so ``net = LeNet().to("gpu")`` reads naturally.
        """
        name = backend.resolve_device(device)[0] if device is not None else None
        for module in self.modules():
            for registry in (module._parameters, module._buffers):
                for tensor in registry.values():
                    if tensor is None or not is_materialized(tensor):  # a lazy layer takes _device/_dtype below
                        continue
                    if name is not None and tensor.device != name:  # the gradient goes along, as in PyTorch
                        tensor.data = backend.to_device(tensor.data, name)
                        tensor.grad = None if tensor.grad is None else backend.to_device(tensor.grad, name)
                    if dtype is not None and tensor.dtype.kind == "f" and tensor.dtype != numpy.dtype(dtype):
                        tensor.data = tensor.data.astype(dtype)
                        tensor.grad = None if tensor.grad is None else tensor.grad.astype(dtype)
            if name is not None:
                object.__setattr__(module, "_device", name)
            if dtype is not None:
                object.__setattr__(module, "_dtype", numpy.dtype(dtype))
        return self

    @property
    def device(self):
        """The device of the first parameter or buffer (or the one set by ``to``)."""
        for tensor in (*self.parameters(), *self.buffers()):
            if is_materialized(tensor):
                return tensor.device
        return self.__dict__.get("_device", backend.get_default_device())

    def zero_grad(self):
        for param in self.parameters():
            param.grad = None

    # -- saving and loading
    def state_dict(self) -> "OrderedDict[str, numpy.ndarray]":
        """Host (NumPy) copies of every parameter and buffer, by dotted name (a shared one once)."""
        state = OrderedDict()
        for name, _, _, tensor in self._named_entries(("_parameters", "_buffers")):
            if not is_materialized(tensor):
                raise RuntimeError(f"state_dict: {name} has no size yet (its layer infers it from the first input); "
                                   f"run one batch through the model first")
            state[name] = numpy.array(backend.to_numpy(tensor.data), copy=True)
        return state

    def load_state_dict(self, state) -> None:
        """Copy ``state`` (arrays or tensors by dotted name) into this module, on its current device.

        Every name must match and every shape must agree (a layer that infers its size takes it from
        ``state``); otherwise nothing at all is changed and a ``KeyError``/``ValueError`` lists every
        missing, unexpected and mis-shaped entry.
        """
        entries = []  # (dotted name, tensor, the shape it must have)
        for name, owner, own_name, tensor in self._named_entries(("_parameters", "_buffers")):
            shape = tuple(tensor.shape) if is_materialized(tensor) else owner._shape_from_state(own_name, state, name)
            entries.append((name, tensor, shape))
        names = {name for name, _, _ in entries}
        missing = [name for name, _, _ in entries if name not in state]
        unexpected = [name for name in state if name not in names]
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing entries {missing}, unexpected entries {unexpected}")
        values = {name: _host_numbers(name, state[name]) for name, _, _ in entries}
        wrong = [f"{name}: expected {'a size that matches the other entries' if shape is None else shape}, "
                 f"got {values[name].shape}" for name, _, shape in entries if values[name].shape != shape]
        if wrong:
            raise ValueError("load_state_dict: shape mismatch for " + "; ".join(wrong))
        # everything checked: only now may a lazy layer take its size, and a value be copied
        for prefix, module in self.named_modules():
            module._materialize_for_loading(state, prefix)
        for name, tensor, _ in entries:
            tensor.data = backend.to_device(values[name].astype(tensor.dtype, copy=True), tensor.device)

    def _shape_from_state(self, name: str, state, dotted_name: str):
        """The shape that ``state`` gives the not yet materialized tensor ``name`` (None if it gives none).
        Only layers that infer their size have such tensors, and override this."""
        return None

    def _materialize_for_loading(self, state, prefix: str) -> None:
        """Give a lazy layer the size ``state`` holds for it (after :meth:`load_state_dict` checked it)."""

    # -- calling
    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        for hook in list(self.__dict__.get("_forward_hooks", {}).values()):
            replaced = hook(self, args, out)
            if replaced is not None:
                out = replaced
        return out

    def register_forward_hook(self, hook) -> "HookHandle":
        """Call ``hook(module, inputs, output)`` after every forward of this module (as in PyTorch); a hook that
        returns something other than None replaces the output. Returns a handle whose ``remove()`` detaches it."""
        hooks = self.__dict__.setdefault("_forward_hooks", {})
        handle = HookHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._modules.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


def _data(value):
    return value.data if isinstance(value, Tensor) else value


def _host_numbers(name: str, value) -> numpy.ndarray:
    """``value`` (an array, a tinybn tensor, or anything NumPy can read) as a host array of numbers."""
    try:
        array = numpy.asarray(backend.to_numpy(_data(value)))
    except Exception as error:
        raise ValueError(f"load_state_dict: {name} is not an array ({type(error).__name__}: {error})") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"load_state_dict: {name} holds {array.dtype} values, not numbers")
    return array


class HookHandle:
    """What :meth:`Module.register_forward_hook` returns: ``remove()`` detaches the hook (a second call does nothing)."""
    _next = 0

    def __init__(self, hooks: dict):
        HookHandle._next += 1
        self.id, self._hooks = HookHandle._next, hooks

    def remove(self) -> None:
        self._hooks.pop(self.id, None)


class Sequential(Module):
    """Layers applied one after the other; ``net[i]`` is the i-th layer, as in ``net[1].gamma``."""

    def __init__(self, *layers: Module):
        super().__init__()
        for index, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, argument {index} is a {type(layer).__name__}")
            setattr(self, str(index), layer)

    def __getitem__(self, index):
        layers = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(*layers[index])
        return layers[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x
