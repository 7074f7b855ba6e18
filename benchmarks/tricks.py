"""Does each fast-path trick earn its place? Every variant against PyTorch, each run in a fresh process.

The fast kernels rest on two tricks beyond their arithmetic: worker threads that spin through ctypes
(tinybn/fast/parallel.py), and OpenBLAS kept on one thread while their pieces run. Each variant below
takes some of that away. Every round runs PyTorch and every variant once, each in its own fresh process
(the order rotates from round to round), and each variant's ratio to the PyTorch run of the same round is
recorded; the table gives the median ratio and its min-max over the rounds.

    python3 benchmarks/tricks.py --rounds 7            # LeNet-BN, batch 256, float32, 2 threads
    python3 benchmarks/tricks.py --baseline-tree DIR   # also an older checkout, measured the same way

Three more tricks were measured this way and dropped, because none gained beyond the noise: glibc's
mallopt thresholds, OpenBLAS on one thread for the whole process, and 4K-aliasing-safe placement of the
im2col workspaces (the script and its outputs at that time: commit ced795d, docs/measurements/).
The patches live here, in the measuring script, not in tinybn.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "shipped": "tinybn as it is: its threads, OpenBLAS on one thread while their pieces run",
    "one thread": "TINYBN_NUM_THREADS=1, OpenBLAS on one thread: no second core at all",
    "no threads": "TINYBN_NUM_THREADS=1 and OpenBLAS on its own threads (no ctypes spin locks, no BLAS control)",
    "no BLAS control": "tinybn's threads, but OpenBLAS left on its own threads",
}


def patched_worker(variant: str, spec: dict) -> dict:
    """Runs in the fresh process: take the trick away, then measure as ``tinybn bench`` does."""
    from tinybn import fast
    from tinybn.app import bench
    from tinybn.fast import blas

    if variant in ("no threads", "no BLAS control"):
        fast.parallel._blas_on_one_thread = lambda: None
    if variant == "one thread":
        spec = dict(spec, threads=None)        # tinybn's pool from TINYBN_NUM_THREADS=1; PyTorch keeps 2 below
        blas.set_threads(1)
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
    if variant in ("no threads", "one thread"):
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
