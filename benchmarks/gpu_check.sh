#!/usr/bin/env bash
# The GPU check: one session on an H100/H200 (< 8 min in all), every step under `timeout`:
#   1. env       device, driver, python/torch/triton versions              -> env.txt
#   2. install   pip install --no-build-isolation --no-deps -e . (builds opd_kernels._C with the
#                machine's own python and torch), then peer wheels from benchmarks/wheels/
#                (git-ignored; offline: pip install --no-index --no-deps)   -> install.log
#   3. tests     python -m pytest -m cuda tests/                           -> pytest_cuda.log
#   3b. trainer  python -m opd_train on the smoke preset, 2 steps, --device cuda --dtype bf16
#                --micro-batch-size 8 (pre-trains the tiny bundled models first if the machine has
#                no cache)                                                   -> trainer.log, trainer/
#   4. bench     benchmarks/run.py at the reference shapes (N=8192 V=128256 d=4096 and
#                N=16384 V=151936 d=2048, bf16) for naive torch triton cuda + the peers
#                (liger liger_chunked cce trl trl_chunked); providers run.py does not know, or that cannot
#                run here, are listed with the reason                       -> bench.log, results.*
#   5. floor     each fused-linear op's fraction of its measured matmul floor -> floor.csv/.md
# Output: $OUT/<device>/ (default OUT=./gpu_out), e.g. gpu_out/nvidia-h200/results.json.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh            # on the GPU machine, from anywhere
#   OUT=/tmp/out bash benchmarks/gpu_check.sh --dry-run  # CPU plumbing check (CI): same steps,
#       pip --dry-run (the environment is not changed), the cuda tests skipped, tiny shapes
#
# Stack: written for the lent H200's image as it is: Python 3.12, torch 2.11.0, triton 3.6.0, no
#   network (peer wheels carried in benchmarks/wheels/, git-ignored). What was tested, on CPU only
#   (no GPU has run this script): .ci/run compiles every Triton kernel for sm_80/sm_90a and runs
#   the interpreter tests and this script's --dry-run under triton 3.6.0 (torch 2.13.0 CPU,
#   Python 3.11, numpy<2.4), and again under the default venv's triton 3.9.0.
#
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET (total seconds, default 470),
#   T_INSTALL (default 180), T_TESTS (default 120), T_TRAINER (default 90), BENCH_ARGS (extra run.py arguments),
#   PROVIDERS / OPS (space-separated; defaults below). Exit status: 1 if any step failed.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
DRY=0
RUN_STEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --step) RUN_STEP="$2"; shift ;;  # internal: run one step's function (under `timeout`)
    -h|--help) sed -n '2,30p' "$SELF"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --dry-run)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-470}"
PROVIDERS="${PROVIDERS:-naive torch triton cuda liger liger_chunked cce trl trl_chunked}"
# fused-linear distillation first: what matters most runs before the budget ends
OPS="${OPS:-fused_linear_distill_loss fused_linear_token_logprobs distill_loss token_logprobs fused_linear_gopd_loss gopd_loss}"
if [ "$DRY" = 1 ]; then
  SHAPES="64,512,32"
  BENCH_DEFAULT=(--device cpu --dtype float32 --repeat 1 --warmup 0 --no-plots)
  OPS="fused_linear_token_logprobs"  # one fused op: a floor row, no paired ratio check
  PIP_DRY=(--dry-run)
  TAG="dry-run-cpu"
else
  SHAPES="8192,128256,4096 16384,151936,2048"
  BENCH_DEFAULT=(--dtype bfloat16 --repeat 5 --warmup 1)
  PIP_DRY=()
  if [ -z "$RUN_STEP" ]; then  # the device name, for the output folder
    TAG="$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-cuda')" 2>/dev/null || echo unknown)"
    TAG="$(echo "$TAG" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9.]\+/-/g; s/^-//; s/-$//')"
  fi
fi
if [ -z "$RUN_STEP" ]; then
  OUT="${OUT:-$PWD/gpu_out}/$TAG"
  mkdir -p "$OUT"
  export GPU_CHECK_OUT="$OUT" GPU_CHECK_T0="$T0"
else
  OUT="$GPU_CHECK_OUT" T0="$GPU_CHECK_T0"
