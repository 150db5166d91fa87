"""Where things are: the pack, the ComfyUI tree, the Python that runs it."""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from .comfyui import default_cache, ensure_comfyui
from .pack import PACK_NAME, PACK_ROOT, register_pack

__all__ = ["PACK_NAME", "PACK_ROOT", "register_pack", "comfyui_root", "add_comfyui_to_sys_path", "python_for_server"]


@lru_cache(maxsize=1)
def comfyui_root() -> Path:
    """The ComfyUI tree: ``COMFYUI_PATH`` if set, else the one :mod:`harness.comfyui` unpacks."""
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
