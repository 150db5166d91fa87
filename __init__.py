"""Compose3D: controllable text-to-3D nodes for ComfyUI.

ComfyUI imports this file (``nodes.load_custom_node``) and calls :func:`comfy_entrypoint`. The node modules
are imported inside it so that ``kernels`` stays importable without ComfyUI.
"""
from __future__ import annotations

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


async def comfy_entrypoint():
    """Return the ComfyExtension that lists every Compose3D node (ComfyUI's V3 entry point)."""
    from .nodes import Compose3DExtension

    return Compose3DExtension()