fi
declare -a STEPS=()
failed=0

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step NAME SECONDS LOG [CMD...]: run CMD (default: this script's function NAME) under
# `timeout` (capped by the time left), log it, record its exit code
step() {
  local name="$1" limit="$2" log="$3"; shift 3
  [ $# = 0 ] && set -- bash "$SELF" --step "$name" $([ "$DRY" = 1 ] && echo --dry-run)
  local rem; rem=$(left)
  [ "$limit" -gt "$rem" ] && limit="$rem"
  if [ "$limit" -lt 5 ]; then
    STEPS+=("$name rc=skipped (no time left of ${BUDGET}s)"); failed=1; return
  fi
  local t=$(date +%s)
  echo "== [$(( t - T0 ))s] $name (timeout ${limit}s, log $log)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  tail -n 4 "$OUT/$log" | sed 's/^/   | /'
  [ "$rc" = 124 ] && rc="124 (timed out after ${limit}s)"
  STEPS+=("$name rc=$rc $(( $(date +%s) - t ))s")
  [ "$rc" = 0 ] || failed=1
}

env_info() {
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null || true
  echo "mode: $([ "$DRY" = 1 ] && echo dry-run || echo gpu), out: $OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
}

install() {
  local env=() iso=(--no-build-isolation)  # the build must see this python's CUDA torch
  [ "$DRY" = 1 ] && env=(OPD_SKIP_CUDA_BUILD=1)
  if ! "$PY" -c "import setuptools" 2>/dev/null; then
    echo "setuptools is not installed for $PY (needed by --no-build-isolation)"
    [ "$DRY" = 1 ] || return 1
    iso=()  # dry run (e.g. a Python 3.12 venv without setuptools): let pip isolate the build
  fi
  env "${env[@]}" "$PY" -m pip install "${PIP_DRY[@]}" "${iso[@]}" --no-deps -e . || return 1
  shopt -s nullglob
  local wheels=(benchmarks/wheels/*.whl)
  if [ ${#wheels[@]} = 0 ]; then
    echo "peers: no wheels in benchmarks/wheels/ (peers not already installed are skipped by run.py)"
  fi
  for w in "${wheels[@]}"; do  # one at a time: a broken wheel costs only its own provider
    "$PY" -m pip install "${PIP_DRY[@]}" --no-index --no-deps "$w" || echo "peers: $w failed to install"
  done
  [ "$DRY" = 1 ] && return 0
  "$PY" -c "import opd_kernels._dispatch as d; print('backends:', [(n, d._load(n)[1] or 'ok') for n in ('torch', 'triton', 'cuda')])"
}

trainer() {
  local dev=(--device cuda --dtype bf16)
  [ "$DRY" = 1 ] && dev=(--device cpu --dtype bf16)  # the same code paths on CPU (autocast bf16)
  "$PY" -m opd_train --method opd --preset smoke --steps 2 --eval-every 2 --save-every 2 --eval-size 16 \
    --micro-batch-size 8 "${dev[@]}" --out "$OUT/trainer"
}

bench() {
  # keep the providers run.py knows; name the others (added to run.py by its own change)
  local known
  known="$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import cases; print(' '.join(cases.PROVIDERS))")" || return 1
  local use=() p
  for p in $PROVIDERS; do
    if [[ " $known " == *" $p "* ]]; then use+=("$p"); else echo "skip provider $p: not known to benchmarks/run.py (knows: $known)"; fi
  done
  # stop starting cases 60 s before this step's timeout: a running case, the floor GEMMs, the files
  local budget=$(( $(left) - 60 ))
  [ "$budget" -lt 10 ] && budget=10
  # shellcheck disable=SC2086
  "$PY" benchmarks/run.py --out "$OUT" --shapes $SHAPES --ops $OPS --providers "${use[@]}" \
    --budget "$budget" "${BENCH_DEFAULT[@]}" --note "benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')" \
    ${BENCH_ARGS:-}
}

floor() {
  "$PY" - "$OUT" <<'EOF'
import csv, json, sys
out = sys.argv[1]
data = json.load(open(f"{out}/results.json"))
rows = [r for r in data["results"] if r.get("frac_of_floor") is not None]
keys = ["op", "divergence", "provider", "pass", "N", "V", "d", "median_ms", "floor_ms", "frac_of_floor"]
with open(f"{out}/floor.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
lines = ["| op | divergence | provider | pass | N | V | d | median ms | floor ms | fraction of floor |",
         "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
open(f"{out}/floor.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"gemm rates: {data['meta'].get('gemm')}")
print(f"{len(rows)} rows with a matmul floor, {len(data['results'])} results, "
      f"{len(data['skipped'])} skip reasons (see results.json 'skipped')")
if data["meta"].get("partial"):
    sys.exit("results.json is partial: the benchmark was cut short")
if not rows:
    sys.exit("no result has a matmul floor (no fused-linear case was measured)")
EOF
}

if [ -n "$RUN_STEP" ]; then
  "$RUN_STEP"
  exit $?
fi
step env_info 30 env.txt
step install "${T_INSTALL:-180}" install.log
if [ "$DRY" = 1 ]; then  # on a machine without CUDA every cuda test is skipped (tests/conftest.py)
  step tests "${T_TESTS:-120}" pytest_cuda.log "$PY" -m pytest -m cuda tests/ -q -rs -p no:cacheprovider
else
  step tests "${T_TESTS:-120}" pytest_cuda.log "$PY" -m pytest -m cuda tests/ -q -rs
fi
step trainer "${T_TRAINER:-90}" trainer.log
step bench "$(( $(left) - 15 ))" bench.log
step floor 15 floor.log

echo "== gpu_check.sh $([ "$DRY" = 1 ] && echo '--dry-run ')summary ($(( $(date +%s) - T0 ))s, files in $OUT)"
printf '   %s\n' "${STEPS[@]}" | tee "$OUT/steps.txt"
exit $failed
