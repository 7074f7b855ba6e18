"""Does each fast-path trick earn its place? Every variant against PyTorch, each run in a fresh process.

The fast kernels rest on a few tricks beyond their arithmetic: worker threads that spin through ctypes
(tinybn/fast/parallel.py), control of OpenBLAS's thread count (while a map runs, and for the whole
process in tune_process), glibc's mallopt thresholds (tinybn/fast/memory.py) and 4K-aliasing-safe
placement of the im2col workspaces (tinybn/fast/cpu.py). Each variant below takes one of them away.
Every round runs PyTorch and every variant once, each in its own fresh process (the order rotates from
round to round), and each variant's ratio to the PyTorch run of the same round is recorded; the
table gives the median ratio and its min-max over the rounds.

    python3 benchmarks/tricks.py --rounds 7            # LeNet-BN, batch 256, float32, 2 threads

The patches live here, in the measuring script, not in tinybn.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "shipped (CLI)": "the command line's configuration: threads, OpenBLAS on 1 thread, mallopt, aliasing-safe placement",
    "library default": "no tune_process: threads, OpenBLAS on 1 thread only while a map runs, glibc's own malloc",
    "no threads": "TINYBN_NUM_THREADS=1 and OpenBLAS left on its own threads (no ctypes spin locks, no BLAS control)",
    "no BLAS control": "threads, but OpenBLAS never put on one thread",
    "no mallopt": "the CLI's configuration without the mallopt thresholds",
    "no aliasing placement": "the CLI's configuration with plain numpy.empty workspaces",
    "lean (no tuning or aliasing placement)": "neither tune_process nor aliasing-safe placement: threads and OpenBLAS "
                                        "on one thread while a map runs, nothing else",
}


def patched_worker(variant: str, spec: dict) -> dict:
    """Runs in the fresh process: take the trick away, then measure as ``tinybn bench`` does."""
    import numpy

    from tinybn import fast
    from tinybn.app import bench

    if variant in ("library default", "no threads", "no BLAS control", "lean (no tuning or aliasing placement)"):
        fast.tune_process = lambda: []                                        # nothing tuned process-wide
    if variant in ("no threads", "no BLAS control"):
        fast.parallel._blas_on_one_thread = lambda: None
    if variant == "no mallopt":
        fast.memory.keep_freed_memory = lambda: False
        fast.keep_freed_memory = fast.memory.keep_freed_memory
    if variant in ("no aliasing placement", "lean (no tuning or aliasing placement)"):
        fast.cpu._aliasing_safe_empty = lambda size, dtype, *_: numpy.empty(size, dtype)
    return bench.worker(spec)


# An older checkout (before tinybn.app existed) measured the same way, through its own bench module.
BASELINE_WORKER = """
import json, sys, time
import numpy
from tinybn import bench
spec = json.loads(sys.argv[1])
images, labels, _ = bench.sample_batch(spec["batch_size"])
runner = bench.TinybnRunner(spec["model"], images, labels, "cpu", numpy.dtype(spec["dtype"]))
for _ in range(spec["warmup"]):
    runner.train_step(); runner.predict()
result = {}
for what in ("train", "predict"):
    work = runner.train_step if what == "train" else runner.predict
    best = float("inf")
    for _ in range(spec["blocks"]):
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            work()
        best = min(best, time.perf_counter() - start)
    result[what] = spec["batch_size"] * spec["steps"] / best
print(json.dumps(result))
"""


def run(variant: str, spec: dict, baseline_tree=None) -> dict:
    env = dict(os.environ, TINYBN_FAST="1")
    if variant == "no threads":
        env["TINYBN_NUM_THREADS"] = "1"
    command = [sys.executable, __file__, "--worker", variant, json.dumps(spec)]
    if variant == "baseline":
        env["PYTHONPATH"] = baseline_tree
        command = [sys.executable, "-c", BASELINE_WORKER, json.dumps(spec)]
    cwd = baseline_tree if variant == "baseline" else None          # `python -c` looks in its folder first
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the list above")
    parser.add_argument("--baseline-tree", default=None,
                        help="also measure an older checkout at this path (one that has tinybn/bench.py)")
    args = parser.parse_args()
    variants = args.variants.split(",") + (["baseline"] if args.baseline_tree else [])
    unknown = [name for name in variants if name not in VARIANTS and name != "baseline"]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    spec = dict(model="lenet-bn", batch_size=args.batch_size, device="cpu", dtype="float32", threads=args.threads,
                variant="builtin", fast=True, steps=10, blocks=3, warmup=3)
    ratios = {name: {"train": [], "predict": []} for name in variants}
    for round_ in range(args.rounds):
        order = ["torch"] + variants
        order = order[round_ % len(order):] + order[:round_ % len(order)]
        results = {name: run(name, dict(spec, framework="torch" if name == "torch" else "tinybn"), args.baseline_tree)
                   for name in order}
        for name in variants:
            for what in ("train", "predict"):
                ratios[name][what].append(results[name][what] / results["torch"][what])
        print(f"round {round_ + 1}/{args.rounds}: PyTorch train {results['torch']['train']:.0f} ex/s; "
              + ", ".join(f"{name} {results[name]['train'] / results['torch']['train']:.2f}x" for name in variants),
              file=sys.stderr, flush=True)
    print(f"{'variant':24s} {'train ratio (min-max)':>24s} {'predict ratio (min-max)':>25s}")
    for name in variants:
        cells = []
        for what in ("train", "predict"):
            values = ratios[name][what]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"{name:24s} {cells[0]:>24s} {cells[1]:>25s}")
    print(json.dumps({"rounds": args.rounds, "spec": spec, "ratios": ratios}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(patched_worker(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        main()
