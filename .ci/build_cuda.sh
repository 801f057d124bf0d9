#!/usr/bin/env bash
# CI step: show that csrc/ compiles. Installs the CUDA-13 torch build into its own virtualenv
# (the CPU test venv is left alone), builds opd_kernels._C with OPD_FORCE_BUILD=1 into a temp
# dir (nothing is written into the work tree), then loads the .so with that torch and checks
# that every op registered (schemas, CUDA kernels, fake impls via cuda_backend). No GPU needed;
# the kernels themselves are not run here.
#
#   OPD_CUDA_VENV    virtualenv to use/create (default ~/.cache/opd-kernels/venv-cuda; reused
#                    when it already holds the right torch, recreated otherwise)
#   OPD_CUDA_ARCHS   passed to setup.py (default there: "80;90")
#   CUDA_HOME        toolkit root; default: found from nvcc on PATH (wrapper scripts followed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TORCH_SPEC="torch==2.14.1"
VENV="${OPD_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/opd-kernels/venv-cuda}"
T0=$(date +%s)
log() { echo "[build_cuda $(( $(date +%s) - T0 ))s] $*"; }

# --- the CUDA toolkit (nvcc) ---------------------------------------------------------------
has_toolkit() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if [ -z "${CUDA_HOME:-}" ]; then
  NVCC="$(command -v nvcc || true)"
  [ -n "$NVCC" ] || NVCC=/usr/local/cuda/bin/nvcc
  for cand in "$(dirname "$(dirname "$NVCC")")" \
              "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" \
              "$(sed -n 's|^exec \([^ ]*\)/bin/nvcc.*|\1|p' "$NVCC" 2>/dev/null | head -n1)" \
              /usr/local/cuda; do
    if [ -n "$cand" ] && has_toolkit "$cand"; then CUDA_HOME="$cand"; break; fi
  done
fi
if [ -z "${CUDA_HOME:-}" ] || ! has_toolkit "$CUDA_HOME"; then
  echo "build_cuda: no CUDA toolkit found (nvcc + include/cuda_runtime.h); set CUDA_HOME" >&2
  exit 1
fi
export CUDA_HOME
log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"

# --- the virtualenv with the CUDA torch ----------------------------------------------------
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_SPEC" <<'PY' 2>/dev/null
import sys, torch, ninja, pybind11  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1].split("==")[1] and torch.version.cuda
PY
}
if venv_ok; then
  log "reusing $VENV"
else
  log "creating $VENV with $TORCH_SPEC (CUDA build)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" pybind11 ninja numpy setuptools wheel \
    > "$VENV.pip.log" 2>&1 || { tail -n 30 "$VENV.pip.log" >&2; exit 1; }
  venv_ok || { echo "build_cuda: $VENV has no usable CUDA torch" >&2; exit 1; }
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# --- the build (out of tree) ---------------------------------------------------------------
OUT="$(mktemp -d /tmp/opd-cuda-build.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
log "building opd_kernels._C into $OUT (MAX_JOBS=${MAX_JOBS:-2})"
# setup.py build_ext writes only under --build-lib/--build-temp; `-q` keeps the nvcc lines out.
OPD_FORCE_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext \
  --build-lib "$OUT/lib" --build-temp "$OUT/tmp" > "$OUT/build.log" 2>&1 || {
  tail -n 60 "$OUT/build.log" >&2
  echo "build_cuda: the CUDA extension failed to build" >&2
  exit 1
}
SO="$(ls "$OUT"/lib/opd_kernels/_C*.so)"
log "built $SO ($(du -h "$SO" | cut -f1))"

# --- checks without a GPU: the .so loads with this torch, ops and fakes register -----------
mkdir -p "$OUT/pkg"
cp -r "$ROOT/opd_kernels" "$OUT/pkg/"
cp "$SO" "$OUT/pkg/opd_kernels/"
# (run from $OUT so that the work tree's opd_kernels, which has no _C, is not on sys.path)
cd "$OUT" && PYTHONPATH="$OUT/pkg" "$VENV/bin/python" - <<'PY'
import torch
from opd_kernels.backends import cuda_backend as cb

mod, reason = cb._load()
assert mod is not None, reason
print("loaded", mod.__file__, "| archs", getattr(mod, "CUDA_ARCHS", "?"))
ops = torch.ops.opd_kernels_C
for name in mod.OPS:
    op = getattr(ops, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
    print(" ", op._schema)
ok, why = cb.available()
print("available():", ok, why or "")
assert ok or why == "no CUDA device", why

# The fake impls (what torch.compile traces with) on meta tensors: shapes and dtypes only.
N, V = 5, 37
s = torch.empty(N, V, device="meta", dtype=torch.bfloat16)
t = torch.empty(N, V, device="meta", dtype=torch.float16)
y = torch.empty(N, device="meta", dtype=torch.int64)
f = torch.empty(N, 4, device="meta")
g = torch.empty(N, 2, device="meta")
assert ops.row_stats(s, t, None, y, 1.0, 1.0, 0).shape == (N, 8)
assert ops.jsd_sums(s, t, g, 1.0, 0.5).dtype == torch.float32
d = ops.grad_logits(s, t, None, None, f, g, "jsd", 1.0, 1.0, 0.5, 0, True)
assert d.shape == (N, V) and d.dtype == torch.bfloat16
ops.grad_logits_out(d, s, t, None, None, f, g, "reverse_kl", 1.0, 1.0, 0.5, 0, False)
print("fake impls OK")
PY
log "OK: opd_kernels._C builds and registers its ops"
