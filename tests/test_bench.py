"""The benchmark command runs and reports sane numbers (no speed targets here: those belong in docs/benchmarks.md)."""
import json
import subprocess
import sys

import pytest


def bench(*args):
    return subprocess.run([sys.executable, "-m", "tinybn", "bench", "--repeats", "1", "--steps", "1", "--warmup", "1",
                           "--batch-size", "8", *args], capture_output=True, text=True, timeout=300)


def test_bench_json_and_profile():
    out = bench("--json", "--profile")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    entry = result["frameworks"]["tinybn"]
    assert entry["train"] > 0 and entry["predict"] > 0 and entry["peak_memory_mb"] > 0
    assert result["fast_paths"] is True
    ops = {row["op"] for row in result["profile"]}
    assert {"conv2d", "batch_norm", "max_pool2d", "linear", "sigmoid", "cross_entropy"} <= ops


@pytest.mark.parametrize("variant", ["builtin", "scratch"])
def test_bench_compare_torch(variant):
    pytest.importorskip("torch")
    out = bench("--compare", "torch", "--torch-variant", variant, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"ratio_train", "ratio_predict", "ratio_memory"}
    for name, entry in result["frameworks"].items():
        assert entry["train"] > 0 and entry["predict"] > 0 and entry["peak_memory_mb"] > 0, name


def test_bench_reference_kernels_only():
    out = bench("--no-fast", "--profile")
    assert out.returncode == 0, out.stderr
    assert "tinybn fast paths off" in out.stdout and "conv2d" in out.stdout
