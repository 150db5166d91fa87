"""Where things are: the pack, the ComfyUI tree, the Python that runs it."""
from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "compose3d"


@lru_cache(maxsize=1)
def comfyui_root() -> Path:
    """The ComfyUI tree: ``COMFYUI_PATH`` if set, else the one ``scripts/get_comfyui.py`` unpacks."""
    spec = importlib.util.spec_from_file_location("_c3d_get_comfyui", PACK_ROOT / "scripts" / "get_comfyui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ensure_comfyui(module.default_cache())


def add_comfyui_to_sys_path() -> Path:
    """Put ComfyUI's tree (``comfy``, ``folder_paths``...) and the pack's ``scripts/`` on ``sys.path``."""
    root = comfyui_root()
    for path in (str(PACK_ROOT / "scripts"), str(root)):
        if path not in sys.path:
            sys.path.insert(0, path)
    return root


def register_pack() -> None:
    """Import the pack as the package ``compose3d`` (as ComfyUI does: by path, relative imports inside)."""
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


def python_for_server() -> str:
    """The interpreter that runs the ComfyUI server: this one (the project's virtual environment)."""
    return os.environ.get("COMPOSE3D_SERVER_PYTHON", sys.executable)
