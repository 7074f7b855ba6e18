"""What data parallelism costs per step: run under MPI, e.g. ``.venv/bin/mpiexec -n 2 .venv/bin/python examples/distributed_cost.py``.

Times, on the real Fashion-MNIST and LeNet-BN with SyncBatchNorm, the median over ``--steps`` of:

* a whole training step on each rank's shard of a global batch of ``--batch-size`` (forward with the BN layers'
  all_gathers, backward with their all_reduces, the gradient all_reduce, the SGD update);
* the gradient all_reduce alone (one flat buffer of every parameter's gradient);
* the BN layers' collectives alone: per layer, one all_gather of 2C + 2 float64 numbers and one all_reduce of 2C.

Rank 0 prints one line per measure, and the bytes each rank sends per step. With one rank the collectives are
skipped by the layer (it is plain batch norm) and timed here only for the record.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy

import tinybn
from tinybn import distributed, nn
from tinybn.app.data import DataLoader, load_fashion_mnist
from tinybn.app.models import build_model
from tinybn.optim import SGD


tinybn.kernels.use("fastest")    # compiled kernels where installed; TINYBN_KERNELS=reference runs tinybn/functional


def median_ms(samples):
    return 1000 * statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    comm = distributed.init(set_blas_threads=True)    # tinybn's and OpenBLAS's threads: cores // ranks here
    if comm.rank == 0:
        print(tinybn.kernels.describe(), flush=True)
    train_x, train_y, _, _ = load_fashion_mnist()
    tinybn.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("lenet-bn"), comm)
    optimizer = SGD(model.parameters(), lr=1.0)
    loader = DataLoader(train_x[:args.batch_size * args.steps], train_y[:args.batch_size * args.steps],
                        args.batch_size, shuffle=True, shard=(comm.rank, comm.world_size))
    step_times = []
    for images, labels in loader:
        comm.barrier()
        start = time.perf_counter()
        loss = distributed.shard_loss(model(images), labels, args.batch_size)
        optimizer.zero_grad()
        loss.backward()
        distributed.all_reduce_gradients(optimizer.params, comm, extra=(loss.data, 0))
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    gradient = numpy.zeros(sum(p.data.size for p in optimizer.params) + 2, numpy.float32)
    channels = [m.num_features for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    reduce_times, bn_times = [], []
    for _ in range(args.steps):
        comm.barrier()
        start = time.perf_counter()
        comm.all_reduce(gradient)
        reduce_times.append(time.perf_counter() - start)
        comm.barrier()
        start = time.perf_counter()
        for c in channels:
            comm.all_gather(numpy.zeros(2 * c + 2))
            comm.all_reduce(numpy.zeros(2 * c))
        bn_times.append(time.perf_counter() - start)
    if comm.rank == 0:
        step = median_ms(step_times[5:])          # the first steps warm the allocator and caches
        print(f"{comm.world_size} rank(s), global batch {args.batch_size}, {len(step_times) - 5} steps timed")
        print(f"training step:            {step:7.2f} ms median ({args.batch_size / step * 1000:,.0f} examples/sec)")
        print(f"gradient all_reduce:      {median_ms(reduce_times):7.3f} ms median, {gradient.nbytes:,} bytes")
        print(f"BN collectives (4 layers): {median_ms(bn_times):7.3f} ms median, "
              f"{sum(8 * (2 * c + 2) + 8 * 2 * c for c in channels):,} bytes, {2 * len(channels)} collectives")


if __name__ == "__main__":
    main()
