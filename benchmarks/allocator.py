"""What glibc's allocator thresholds (tinybn.fast.tune_process) are worth, and when.

Each measurement runs in a fresh process: LeNet-BN at batch 256 trains for a few warm-up steps, then
20 timed steps, with or without tune_process, on a batch made in memory or after loading Fashion-MNIST
(whose large freed arrays make glibc raise its thresholds by itself). Reported per step: wall time,
minor page faults and system CPU time. The configurations alternate, ``--rounds`` times.

    python3 benchmarks/allocator.py --rounds 4
"""
import argparse
import json
import statistics
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import numpy
from tinybn import fast
from tinybn.app.bench import TinybnRunner, sample_batch
tuned, loaded = sys.argv[1] == "tuned", sys.argv[2] == "loaded"
if tuned:
    fast.tune_process()
if loaded:
    images, labels, _ = sample_batch(256)
else:
    rng = numpy.random.default_rng(0)
    images, labels = rng.random((256, 1, 28, 28), numpy.float32), rng.integers(0, 10, 256)
runner = TinybnRunner("lenet-bn", images, labels, "cpu", numpy.dtype("float32"))
for _ in range(5):
    runner.train_step()
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(20):
    runner.train_step()
after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
print(json.dumps({"ms": 1e3 * seconds / 20, "faults": (after.ru_minflt - before.ru_minflt) / 20,
                  "sys_ms": 1e3 * (after.ru_stime - before.ru_stime) / 20}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    configurations = [(tuned, data) for data in ("in memory", "loaded") for tuned in ("tuned", "untuned")]
    results = {c: [] for c in configurations}
    for round_ in range(args.rounds):
        for tuned, data in configurations:
            done = subprocess.run([sys.executable, "-c", WORKER, tuned, data.split()[0] if data == "loaded" else "memory"],
                                  capture_output=True, text=True, check=True, timeout=600)
            results[(tuned, data)].append(json.loads(done.stdout))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{'batches':10s} {'tune_process':13s} {'ms/step':>9s} {'page faults/step':>17s} {'system ms/step':>15s}")
    for (tuned, data), runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in ("ms", "faults", "sys_ms")}
        print(f"{data:10s} {'yes' if tuned == 'tuned' else 'no':13s} {median['ms']:9.1f} {median['faults']:17.0f} "
              f"{median['sys_ms']:15.1f}")


if __name__ == "__main__":
    main()
