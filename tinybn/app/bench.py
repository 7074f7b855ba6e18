"""``python -m tinybn bench``: steady-state throughput of a training step and of prediction.

For the chosen model, batch size, device and dtype it measures, after a warm-up,

* the training step (forward, loss, backward, SGD update), in examples/sec;
* prediction (eval mode, no graph), in examples/sec;
* peak memory of training: on the CPU, how far the process's resident set grows above its size
  before the first step (model and data already loaded) while it runs a few steps; on the GPU, the
  high-water mark of the framework's memory pool.

Every measurement runs in a fresh process of its own (``python -m tinybn.app.bench --worker``), so that
no framework's threads, allocator state or BLAS settings can slow another: measured in one process,
PyTorch ran at 13,900 examples/sec beside tinybn and at 16,000-19,500 alone. ``--compare torch``
alternates the two frameworks, tinybn then PyTorch, ``--repeats`` times, with the same threads and the
same batch, and reports each framework's median and the median of the per-pair ratios tinybn / PyTorch
with their minimum and maximum: the spread says how much one number can be trusted.
Each tinybn process runs the kernel family given by ``--kernels`` (the fastest installed, as the command line
does); both frameworks' processes load the real Fashion-MNIST first when it is installed, as a training run does.
``--profile`` prints forward and backward time per op and implementation, measured in this process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import numpy

from .. import backend, kernels, ops
from .. import functional as F
from ..autograd import Tensor, no_grad
from ..optim import SGD
from .arguments import positive_int
from .models import MODELS, build_model

def add_arguments(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="lenet-bn", help="the model to time")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per step")
    parser.add_argument("--device", default=None, help="cpu, gpu, cuda:N (default: $TINYBN_DEVICE or cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the dtype of the weights and images")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="fresh processes per framework (pairs with --compare); the median is reported")
    parser.add_argument("--steps", type=positive_int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=positive_int, default=3,
                        help="timed blocks per process; a process reports its fastest block")
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first, in each process")
    parser.add_argument("--compare", choices=("torch", "fold"), default=None,
                        help="also run PyTorch, or tinybn's prediction with batch norm folded into the layers "
                             "before it (nn.fold_batch_norm), alternating fresh processes with tinybn's")
    parser.add_argument("--torch-variant", choices=("builtin", "scratch"), default="builtin",
                        help="PyTorch side: nn.BatchNorm2d/1d, or the chapter's from-scratch BN")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for tinybn, BLAS and PyTorch (default: $TINYBN_NUM_THREADS or every core)")
    parser.add_argument("--profile", action="store_true", help="per-operation forward/backward times")
    parser.add_argument("--kernels", choices=("fastest", "numba", "reference"), default="fastest",
                        help="tinybn's kernel family: the fastest installed here, numba's, or the readable reference")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def sample_batch(batch_size: int):
    """A real Fashion-MNIST batch when the data is installed, else uniform noise of the same shape."""
    try:
        from .data import load_fashion_mnist
        images, labels, _, _ = load_fashion_mnist()
        index = numpy.arange(batch_size) % len(labels)
        return images[index].astype(numpy.float32) / 255, labels[index], "Fashion-MNIST"
    except Exception:
        rng = numpy.random.default_rng(0)
        return rng.random((batch_size, 1, 28, 28), numpy.float32), rng.integers(0, 10, batch_size), "random"


class TinybnRunner:
    name = "tinybn"

    def __init__(self, model_name, images, labels, device, dtype):
        self.device = backend.resolve_device(device)[0]
        self.model = build_model(model_name, device=self.device).to(dtype=dtype)
        self.optimizer = SGD(self.model.parameters(), lr=0.1)
        self.x = Tensor(backend.to_device(images.astype(dtype), self.device))
        self.y = Tensor(backend.to_device(labels.astype(numpy.int64), self.device))

    def sync(self):
        if self.device.startswith("cuda"):
            backend.resolve_device(self.device)[1].cuda.Device().synchronize()

    def train_step(self):
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def predict(self):
        self.model.eval()
        with no_grad():
            self.model(self.x)
        self.model.train()

    def peak_gpu_memory(self) -> int:
        pool = backend.resolve_device(self.device)[1].get_default_memory_pool()
        self.train_step()
        self.sync()
        return int(pool.total_bytes())


class TorchRunner:
    def __init__(self, model_name, images, labels, device, dtype, variant):
        import torch
        from torch import nn

        self.torch = torch
        self.name = f"PyTorch {torch.__version__} ({'nn.BatchNorm' if variant == 'builtin' else 'scratch BN'})"
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        bn4 = bn2 = None
        if model_name != "lenet":
            if variant == "builtin":
                bn4, bn2 = nn.BatchNorm2d, nn.BatchNorm1d
            else:
                bn4, bn2 = (lambda c: _TorchScratchBN(c, 4)), (lambda c: _TorchScratchBN(c, 2))

        def block(layer, channels, bn):
            return [layer] + ([bn(channels)] if bn else []) + [nn.Sigmoid()]

        self.model = nn.Sequential(
            *block(nn.Conv2d(1, 6, 5), 6, bn4), nn.MaxPool2d(2, 2), *block(nn.Conv2d(6, 16, 5), 16, bn4),
            nn.MaxPool2d(2, 2), nn.Flatten(), *block(nn.Linear(256, 120), 120, bn2),
            *block(nn.Linear(120, 84), 84, bn2), nn.Linear(84, 10)).to(self.device, getattr(torch, str(dtype)))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.loss = nn.CrossEntropyLoss()
        self.x = torch.tensor(images, dtype=getattr(torch, str(dtype)), device=self.device)
        self.y = torch.tensor(labels, device=self.device)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def train_step(self):
        loss = self.loss(self.model(self.x), self.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def predict(self):
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.x)
        self.model.train()

    def peak_gpu_memory(self) -> int:
        self.torch.cuda.reset_peak_memory_stats()
        self.train_step()
        self.sync()
        return int(self.torch.cuda.max_memory_allocated())


def _TorchScratchBN(num_features, num_dims):
    """The chapter's from-scratch BN in PyTorch (the reference the chapter itself benchmarks against)."""
    import torch
    from torch import nn

    class ScratchBN(nn.Module):
        def __init__(self):
            super().__init__()
            shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
            self.gamma, self.beta = nn.Parameter(torch.ones(shape)), nn.Parameter(torch.zeros(shape))
            self.register_buffer("moving_mean", torch.zeros(shape))
            self.register_buffer("moving_var", torch.ones(shape))

        def forward(self, x):
            axes = (0,) if x.dim() == 2 else (0, 2, 3)
            mean = x.mean(dim=axes, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
            with torch.no_grad():
                self.moving_mean.mul_(0.9).add_(0.1 * mean)
                self.moving_var.mul_(0.9).add_(0.1 * var)
            return self.gamma * (x - mean) / torch.sqrt(var + 1e-5) + self.beta

    return ScratchBN()


def _time(runner, what: str, steps: int) -> float:
    work = runner.train_step if what == "train" else runner.predict
    runner.sync()
    start = time.perf_counter()
    for _ in range(steps):
        work()
    runner.sync()
    return time.perf_counter() - start


class OpProfiler:
    """Forward and backward seconds per op and implementation: an observer of the op registry
    (``with ops.observe(OpProfiler(sync)):``), which times every function it is handed."""

    def __init__(self, sync):
        self.forward, self.backward, self.calls, self.sync = defaultdict(float), defaultdict(float), defaultdict(int), sync

    def wrap(self, implementation, phase, function):
        key = (implementation.op, implementation.label)
        totals = self.forward if phase == "forward" else self.backward

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.sync()
            totals[key] += time.perf_counter() - start
            if phase == "forward":
                self.calls[key] += 1
            return result
        return timed

    def report(self, steps: int) -> list[dict]:
        keys = sorted(set(self.forward) | set(self.backward), key=lambda k: -(self.forward[k] + self.backward[k]))
        return [{"op": op, "implementation": label, "calls/step": self.calls[(op, label)] // steps,
                 "forward ms": 1e3 * self.forward[(op, label)] / steps,
                 "backward ms": 1e3 * self.backward[(op, label)] / steps} for op, label in keys]


def run(args) -> int:
    family = kernels.use(args.kernels)
    device = backend.resolve_device(args.device)[0]
    if not args.json:
        print(kernels.describe(device=device), flush=True)
    frameworks = _frameworks(args)
    spec = dict(model=args.model, batch_size=args.batch_size, device=device, dtype=args.dtype, threads=args.threads,
                variant=args.torch_variant, kernels=family, steps=args.steps, blocks=args.blocks,
                warmup=args.warmup)
    runs = {framework: [] for framework in frameworks}
    for repeat in range(args.repeats):       # A B A B ...: each pair sees the machine in the same state
        for framework in frameworks:
            runs[framework].append(_run_worker(dict(spec, framework=framework)))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    results = _summarize(args, device, family, runs)
    if args.profile:
        results["profile"] = profile(args, device)
    if args.json:
        print(json.dumps(results))
    else:
        _print_table(args, results, len(frameworks))
    return 0


def _frameworks(args) -> list[str]:
    """The frameworks to time, after checking that the comparison asked for can run here."""
    if args.batch_size < 2 and args.model != "lenet":
        raise ValueError(f"--batch-size {args.batch_size}: {args.model} trains with batch norm, which needs at least "
                         f"2 images per batch")
    frameworks = ["tinybn"]
    if args.compare == "fold":
        if args.model == "lenet":
            raise ValueError("--compare fold: lenet has no batch norm to fold; use lenet-bn or lenet-bn-concise")
        frameworks.append("fold")
    if args.compare == "torch":
        if importlib.util.find_spec("torch") is None:
            raise ValueError("--compare torch needs PyTorch, which tinybn never depends on: pip install torch")
        frameworks.append("torch")
    return frameworks


def _summarize(args, device, family, runs) -> dict:
    """Each framework's medians and peak memory, and the per-pair ratios' median and range."""
    first = runs["tinybn"][0]
    results = {"model": args.model, "batch_size": args.batch_size, "device": device, "dtype": args.dtype,
               "kernels": family, "data": first["data"], "repeats": args.repeats, "steps": args.steps,
               "blocks": args.blocks, "threads": first["threads"], "numpy": numpy.__version__,
               "method": "each measurement in a fresh process; frameworks alternate", "frameworks": {}}
    for framework, measured in runs.items():
        kinds = ("predict",) if framework == "fold" else ("train", "predict")     # a folded model only predicts
        entry = {what: statistics.median(r[what] for r in measured) if what in kinds else None
                 for what in ("train", "predict")}
        entry["runs"] = [{what: round(r[what], 1) for what in kinds} for r in measured]
        peaks = [r["peak_gpu_bytes"] for r in measured if r.get("peak_gpu_bytes")]
        peak = None if framework == "fold" else max(peaks) if peaks else peak_rss_growth(
            framework, args.model, args.batch_size, numpy.dtype(args.dtype), args.threads, args.torch_variant)
        entry["peak_memory_mb"] = None if peak is None else round(peak / 2**20, 1)
        results["frameworks"][measured[0]["name"]] = entry
    pairs = {"fold": [("predict", "fold_predict", lambda a, b: b / a)],
             "torch": [("train", "train", lambda a, b: a / b), ("predict", "predict", lambda a, b: a / b)]}
    for what, name, ratio in pairs.get(args.compare, []):
        ratios = [ratio(a[what], b[what]) for a, b in zip(runs["tinybn"], runs[args.compare])]
        results[f"ratio_{name}"], results[f"ratio_{name}_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
    if args.compare == "torch":
        mine, theirs = results["frameworks"].values()
        if mine["peak_memory_mb"] and theirs["peak_memory_mb"]:
            results["ratio_memory"] = mine["peak_memory_mb"] / theirs["peak_memory_mb"]
    return results


def _print_table(args, results: dict, count: int) -> None:
    device = results["device"]
    print(f"{args.model}, batch {args.batch_size}, {args.dtype}, {device}, {results['threads']} threads, "
          f"{results['data']} data, tinybn kernels: {results['kernels']}; "
          f"{args.repeats} fresh process(es) per framework{', alternating' if count == 2 else ''}, "
          f"each the best of {args.blocks} blocks of {args.steps} steps; medians")
    memory = "peak GPU MB" if device.startswith("cuda") else "train +MB"
    print(f"{'framework':44s} {'train ex/s':>11s} {'predict ex/s':>13s} {memory:>11s}")
    for name, entry in results["frameworks"].items():
        peak = "n/a" if entry["peak_memory_mb"] is None else f"{entry['peak_memory_mb']:.1f}"
        train = "-" if entry["train"] is None else f"{entry['train']:.0f}"
        print(f"{name:44s} {train:>11s} {entry['predict']:13.0f} {peak:>11s}")
    if "ratio_fold_predict" in results:
        low, high = results["ratio_fold_predict_range"]
        print(f"prediction with BN folded / as trained (median of {args.repeats} pairs, min-max): "
              f"{results['ratio_fold_predict']:.2f}x ({low:.2f}-{high:.2f}) (above 1 is faster)")
    if "ratio_train" in results:
        memory = f", memory {results['ratio_memory']:.2f}x" if "ratio_memory" in results else ""
        low, high = results["ratio_train_range"]
        plow, phigh = results["ratio_predict_range"]
        print(f"ratio tinybn/PyTorch (median of {args.repeats} pairs, min-max): train {results['ratio_train']:.2f}x "
              f"({low:.2f}-{high:.2f}), predict {results['ratio_predict']:.2f}x ({plow:.2f}-{phigh:.2f}){memory} "
              f"(above 1 is faster for speed, larger for memory)")
    if args.profile:
        print(f"\nper-op time per training step ({args.steps} steps, synchronised):")
        print(f"{'op [implementation]':28s} {'calls':>5s} {'forward ms':>11s} {'backward ms':>12s}")
        for row in results["profile"]:
            name = f"{row['op']} [{row['implementation']}]"
            print(f"{name:28s} {row['calls/step']:5d} {row['forward ms']:11.2f} {row['backward ms']:12.2f}")


def profile(args, device) -> list[dict]:
    """Per-op times of ``args.steps`` training steps, in this process."""
    if args.threads:
        _set_threads(args.threads)
    images, labels, _ = sample_batch(args.batch_size)
    runner = TinybnRunner(args.model, images, labels, device, numpy.dtype(args.dtype))
    for _ in range(args.warmup):
        runner.train_step()
    with ops.observe(OpProfiler(runner.sync)) as profiler:
        for _ in range(args.steps):
            runner.train_step()
    return profiler.report(args.steps)


def _run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh Python process; returns what it printed."""
    import subprocess

    env = dict(os.environ, TINYBN_KERNELS=spec["kernels"] if spec["framework"] != "torch" else "reference")
    done = subprocess.run([sys.executable, "-m", "tinybn.app.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {spec['framework']} benchmark process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def worker(spec: dict) -> dict:
    """One fresh process's measurement: warm up, then the fastest of ``blocks`` timed blocks of each kind."""
    if spec["threads"]:
        _set_threads(spec["threads"])
    images, labels, source = sample_batch(spec["batch_size"])
    dtype = numpy.dtype(spec["dtype"])
    if spec["framework"] in ("tinybn", "fold"):
        runner = TinybnRunner(spec["model"], images, labels, spec["device"], dtype)
    else:
        import torch
        torch.set_num_threads(spec["threads"] or kernels.threads())
        runner = TorchRunner(spec["model"], images, labels, spec["device"], dtype, spec["variant"])
    for _ in range(spec["warmup"]):
        runner.train_step()
        runner.predict()
    kinds = ("train", "predict")
    if spec["framework"] == "fold":        # trained a little, then folded: the model a deployment would run
        from ..nn import fold_batch_norm
        runner.model = fold_batch_norm(runner.model.eval())
        runner.name, kinds = "tinybn, BN folded (nn.fold_batch_norm)", ("predict",)
        for _ in range(spec["warmup"]):
            runner.predict()
    result = {"name": runner.name, "data": source, "threads": spec["threads"] or kernels.threads()}
    for what in kinds:
        seconds = min(_time(runner, what, spec["steps"]) for _ in range(spec["blocks"]))
        result[what] = spec["batch_size"] * spec["steps"] / seconds
    if spec["device"].startswith("cuda"):
        result["peak_gpu_bytes"] = runner.peak_gpu_memory()
    return result


def peak_rss_growth(framework, model, batch_size, dtype, threads, torch_variant):
    """Bytes the resident set grows by over a few training steps, measured in a fresh process.

    The probe reads the resident size once the model and the batch exist, and the high-water mark
    after the steps; the difference is what training itself needs. Returns None where the platform
    has no ``resource`` module (Windows).
    """
    try:
        import resource  # noqa: F401
    except ImportError:
        return None
    import subprocess

    spec = json.dumps([framework, model, batch_size, str(dtype), threads, torch_variant])
    env = dict(os.environ, TINYBN_KERNELS=kernels.active())
    done = subprocess.run([sys.executable, "-c", f"from tinybn.app.bench import _rss_probe; _rss_probe({spec!r})"],
                          capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe for {framework} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def _rss_probe(spec: str) -> None:
    """Run inside the fresh process started by :func:`peak_rss_growth`; prints the growth in bytes."""
    framework, model, batch_size, dtype, threads, torch_variant = json.loads(spec)
    if threads:
        _set_threads(threads)
    # memory does not depend on the values; loading the whole dataset would leave a high-water mark
    # above what training needs, hiding it
    rng = numpy.random.default_rng(0)
    images, labels = rng.random((batch_size, 1, 28, 28), numpy.float32), rng.integers(0, 10, batch_size)
    if framework == "tinybn":
        runner = TinybnRunner(model, images, labels, "cpu", numpy.dtype(dtype))
    else:
        import torch
        torch.set_num_threads(threads or kernels.threads())
        runner = TorchRunner(model, images, labels, "cpu", numpy.dtype(dtype), torch_variant)
    before = _resident_bytes()[0]
    for _ in range(3):
        runner.train_step()
    after = _resident_bytes()[1]
    print(after - before)


def _resident_bytes() -> tuple[int, int]:
    """(current, peak) resident set of this process.

    Linux's VmRSS/VmHWM belong to this process image alone; ``ru_maxrss`` would also carry the
    parent's high-water mark across fork and exec, so it is only the fallback (macOS).
    """
    import resource

    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak, peak


def _set_threads(count: int) -> None:
    """Use ``count`` threads in tinybn's compiled kernels and in NumPy's BLAS (through threadpoolctl)."""
    kernels.set_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"warning: could not limit NumPy's BLAS to {count} threads (no threadpoolctl); pip install "
              f"threadpoolctl, or set OPENBLAS_NUM_THREADS={count} before starting Python", file=sys.stderr)
        return
    threadpool_limits(count)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
