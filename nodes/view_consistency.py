"""View Consistency Score: how 3D-consistent a set of posed views is (reconstruct, render back, compare)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..kernels.reconstruct import StepInfo
from ..kernels.view_consistency import ConsistencySettings, consistency_report, error_rows, view_consistency
from .common import BACKGROUNDS, Progress, check_interrupt, compute_device
from .nerf import PREVIEW_SIZE, check_views, fitting_inputs, preview_render
from .types import CATEGORY, CamerasType
from .validation import Compose3DNode


class ViewConsistencyScore(Compose3DNode):
    """MVC: fit a NeRF to the views, render it back at their cameras, report the reprojection error."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_ViewConsistency",
            display_name="View Consistency Score",
            category=f"{CATEGORY}/mixed_score",
            description="Measures how 3D-consistent posed views are (e.g. the 4 views of a multi-view sampler): "
                        "fits a fresh NeRF to all of them, renders it back at their cameras and reports the "
                        "mean absolute RGB difference (lower = more consistent). A view that shows something "
                        "the others do not cannot be explained by one object and comes back different. Compare "
                        "scores measured with the same settings and image size, e.g. to pick a score-mixing "
                        "weight.",
            inputs=[
                io.Image.Input("images", tooltip="The views to measure, one per camera."),
                CamerasType.Input("cameras", tooltip="One camera per image, in the same order (e.g. the Orbit "
                                                     "Cameras the views were generated for)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Object silhouettes (1 = object), one per image. Optional: without them "
                                      "the whole image is reconstructed and compared."),
                *fitting_inputs(300, "Reconstruction steps. More steps fit consistent views better; keep the "
                                     "same number when comparing scores.", "fitting and rendering back",
                                "(the NeRF's background, and what the images are composited on where the mask "
                                "is 0)"),
            ],
            outputs=[
                io.Float.Output(display_name="score",
                                tooltip="Mean reprojection error over the views (mean absolute RGB difference "
                                        "in [0, 1]); lower = more consistent."),
                io.String.Output(display_name="per_view",
                                 tooltip="Report: the error of each view, the worst view and the heat maps' "
                                         "colour scale. The worst view is the one the fit explains least, "
                                         "not necessarily the one that differs: a view that disagrees with "
                                         "the others raises their errors too (most of all the opposite "
                                         "view's)."),
                io.Image.Output(display_name="error_images",
                                tooltip="Per view: [view as compared | render of the fitted NeRF | error heat "
                                        "map]; the heat maps share one colour scale (blue 0, red the largest "
                                        "error)."),
            ],
        )

    @classmethod
    def execute(cls, images, cameras, steps, rays_per_step, samples_per_ray, learning_rate, background, seed,
                masks=None) -> io.NodeOutput:
        check_views(images, cameras, masks)
        if masks is not None and masks.ndim == 2:
            masks = masks[None]
        device = compute_device()
        settings = ConsistencySettings(steps=steps, rays_per_step=rays_per_step, samples_per_ray=samples_per_ray,
                                       lr=learning_rate, background=BACKGROUNDS[background], seed=seed)
        progress = Progress(steps)
        preview_every = max(1, steps // 10)
        preview_size = min(PREVIEW_SIZE, max(images.shape[1], images.shape[2]))  # no finer than the views

        def on_step(info: StepInfo, nerf) -> None:
            preview = None
            if info.step % preview_every == 0 or info.step == info.total:
                with torch.no_grad():
                    preview = preview_render(nerf, cameras, preview_size)
            progress.update(info.step, preview)

        with torch.inference_mode(False), torch.enable_grad():
            views = images.clone().float()
            mask_views = None if masks is None else masks.clone().float()
            result = view_consistency(views, cameras, mask_views, settings, device=device, on_step=on_step,
                                      check_interrupt=check_interrupt)
        report = consistency_report(result, cameras)
        return io.NodeOutput(result.score, report, error_rows(result))
