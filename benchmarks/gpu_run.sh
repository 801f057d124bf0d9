#!/usr/bin/env bash
# One GPU session: install (building the CUDA extension), run the CUDA tests, run the default
# (GPU-sized, bf16) benchmark. Everything lands in $OUT (default ./gpu_out) as at most 8 files:
#   env.txt  install.log  pytest_cuda.log  bench.log  results.json  results.csv  plots.tar.gz
# Run from the repository root on a machine with a CUDA GPU and its own python3 + CUDA torch:
#   OUT=/tmp/out bash benchmarks/gpu_run.sh
# Knobs (environment):
#   SKIP_INSTALL=1        reuse an existing install        SKIP_TESTS=1   skip pytest -m cuda
#   BENCH_ARGS="..."      extra run.py arguments, e.g. "--ops fused_linear_distill_loss --repeat 10"
#   BENCH_BUDGET=420      seconds after which run.py starts no new case (results so far are kept)
#   TEST_TIMEOUT=240      seconds for the CUDA tests
# Liger-Kernel is benchmarked when importable; offline machines can carry its wheel in ./wheels/
# (pip download liger-kernel --no-deps -d wheels), which is installed without network access.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  echo "== install (builds opd_kernels._C; log in install.log)"
  {
    "$PY" -m pip install --no-build-isolation -e . || status=1
    if ls wheels/liger_kernel-*.whl >/dev/null 2>&1; then
      "$PY" -m pip install --no-index --no-deps wheels/liger_kernel-*.whl || echo "liger-kernel wheel failed to install"
    fi
    "$PY" -c "import opd_kernels, opd_kernels._dispatch as d, torch; print('backends:', [(n, d._load(n)[1] or 'ok') for n in ('torch', 'triton', 'cuda')])"
  } >"$OUT/install.log" 2>&1
  tail -n 3 "$OUT/install.log"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== pytest -m cuda tests/"
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -m cuda tests/ -q -rs >"$OUT/pytest_cuda.log" 2>&1 || status=1
  tail -n 5 "$OUT/pytest_cuda.log"
fi

echo "== benchmarks/run.py (default GPU shapes, bf16)"
# shellcheck disable=SC2086
"$PY" benchmarks/run.py --out "$OUT/bench" --budget "${BENCH_BUDGET:-420}" \
  --note "GPU run via benchmarks/gpu_run.sh" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1
cp "$OUT/bench/results.json" "$OUT/bench/results.csv" "$OUT/" 2>/dev/null || status=1
tar -C "$OUT/bench" -czf "$OUT/plots.tar.gz" . 2>/dev/null && rm -rf "$OUT/bench"
exit $status
