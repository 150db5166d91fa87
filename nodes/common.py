"""Small pieces every Compose3D node module uses: devices, progress with previews, image conversions."""
from __future__ import annotations

import torch
from PIL import Image

import comfy.model_management
import comfy.utils

PREVIEW_MAX_PX = 512

#: Background colours offered by nodes that composite over one.
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}


def compute_device() -> torch.device:
    """The device ComfyUI computes on (``--cpu`` gives the CPU)."""
    return comfy.model_management.get_torch_device()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(H, W, 3) float image in [0, 1] -> PIL RGB."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype("uint8")
    return Image.fromarray(arr)


class Progress:
    """A ComfyUI progress bar whose updates are also interrupt points; previews are optional."""

    def __init__(self, total: int):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        shown = None if preview is None else ("JPEG", to_pil(preview), PREVIEW_MAX_PX)
        self.bar.update_absolute(value, self.total, shown)
