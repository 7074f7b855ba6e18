"""What a normalization layer is, said once: the questions every tool asks of it, and each layer's answers.

tinybn has batch norm (the chapter's layer, the concise ones, synchronized batch norm), batch renormalization,
layer, group and instance norm, and decorrelated batch norm. Several tools act on "the normalization layers of a
model": precise statistics (:func:`tinybn.nn.recompute_batch_norm_statistics`), folding
(:func:`tinybn.nn.fold_batch_norm`), PyTorch state dicts (:mod:`tinybn.interop`), conversion to synchronized
layers (:func:`convert_sync`), data-parallel training and checkpoints (:mod:`tinybn.app.train`), and the
BN-statistics recorder (:mod:`tinybn.app.bnstats`). None of them keeps a list of layer types. Each asks the layer,
through :class:`Normalization`, which every normalization layer subclasses:

==============================  ==========================================================================
what the layer says             attribute or method
==============================  ==========================================================================
its running statistics          ``running_statistics``: the buffers prediction mode normalizes with
whether the batch matters       ``batch_dependent``: training normalizes with the whole batch's statistics
how they pool over batches      ``pools_statistics``, :meth:`Normalization.batch_moments`, :meth:`Normalization.set_statistics`
how it synchronizes             :meth:`Normalization.synchronized` (a layer over all ranks, or a refusal); ``comm``
how it folds                    :meth:`Normalization.prediction_affine`: prediction mode as y = A·x + c per channel
how it maps to PyTorch          ``torch_names``, :meth:`Normalization.to_torch`, :meth:`Normalization.from_torch`, :meth:`Normalization.torch_settings`
what the recorder watches       :meth:`Normalization.watch`, ``affine_parameters``
==============================  ==========================================================================

A new normalization is a new subclass that answers these; docs/derivations.md, "How a new normalization plugs
in", walks through one. The defaults describe a layer whose statistics come from each input (layer and group
norm): nothing to pool, to synchronize or to fold.
"""
from __future__ import annotations

import numpy

from .. import backend, communicator
from ..autograd import Tensor
from ..functional.moments import Moments, moments
from .module import Module, is_materialized


class Normalization(Module):
    """The base class of every normalization layer; see the module docstring for what each member means."""

    running_statistics: tuple[str, ...] = ()   # buffers that prediction mode normalizes with (set by precise stats)
    batch_dependent = False                    # training mode normalizes with statistics of the whole batch
    pools_statistics = False                   # precise statistics: the batch's moments pool into the buffers
    comm = None                                # a synchronized layer's communicator (None: the default one)
    synchronizes = False                       # normalizes over the ranks of a communicator (see communicator())
    torch_names: dict | None = None            # tinybn name -> PyTorch's; None: no PyTorch counterpart
    affine_parameters = ("weight", "bias")     # the learned scale and shift (either may be None)

    # -- precise statistics
    def batch_moments(self, x) -> Moments:
        """The moments (:mod:`tinybn.functional.moments`) of one batch of this layer's input ``x`` (an array), of
        the kind its running statistics hold. Only for layers with ``pools_statistics``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics to pool")

    def set_statistics(self, pooled: Moments) -> None:
        """Set the running statistics from the moments of many batches together (precise statistics)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics to pool")

    def no_moments(self) -> Moments:
        """The moments of no value, in this layer's shapes: what a rank that saw no batch adds when ranks pool."""
        first = getattr(self, self.running_statistics[0])
        return self.batch_moments(backend.get_array_module(first.data).zeros((0, first.size)))

    def reset_running_stats(self) -> None:
        """Put the running statistics back to their initial values (PyTorch's name)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no running statistics")

    # -- data parallelism
    def communicator(self):
        """The communicator this layer normalizes over: for a synchronized layer its ``comm``, else the default one
        (:func:`tinybn.communicator.default`, which :func:`tinybn.distributed.init` sets); for any other, ``comm``
        (None: this process alone)."""
        return (self.comm or communicator.default()) if self.synchronizes else self.comm

    def synchronized(self, comm) -> "Normalization":
        """This layer over all the ranks of ``comm``: the same function of the global batch, sharing this layer's
        parameters and buffers (the same tensor objects). A layer whose statistics come from each input has
        nothing to agree on and is itself."""
        if not self.batch_dependent:
            return self
        raise ValueError(f"{self!r} normalizes with statistics of the whole batch, and has no synchronized form: "
                         f"with several ranks each would normalize its own shard; train it in one process")

    # -- folding
    def prediction_affine(self):
        """``(A, c)``, float64 host arrays, such that prediction mode computes y = A·x + c per channel: A is (C,)
        (a scale per channel) or (C, C) (a matrix over the channels); c is (C,). A layer whose statistics come
        from each input has none, and says so."""
        raise ValueError(f"{self!r} normalizes each input with that input's own statistics, so prediction mode is "
                         f"not a fixed affine map and there is nothing to fold")

    # -- PyTorch state dicts
    def to_torch(self, name: str, value):
        """``value`` of tinybn's entry ``name``, in the shape PyTorch's counterpart keeps it."""
        return value

    def from_torch(self, name: str, value):
        """A value from PyTorch for tinybn's entry ``name``, in tinybn's shape; None when it does not fit."""
        return value

    def torch_settings(self, torch_layer) -> dict:
        """The settings to take from a PyTorch layer of the same kind (eps; momentum where both keep one)."""
        return {"eps": float(torch_layer.eps)} if hasattr(torch_layer, "eps") else {}

    # -- the recorder
    def watch(self, x, channels: int) -> dict:
        """For the recorder: the batch mean and variance of ``channels`` channels of the input ``x`` (an array,
        channels on axis 1), in float64, and each running statistic that holds one value per channel."""
        total = x.shape[1]
        x = backend.to_numpy(x[:, :channels]).astype(numpy.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        seen = {"batch_mean": x.mean(axis=axes).tolist(), "batch_var": x.var(axis=axes).tolist()}
        for name in self.running_statistics:
            tensor = getattr(self, name)
            if is_materialized(tensor) and tensor.size == total:        # one value per channel
                seen[name] = backend.to_numpy(tensor.data).reshape(-1)[:channels].astype(numpy.float64).tolist()
        return seen

    def scale_and_shift(self):
        """The learned scale and shift tensors (γ and β, or weight and bias), either None where there is none."""
        return tuple(getattr(self, name, None) for name in self.affine_parameters)


def normalization_layers(model) -> list[tuple[str, Normalization]]:
    """``(dotted name, layer)`` for every normalization layer of ``model``, each once, in order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Normalization)]


