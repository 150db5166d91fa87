"""Small pieces every Compose3D node module uses: devices, progress with previews and interrupts, image conversions.

Interrupts: ComfyUI's Cancel sets a flag that only code polling it sees. Long loops poll it through
:func:`check_interrupt` inside each step as well as between steps (kernels take it as a ``check_interrupt``
callable; field functions handed to kernels are wrapped with :func:`interruptible`), so a Cancel is answered
within a fraction of a second even when one step takes minutes.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from PIL import Image

import comfy.model_management
import comfy.utils

T = TypeVar("T")

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


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (cheap: a lock and a flag)."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def interruptible(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` that first checks for an interrupt on every call (for field functions kernels call per chunk)."""
    def checked(*args, **kwargs):
        check_interrupt()
        return fn(*args, **kwargs)
    return checked


class Progress:
    """A ComfyUI progress bar whose updates are also interrupt points; previews are optional."""

    def __init__(self, total: int):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        check_interrupt()
        shown = None if preview is None else ("JPEG", to_pil(preview), PREVIEW_MAX_PX)
        self.bar.update_absolute(value, self.total, shown)
