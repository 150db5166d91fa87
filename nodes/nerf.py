"""NeRF nodes: fit a radiance field to posed views, and render one from any cameras."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..kernels.background import SolidBackground
from ..kernels.cameras import Cameras
from ..kernels.checks import check_shape
from ..kernels.nerf import NeRF
from ..kernels.reconstruct import FitSettings, StepInfo, fit_views, new_nerf_for_views
from ..kernels.renderer import RenderSettings, render_views
from .common import BACKGROUNDS, Progress, check_interrupt, compute_device
from .types import CATEGORY, CamerasType, NeRFType
from .validation import Compose3DNode

PREVIEW_SIZE = 128


def check_views(images: torch.Tensor, cameras: Cameras, masks: torch.Tensor | None) -> None:
    """Raise ValueError naming the input when images, masks and cameras do not describe the same views."""
    sizes = check_shape("images", images, ("B", "H", "W", 3), note=" (an IMAGE batch)")
    b, h, w = sizes["B"], sizes["H"], sizes["W"]
    if len(cameras) != b:
        raise ValueError(f"cameras: {len(cameras)} cameras for {b} images; give one camera per image "
                         f"(e.g. Orbit Cameras with views={b})")
    if masks is None:
        return
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] != b:
        raise ValueError(f"masks: {masks.shape[0]} masks for {b} images; give one mask per image")
    if tuple(masks.shape[1:]) != (h, w):
        raise ValueError(f"masks: mask size {masks.shape[2]}x{masks.shape[1]} differs from the image size "
                         f"{w}x{h}; resize the masks to the images")
    empty = [i for i in range(b) if not bool((masks[i] > 0.5).any())]
    if empty:
        raise ValueError(f"masks: view(s) {empty} have an empty mask (no pixel above 0.5); the object must be "
                         f"visible in every view, or leave masks unconnected")


def fitting_inputs(steps: int, steps_tooltip: str, samples_use: str, background_use: str) -> list:
    """The inputs of a node that fits a new NeRF to views, in this order: steps (default ``steps``), rays_per_step,
    samples_per_ray, learning_rate, background, seed. ``samples_use`` and ``background_use`` finish the tooltips of
    samples_per_ray and background."""
    return [
        io.Int.Input("steps", default=steps, min=1, max=100000, tooltip=steps_tooltip),
        io.Int.Input("rays_per_step", default=4096, min=64, max=262144, step=64,
                     tooltip="Pixels rendered per step."),
        io.Int.Input("samples_per_ray", default=64, min=8, max=1024,
                     tooltip=f"Samples along each ray inside the box ({samples_use})."),
        io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=0.0001,
                       tooltip="Adam step size of the hash grid (the MLPs use a tenth)."),
        io.Combo.Input("background", options=list(BACKGROUNDS), default="white",
                       tooltip=f"Colour behind the object {background_use}."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="NeRF initialisation and ray sampling."),
    ]


def preview_render(nerf: NeRF, cameras: Cameras, size: int = PREVIEW_SIZE) -> torch.Tensor:
    """(size, size, 3) render of the first camera, for progress previews."""
    out = render_views(nerf.field, nerf.background, cameras[:1], size, size, nerf.render, nerf.occupancy,
                       with_normals=False)
    return out["features"][0]


class NeRFFromViews(Compose3DNode):
    """Sparse-view reconstruction (Grounded-Dreamer's stage 2, without a diffusion prior)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_NeRFFromViews",
            display_name="NeRF From Views",
            category=f"{CATEGORY}/nerf",
            description="Fits a radiance field (hash grid + small MLPs) to images taken by known cameras. "
                        "Masks make it much faster and cleaner: space outside every silhouette is skipped. "
                        "Connect a NeRF to keep training it.",
            inputs=[
                io.Image.Input("images", tooltip="The views, one per camera."),
                CamerasType.Input("cameras", tooltip="One camera per image, in the same order."),
                io.Mask.Input("masks", optional=True, tooltip="Object silhouettes (1 = object), one per image."),
                NeRFType.Input("nerf", optional=True, tooltip="Continue training this NeRF instead of a new one."),
                *fitting_inputs(1000, "Optimisation steps. ~500-1000 for a 64 px object on a CPU.",
                                "used again when rendering", "(the images are composited on it where the mask is 0)"),
            ],
            outputs=[NeRFType.Output(display_name="nerf", tooltip="The fitted NeRF, for Render NeRF, Export Mesh or "
                                                                  "further training.")],
        )

    @classmethod
    def execute(cls, images, cameras, steps, rays_per_step, samples_per_ray, learning_rate, background, seed,
                masks=None, nerf=None) -> io.NodeOutput:
        check_views(images, cameras, masks)
        if masks is not None and masks.ndim == 2:
            masks = masks[None]
        device = compute_device()
        progress = Progress(steps)
        settings = FitSettings(steps=steps, rays_per_step=rays_per_step, lr=learning_rate, seed=seed)
        preview_every = max(25, steps // 20)

        with torch.inference_mode(False), torch.enable_grad():
            if nerf is None:
                result = new_nerf_for_views(device, BACKGROUNDS[background], samples_per_ray, seed)
            else:
                if not isinstance(nerf.background, SolidBackground):
                    raise ValueError("nerf: this NeRF has a learned background; NeRF From Views continues only "
                                     "NeRFs with a solid background colour")
                result = nerf.clone().to(device)
                # The inputs apply to the continued NeRF too (its field and training state are kept).
                result.background = SolidBackground(BACKGROUNDS[background]).to(device)
                result.render = RenderSettings(samples_per_ray, result.render.chunk_rays)
            views = images.clone().float()
            mask_views = None if masks is None else masks.clone().float()

            def on_step(info: StepInfo) -> None:
                preview = None
                if info.step % preview_every == 0 or info.step == info.total:
                    preview = preview_render(result, cameras)
                progress.update(info.step, preview)

            fit_views(result, views, cameras, mask_views, settings, on_step=on_step, check_interrupt=check_interrupt)
        return io.NodeOutput(result)


class RenderNeRF(Compose3DNode):
    """Renders a NeRF from cameras: colour, normals, opacity and depth."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_RenderNeRF",
            display_name="Render NeRF",
            category=f"{CATEGORY}/nerf",
            description="Renders every camera. Normals are world-space, shown as 0.5 + 0.5 * n on black; depth "
                        "is white near and black far (per image), black where nothing is hit.",
            inputs=[
                NeRFType.Input("nerf", tooltip="The NeRF to render."),
                CamerasType.Input("cameras", tooltip="The cameras to render from; one image per camera."),
                io.Int.Input("width", default=256, min=8, max=4096, step=8,
                             tooltip="Width of each rendered image in pixels."),
                io.Int.Input("height", default=256, min=8, max=4096, step=8,
                             tooltip="Height of each rendered image in pixels."),
                io.Int.Input("samples_per_ray", default=0, min=0, max=1024,
                             tooltip="0 uses the NeRF's own setting."),
            ],
            outputs=[io.Image.Output(display_name="rgb", tooltip="Rendered colour over the NeRF's background, one "
                                                                 "image per camera (N, H, W, 3) in 0..1."),
                     io.Image.Output(display_name="normal", tooltip="World-space normals as 0.5 + 0.5 * n, black "
                                                                    "where nothing is hit (N, H, W, 3)."),
                     io.Mask.Output(display_name="opacity", tooltip="Accumulated opacity per pixel (N, H, W) in 0..1: "
                                                                    "1 on the object, 0 on the background."),
                     io.Image.Output(display_name="depth", tooltip="Depth per image: white nearest, black farthest "
                                                                   "and where nothing is hit (N, H, W, 3).")],
        )

    @classmethod
    def execute(cls, nerf, cameras, width, height, samples_per_ray) -> io.NodeOutput:
        settings = nerf.render if samples_per_ray == 0 else RenderSettings(samples_per_ray, nerf.render.chunk_rays)
        device = compute_device()
        model = nerf.to(device)
        total_rays = len(cameras) * width * height
        progress = Progress(total_rays)
        out = render_views(model.field, model.background, cameras, height, width, settings, model.occupancy,
                           with_normals=True, on_progress=lambda done, total: progress.update(done))
        opacity = out["opacity"].clamp(0, 1)
        normal = (0.5 + 0.5 * torch.nn.functional.normalize(out["normal"], dim=-1)) * opacity[..., None]
        return io.NodeOutput(out["features"].clamp(0, 1), normal, opacity, depth_image(out["depth"], opacity))


def depth_image(depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """(N, H, W) expected depth -> (N, H, W, 3) grey image: 1 at the nearest hit of each view, 0 at the farthest
    and where the opacity is below 0.5."""
    hit = opacity > 0.5
    d = depth / opacity.clamp_min(1e-6)  # depth of the surface rather than opacity-weighted
    out = torch.zeros_like(depth)
    for i in range(depth.shape[0]):
        if hit[i].any():
            near, far = d[i][hit[i]].min(), d[i][hit[i]].max()
            out[i] = torch.where(hit[i], 1.0 - (d[i] - near) / (far - near).clamp_min(1e-6), 0.0)
    return out[..., None].expand(*out.shape, 3).contiguous()
