"""Where things are: the pack, the ComfyUI tree, the Python that runs it."""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:  # the project's scripts (ComfyUI fetching, headless client) are importable
    sys.path.insert(0, str(SCRIPTS))

from get_comfyui import default_cache, ensure_comfyui  # noqa: E402
from pack_import import PACK_NAME, PACK_ROOT, register_pack  # noqa: E402,F401  (re-exported)


@lru_cache(maxsize=1)
def comfyui_root() -> Path:
    """The ComfyUI tree: ``COMFYUI_PATH`` if set, else the one ``scripts/get_comfyui.py`` unpacks."""
    return ensure_comfyui(default_cache())


def add_comfyui_to_sys_path() -> Path:
    """Put ComfyUI's tree (``comfy``, ``folder_paths``...) on ``sys.path``."""
    root = comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def python_for_server() -> str:
    """The interpreter that runs the ComfyUI server: this one (the project's virtual environment)."""
    return os.environ.get("COMPOSE3D_SERVER_PYTHON", sys.executable)
