"""Small pieces every Compose3D node module uses: devices, progress with previews and interrupts, image conversions.

Interrupts: ComfyUI's Cancel sets a flag that only code polling it sees. Long loops poll it through
:func:`check_interrupt` inside each step as well as between steps (kernels take it as a ``check_interrupt``
callable; field functions handed to kernels are wrapped with :func:`interruptible`), so a Cancel is answered
within a fraction of a second even when one step takes minutes.
"""
from __future__ import annotations

import contextlib
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


def interrupt_point(h, transformer_options):
    """UNet input-block patch that changes nothing and raises if the user pressed Cancel (so a Cancel is answered
    within one UNet block, not one model call: a training step or a big batch takes long)."""
    check_interrupt()
    return h


def interrupt_point_skip(h, skip, transformer_options):
    """UNet output-block patch that changes nothing and raises if the user pressed Cancel."""
    check_interrupt()
    return h, skip


@contextlib.contextmanager
def interrupt_hooks(module: torch.nn.Module, layer_type: type | tuple[type, ...] | None = None):
    """While open, every forward call of ``module``'s sub-modules of ``layer_type`` (default: every child of every
    ``nn.ModuleList``, e.g. a transformer's layers) first checks for Cancel: long forward passes of models that
    have no block patches (image encoders) answer within one layer."""
    if layer_type is None:
        layers = [m for lst in module.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    else:
        layers = [m for m in module.modules() if isinstance(m, layer_type)]
    handles = [m.register_forward_pre_hook(lambda _m, _args: check_interrupt()) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def with_interrupt_points(model):
    """A clone of an SD-style UNet MODEL with :func:`interrupt_point` patches on every input and output block."""
    patched = model.clone()
    patched.set_model_input_block_patch(interrupt_point)
    patched.set_model_output_block_patch(interrupt_point_skip)
    return patched


class Progress:
    """A ComfyUI progress bar whose updates are also interrupt points; previews are optional."""

    def __init__(self, total: int):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, preview=None) -> None:
        """Set the bar to ``value``; ``preview`` is an (H, W, 3) image or a ready ``(format, PIL, size)``."""
        check_interrupt()
        shown = preview if preview is None or isinstance(preview, tuple) else \
            ("JPEG", to_pil(preview), PREVIEW_MAX_PX)
        self.bar.update_absolute(value, self.total, shown)


def progress_text(text: str) -> None:
    """Show ``text`` under the running node in the ComfyUI frontend (e.g. a training's loss); no-op outside a
    server run."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id)


def latent_preview_image(model, latent: torch.Tensor):
    """A ``("JPEG", PIL image, max size)`` preview of one (C, h, w) latent with ComfyUI's previewer for the
    model's latent format (the user's preview method: latent2rgb or TAESD), or None when previews are off."""
    import latent_preview

    previewer = latent_preview.get_previewer(latent.device, model.model.latent_format)
    if previewer is None:
        return None
    return previewer.decode_latent_to_preview_image("JPEG", latent[None].detach())


#: The ui key of a part legend, read by web/compose3d.js to label a node's part or heat-map preview.
LEGEND_KEY = "compose3d_legend"


def preview_with_legend(cls, images: torch.Tensor, parts, layout: str) -> dict:
    """The ui of a node that shows ``images`` (N, H, W, 3) on itself, with a legend of ``parts`` for the
    frontend: ``layout`` "colors" (each part in its colour, :func:`~compose3d.kernels.part_maps.colored_preview`)
    or "columns" (each image has one column per part, in order, as
    :func:`~compose3d.kernels.part_maps.heat_map_preview`). Values are lists, as ComfyUI merges ui of list
    runs by concatenation."""
    from comfy_api.latest import ui

    from ..kernels.part_maps import part_legend

    shown = ui.PreviewImage(images, cls=cls).as_dict()
    shown[LEGEND_KEY] = [{"layout": layout, "parts": part_legend(list(parts))}]
    return shown
