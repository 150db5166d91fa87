#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup.sh")"
export COMFYUI_PATH="$COMFYUI"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
