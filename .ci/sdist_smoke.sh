#!/usr/bin/env bash
# `make sdist-smoke` (CI runs it once per run): sdist -> wheel -> fresh virtualenv -> smoke, outside
# the repository. The sdist is built with `python -m build` from this checkout; a new virtualenv gets
# torch ($TORCH_SPEC), then pip builds a wheel from the sdist (compiling ringattn._C, required to
# succeed) and installs it; from a folder outside the repository: .ci/smoke.py (import, extension
# status, environment report, one attention call per backend vs fp64), then the `bench` extra and
# `ringattn-bench all --quick`, and `ringattn-topology plan`. Each step's time goes to $WORK/times.txt.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}                      # builds the sdist (needs the `build` package)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ -n "${SMOKE_DIR:-}" ]; then
  WORK=$(mkdir -p "$SMOKE_DIR" && cd "$SMOKE_DIR" && pwd)
else  # a temporary folder (a virtualenv with torch is GBs), removed after a successful run
  WORK=$(mktemp -d -t ringattn-smoke.XXXXXX)
  trap 'if [ $? -eq 0 ]; then rm -rf "$WORK"; else echo "sdist smoke failed; files in $WORK" >&2; fi' EXIT
fi
case "$WORK/" in "$ROOT"/*) echo "SMOKE_DIR must be outside the repository ($ROOT)" >&2; exit 2;; esac
# One CUDA arch is enough to prove the sdist carries what the CUDA build needs (where nvcc exists).
export RINGATTN_CUDA_ARCHS=${SMOKE_CUDA_ARCHS:-89}
export RINGATTN_REQUIRE_EXT=1
rm -rf "$WORK/dist" "$WORK/venv" "$WORK/bench"
mkdir -p "$WORK"
: > "$WORK/times.txt"
START=$SECONDS

step() {  # step NAME CMD...: run it, and record how long it took
  local name=$1 t0=$SECONDS; shift
  echo "== $name" >&2
  "$@"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$WORK/times.txt" >&2
}

step sdist "$PY" -m build --sdist --outdir "$WORK/dist" "$ROOT"
sdist=$(ls "$WORK"/dist/ringattn-*.tar.gz)
step venv "$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
step torch "$V" -m pip install -q "$TORCH_SPEC"
step wheel "$V" -m pip wheel -q --no-deps --wheel-dir "$WORK/dist" "$sdist"
wheel=$(ls "$WORK"/dist/ringattn-*.whl)
step install "$V" -m pip install -q "$wheel"
cd "$WORK"  # outside the repository: only the installed package can be imported
step smoke "$V" "$ROOT/.ci/smoke.py"
step report "$V" -m ringattn > "$WORK/report.txt"
step bench-extra "$V" -m pip install -q "ringattn[bench]"
step bench "$WORK/venv/bin/ringattn-bench" all --quick --out "$WORK/bench"
step topology "$WORK/venv/bin/ringattn-topology" plan --gpus-per-node 8 --nodes 4 --seq 262144 --json "$WORK/plan.json"
echo "sdist smoke passed ($(basename "$sdist"), $(basename "$wheel")) in $((SECONDS - START)) s:" >&2
cat "$WORK/times.txt" >&2