def running_statistics(model) -> dict:
    """Every normalization layer's running statistics, by state-dict name: what precise statistics replace, and
    what a checkpoint keeps next to the moving averages."""
    found = {}
    for prefix, layer in normalization_layers(model):
        for name in layer.running_statistics:
            tensor = getattr(layer, name)
            if is_materialized(tensor):
                found[f"{prefix}.{name}" if prefix else name] = tensor
    return found


def per_channel_moments(x, axes) -> Moments:
    """Batch norm's moments of ``x`` (an array or tensor): per channel (axis 1), over ``axes``."""
    return moments(x.data if isinstance(x, Tensor) else x, axes)


def twin(layer: Module, cls, **attributes) -> Module:
    """A new ``cls`` layer that shares ``layer``'s parameters, buffers and forward hooks (the same objects, so
    state dicts, optimizers and recorders built before or after stay valid) and its other attributes, with
    ``attributes`` changed: how a layer makes its synchronized form."""
    new = cls.__new__(cls)
    Module.__init__(new)
    for name, value in vars(layer).items():
        if name in ("_parameters", "_buffers", "_modules"):
            continue
        object.__setattr__(new, name, value)
    for registry in ("_parameters", "_buffers"):
        getattr(new, registry).update(getattr(layer, registry))
    for name, value in attributes.items():
        object.__setattr__(new, name, value)
    return new


def convert_sync(model: Module, comm=None) -> Module:
    """``model`` with every normalization layer replaced by its synchronized form over the ranks of ``comm`` (by
    default the one :func:`tinybn.distributed.init` made)
    (:meth:`Normalization.synchronized`; a layer whose statistics come from each input stays as it is). A layer
    used in two places stays one layer. Refuses, naming it, a layer that normalizes over the batch and has no
    synchronized form, before changing anything. Returns the new root when ``model`` is itself such a layer."""
    comm = comm if comm is not None else communicator.default()   # now: refused in an MPI job before init()
    done = {}

    def converted(layer):
        if id(layer) not in done:
            done[id(layer)] = layer.synchronized(comm)
        return done[id(layer)]

    if isinstance(model, Normalization):
        return converted(model)
    places = [(f"{prefix}.{name}" if prefix else name, parent, name, child) for prefix, parent in model.named_modules()
              for name, child in parent._modules.items() if isinstance(child, Normalization)]
    for path, _, _, child in places:            # every refusal before any change
        try:
            converted(child)
        except ValueError as error:
            raise ValueError(f"convert_sync: {path}: {error}") from None
    for _, parent, name, child in places:
        setattr(parent, name, converted(child))
    return model
