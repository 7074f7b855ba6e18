"""What test_mpi.py runs on each rank of ``mpiexec -n P``, and in the test's own process as the reference.

``python tests/mpi_worker.py MODE STEPS OUT``: LeNet-BN in float64, trained for STEPS steps of a global batch of
32 real Fashion-MNIST images with the trainer's own loop (tinybn.app.loop.fit, given this rank's shard through
tinybn.app.parallel.data_parallel);
MODE ``sync`` converts the BN layers to SyncBatchNorm, ``local`` keeps per-shard batch norm. Each rank saves the
loss, every parameter, gradient and buffer in OUT/rank<r>.npz.
"""
from __future__ import annotations

import sys

import numpy

import tinybn
from tinybn import backend, nn
from tinybn.app.data import DataLoader, load_fashion_mnist
from tinybn.app.models import build_model
from tinybn.app.loop import fit
from tinybn.app.parallel import data_parallel
from tinybn.autograd import Tensor
from tinybn.optim import SGD

GLOBAL_BATCH = 32


class Float64Batches:
    """A loader's batches with float64 images, for exactness to 1e-12."""

    def __init__(self, loader):
        self.loader, self.device = loader, loader.device

    def batch_sizes(self):
        return self.loader.batch_sizes()

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield Tensor(images.data.astype(numpy.float64)), labels


def run(comm, mode: str, steps: int) -> dict:
    """Train ``steps`` steps; ``comm`` None is the single process on the whole batch."""
    train_x, train_y, _, _ = load_fashion_mnist()
    count = GLOBAL_BATCH * steps
    tinybn.manual_seed(0)
    model = build_model("lenet-bn").to(dtype=numpy.float64)
    if comm is not None and mode == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, comm)
    optimizer = SGD(model.parameters(), lr=0.5)
    shard = (0, 1) if comm is None else (comm.rank, comm.world_size)
    loader = DataLoader(train_x[:count], train_y[:count], GLOBAL_BATCH, shuffle=True, seed=1, shard=shard)
    batches = Float64Batches(loader)
    given = {"batches": batches, "optimizer": optimizer} if comm is None else data_parallel(batches, optimizer, comm)
    row = fit(model, epochs=1, **given)[-1]
    result = {"loss": numpy.array(row["train_loss"]), "acc": numpy.array(row["train_acc"])}
    for name, tensor in model.named_parameters():
        result[name] = backend.to_numpy(tensor.data)
        result["grad/" + name] = backend.to_numpy(tensor.grad)
    for name, tensor in model.named_buffers():
        result[name] = backend.to_numpy(tensor.data)
    return result


if __name__ == "__main__":
    from tinybn import distributed

    mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    comm = distributed.init()
    numpy.savez(f"{out}/rank{comm.rank}.npz", **run(comm, mode, steps))
