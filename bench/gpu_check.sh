#!/usr/bin/env bash
# `make gpu-check OUT=dir`: the one prepared run for a fresh one-GPU machine (no network; torch, triton,
# nvcc, cmake, ninja and pybind11 preinstalled). Bounded (each step has a limit; 460 s in all at most); every step writes into $OUT and a
# failed step does not stop the next. summary.md lists each step's exit status.
set -u
OUT=${1:-gpu_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
summary="$OUT/summary.md"
echo "# gpu-check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)" > "$summary"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "- $name: exit $rc in $((SECONDS - t0)) s (log: $name.log)" | tee -a "$summary"
  return $rc
}

"$PY" - > "$OUT/environment.log" 2>&1 <<'PYENV'
import subprocess, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print("capability", torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
for cmd in (["nvcc", "--version"], ["nvidia-smi"], ["compute-sanitizer", "--version"]):
    try:
        print(subprocess.run(cmd, capture_output=True, text=True).stdout)
    except OSError as e:
        print(cmd[0], "missing:", e)
PYENV

arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
step build 120 env RINGATTN_CUDA_ARCHS="$arch" "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -c "import ringattn, json; print(json.dumps(ringattn.extension_status()))" >> "$OUT/build.log" 2>&1
step pytest-gpu 100 "$PY" -m pytest -m "gpu and not slow" -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml"
if command -v compute-sanitizer > /dev/null; then
  step memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m ringattn.bench.sanitize_cases
  step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" -m ringattn.bench.sanitize_cases
else
  echo "- memcheck/racecheck: compute-sanitizer not found, not run" | tee -a "$summary"
fi
step bench 150 "$PY" -m ringattn.bench gpu-check --out "$OUT"
echo "results in $OUT (summary.md)"
