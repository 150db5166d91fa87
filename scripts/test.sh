#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup.sh")"
export COMFYUI_PATH="$COMFYUI"
# The browser tests (tests/test_browser.py) drive Debian's Chromium: install the package when it is missing.
if [ -z "${COMPOSE3D_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[test] installing Debian's chromium for the browser tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
      || echo "[test] could not install chromium: the browser tests will fail" >&2
  else
    echo "[test] no chromium (and no apt-get as root to install it): the browser tests will fail" >&2
  fi
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
