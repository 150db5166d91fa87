#!/usr/bin/env bash
# Run the pack's benchmarks on a CUDA machine in priority order within one time budget, logs and JSON under $OUT.
#
#   OUT=bench-out BENCH_BUDGET=540 bash scripts/bench_gpu.sh [name ...]
#
# Names (the default order): my3d sds modulation mixed capture refocus. Each benchmark gets at most its own limit
# and never more than what is left of BENCH_BUDGET seconds (GNU timeout stops it with its child processes); one
# that fails or is cut off does not stop the next. Per benchmark: $OUT/<name>.txt (its whole output); the JSON
# figures of those that write them go into $OUT/json.tar (rewritten after each one), so $OUT holds at most 8 files.
#
# The machine needs a python3 with torch (CUDA) and ComfyUI's other imports. Where they are missing, bring them:
# a ComfyUI tree in .dev/comfyui (used as COMFYUI_PATH) and wheels in .whl/ (installed into /tmp/site, on
# PYTHONPATH); scripts/prepare_gpu_bundle.sh makes both (git-ignored). On a machine set up by scripts/setup.sh,
# use PYTHON=.venv/bin/python.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
BUDGET=${BENCH_BUDGET:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT" /tmp/bench-json
start=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .dev/comfyui ] && [ -z "${COMFYUI_PATH:-}" ]; then export COMFYUI_PATH=$PWD/.dev/comfyui; fi
export PYTHONUNBUFFERED=1
{
  date -u; nproc; free -g | head -2; nvidia-smi
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} > "$OUT/env.txt" 2>&1
head -c 2000 "$OUT/env.txt" | grep -E "torch|NVIDIA H|Driver" || true

declare -A LIMIT=([my3d]=200 [sds]=120 [modulation]=90 [mixed]=90 [refocus]=150 [capture]=60)
declare -A ARGS=(
  [my3d]="scripts/bench_make_your_3d.py --device auto --steps 8 --out /tmp/bench-json/my3d.json"
  [sds]="scripts/bench_sds.py --device auto --steps 8 --out /tmp/bench-json/sds.json"
  [modulation]="scripts/bench_modulation.py --device auto --steps 4 --out /tmp/bench-json/modulation.json"
  [mixed]="scripts/bench_mixed.py --device auto --steps 5 --out /tmp/bench-json/mixed.json"
  [refocus]="scripts/bench_refocus.py --device cuda --steps 30 --repeats 2"
  [capture]="scripts/bench_capture.py --device cuda --repeats 5"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(my3d sds modulation mixed capture refocus)
for name in "${names[@]}"; do
  [ -n "${ARGS[$name]:-}" ] || { echo "unknown benchmark $name"; continue; }
  left=$((BUDGET - ($(date +%s) - start)))
  limit=${LIMIT[$name]}
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped (${left} s of the budget left)"; continue; fi
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout -k 5 "$limit" "$PY" ${ARGS[$name]} > "$OUT/$name.txt" 2>&1
  status=$?
  echo "== $name: exit $status after $(($(date +%s) - t0)) s (limit $limit s)"
  grep -v -E "^\s*$|it/s\]|s/it\]" "$OUT/$name.txt" | tail -n 22
  tar -cf "$OUT/json.tar" -C /tmp/bench-json . 2>/dev/null
done
echo "total $(($(date +%s) - start)) s"
