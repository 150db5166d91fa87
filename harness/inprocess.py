"""ComfyUI imported into the test process: call a node's ``execute`` the way ComfyUI's executor does.

``init_comfy`` must run before anything imports ``comfy.model_management`` (it selects the device: the CPU unless
told otherwise).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .paths import add_comfyui_to_sys_path, register_pack

_initialised = False


def init_comfy(device: str | None = None) -> None:
    """Put ComfyUI on ``sys.path``, select the device and register the pack (once per process).

    ``device``: ``"cpu"`` (ComfyUI's ``--cpu``) or ``"auto"`` (ComfyUI's choice, e.g. CUDA); default
    ``COMPOSE3D_TEST_DEVICE`` or ``"cpu"``. Later calls change nothing.
    """
    global _initialised
    if _initialised:
        return
    root = add_comfyui_to_sys_path()
    import comfy.cli_args

    if (device or os.environ.get("COMPOSE3D_TEST_DEVICE", "cpu")) == "cpu":
        comfy.cli_args.args.cpu = True
    # Bind the name ``nodes`` to ComfyUI's nodes.py now: pytest may later put the repository root (a package with
    # its own ``nodes/``) first on sys.path, depending on the checkout folder's name.
    import nodes

    if Path(nodes.__file__).resolve().parent != root.resolve():
        raise RuntimeError(f"'import nodes' found {nodes.__file__}, not ComfyUI's nodes.py in {root}")
    register_pack()
    _initialised = True


def use_folders(models: Path, output: Path, temp: Path, inputs: Path) -> None:
    """Point ComfyUI's folder_paths at test folders (models are registered like extra_model_paths)."""
    init_comfy()
    import folder_paths

    for kind in ("checkpoints", "diffusion_models", "vae", "text_encoders", "loras", "clip_vision", "ipadapter"):
        (models / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
    for d in (output, temp, inputs):
        d.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(output))
    folder_paths.set_temp_directory(str(temp))
    folder_paths.set_input_directory(str(inputs))


def run_node(node_cls, *, hidden: dict | None = None, **inputs: Any):
    """Run ``node_cls.execute(**inputs)`` as ComfyUI's executor does (class clone, inference mode).

    Returns the ``io.NodeOutput``.
    """
    init_comfy()
    node_cls.VALIDATE_CLASS()
    clone = node_cls.PREPARE_CLASS_CLONE(hidden or {})
    with torch.inference_mode():
        return node_cls.execute.__func__(clone, **inputs)


def predict_x0(model, x, sigmas, context, extra: dict | None = None):
    """A MODEL's x0 predictions (B, C, h, w) for latents ``x`` at ``sigmas`` (B,), conditioned on the text
    ``context`` (1 or B, L, C) with ``extra`` conditioning keys (e.g. MVDream cameras), through ComfyUI's own
    conditioning and batching code (``encode_model_conds``, ``calc_cond_batch``) as one sampling call runs it."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        entries = comfy.sampler_helpers.convert_cond([[context, dict(extra or {})]])
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, entries, x, x.device, "positive")
        model.pre_run()
        try:
            return comfy.samplers.calc_cond_batch(model.model, [conds], x, sigmas, model.model_options)[0].clone()
        finally:
            model.cleanup()
