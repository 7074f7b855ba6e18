"""The benchmark command runs and reports sane numbers (no speed targets here: those belong in docs/benchmarks.md)."""
import json
import subprocess
import sys

import pytest

from tinybn import kernels


def bench(*args):
    return subprocess.run([sys.executable, "-m", "tinybn", "bench", "--repeats", "1", "--steps", "1", "--warmup", "1",
                           "--batch-size", "8", *args], capture_output=True, text=True, timeout=300)


def test_bench_json_and_profile():
    out = bench("--json", "--profile")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    entry = result["frameworks"]["tinybn"]
    assert entry["train"] > 0 and entry["predict"] > 0 and entry["peak_memory_mb"] > 0
    family = kernels.available()[-1]
    assert result["kernels"] == family
    ran = {(row["op"], row["implementation"]) for row in result["profile"]}
    assert {(op, family) for op in kernels.covered(family) if op != "flatten"} | {("cross_entropy", "reference")} <= ran


@pytest.mark.parametrize("variant", ["builtin", "scratch"])
def test_bench_compare_torch(variant):
    pytest.importorskip("torch")
    out = bench("--compare", "torch", "--torch-variant", variant, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"ratio_train", "ratio_predict", "ratio_memory"}
    for name, entry in result["frameworks"].items():
        assert entry["train"] > 0 and entry["predict"] > 0 and entry["peak_memory_mb"] > 0, name


def test_bench_compare_fold():
    out = bench("--compare", "fold", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    folded = result["frameworks"]["tinybn, BN folded (nn.fold_batch_norm)"]
    assert folded["predict"] > 0 and folded["train"] is None and result["ratio_fold_predict"] > 0
    refused = bench("--compare", "fold", "--model", "lenet")
    assert refused.returncode == 2 and "no batch norm to fold" in refused.stderr


def test_bench_reference_kernels_only():
    out = bench("--kernels", "reference", "--profile")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("kernels: the readable reference for every op")
    assert "tinybn kernels: reference" in out.stdout and "conv2d [reference]" in out.stdout


def test_threads_option_limits_numpys_openblas():
    """--threads must reach NumPy's BLAS (checked in a fresh process, and read back through OpenBLAS's own getter
    rather than through threadpoolctl's)."""
    pytest.importorskip("threadpoolctl")
    code = """
import ctypes, sys
from tinybn.app import bench
bench._set_threads(1)
paths = {l.split()[-1] for l in open("/proc/self/maps") if "openblas" in l.rsplit("/", 1)[-1]}
for path in paths:
    lib = ctypes.CDLL(path)
    for name in ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads64_",
                 "scipy_openblas_get_num_threads"):
        if hasattr(lib, name):
            print(getattr(lib, name)()); sys.exit()
print("no-openblas")
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no-openblas":
        pytest.skip("NumPy is not linked against OpenBLAS here")
    assert out.stdout.strip() == "1"
