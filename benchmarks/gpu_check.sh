#!/usr/bin/env bash
# One device run for the GPU work: versions, the chapter's recipe on the GPU, bench against PyTorch,
# then the suite on CuPy (the GPU as one more device, then TINYBN_DEVICE=gpu for every tensor without a device).
# Usage, from the repository root on a machine with a GPU and CuPy:
#   TINYBN_DATA=DIR bash benchmarks/gpu_check.sh [OUTDIR]
# Each step has its own time limit, so that one slow step cannot hide the others; the table comes last.
set -uo pipefail
out=${1:-/tmp/tinybn-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$out/steps.txt"; tail -n "${TAIL:-6}" "$out/$name.log"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
$py - <<'PY' | tee -a "$out/device.txt"
import cupy, numpy, torch, sys
print("python", sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__,
      "cuda runtime", cupy.cuda.runtime.runtimeGetVersion(), "torch", torch.__version__)
print("torch tf32: matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32,
      "cudnn enabled", torch.backends.cudnn.enabled, torch.backends.cudnn.version())
import os; print("CUPY_TF32", os.environ.get("CUPY_TF32", "unset (cuBLAS in plain fp32)"))
PY
TAIL=14 step train 120 $py -m tinybn train --device gpu --out "$out/run" --overwrite
for b in 256 1024 4096; do
  TAIL=12 step bench$b 60 $py -m tinybn bench --device gpu --compare torch --batch-size $b --repeats 3
done
TAIL=30 step profile256 40 $py -m tinybn bench --device gpu --batch-size 256 --profile --repeats 1
TAIL=25 step suite 120 $py -m pytest -q -n 12 -p no:cacheprovider --timeout 150 tests -k "gpu or cupy or device"
TAIL=40 step suite_on_gpu 90 env TINYBN_DEVICE=gpu $py -m pytest -q -n 12 -p no:cacheprovider --timeout 120 \
  tests/test_gradients.py tests/test_properties_ops.py tests/test_properties_engine.py tests/test_batchnorm.py \
  tests/test_normalization.py tests/test_sync_batchnorm.py tests/test_nn.py tests/test_autograd.py
echo; echo "== summary =="; cat "$out/steps.txt"; grep -h "ratio\|examples/sec\|epoch 10" "$out"/bench*.log "$out/train.log" | head -40
# one archive of every log and the run's metrics, for a caller that collects files (the device tool's $OUT)
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-logs.tar.gz" -C "$out" .; fi
