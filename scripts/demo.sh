#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job: the demo workflow, headless, through ComfyUI's API.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup.sh")"
export COMFYUI_PATH="$COMFYUI"
exec "$VENV/bin/python" "$ROOT/scripts/demo.py" "$@"
