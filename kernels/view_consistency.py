"""View consistency: how well one 3D object explains a set of posed views (MVC, the multiview consistency score).

The views are reconstructed as a NeRF (a fresh one, made as NeRF From Views makes a new one) and rendered back at
their own cameras. Views that show one object are explained by it and come back nearly unchanged; a view that
disagrees with the others (another object, another pose, a Janus face) cannot be explained by the same geometry
and colours (the field's colour is view independent), so it comes back different. The reprojection error is the
per-pixel mean absolute RGB difference between each view and its render; the score is its mean over the views
(lower = more consistent).

The score is relative: it depends on the fit's steps, rays and samples, the image size and how much of each image
the object covers, so compare scores measured with the same settings on views of the same size.

What it can and cannot see, with few views (e.g. 4 views 90 degrees apart):

* Surface seen by one view only (the back, from the front-back-left-right ring) can take any colour, so colour
  differences there are fitted away; what raises the score is geometry the views disagree on (silhouettes) and
  colours on surface that several views see.
* Per-view errors do not point at the view that differs. Opposite views look along the same lines of sight and
  share a conflict about equally, and with masks the fit starts from the visual hull (the intersection of all
  silhouettes), so a view whose silhouette is too small is explained well while the others lose parts of the
  object. Some views are also harder to fit than others when all agree. Compare a view's error between runs
  rather than reading the worst view as the culprit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .cameras import Cameras
from .checks import check_shape
from .nerf import NeRF
from .part_maps import heat_colors
from .reconstruct import FitSettings, StepInfo, composite_targets, fit_views, new_nerf_for_views
from .renderer import render_views


@dataclass(frozen=True)
class ConsistencySettings:
    """How the views are reconstructed: ``steps`` of ``rays_per_step`` random pixels, ``samples_per_ray`` samples
    per ray (used again for the renders), Adam step size ``lr`` of the hash grid (the MLPs use a tenth),
    ``background`` RGB behind the object (images are composited on it where a mask is 0) and ``seed`` (field
    initialisation and ray sampling)."""

    steps: int = 300
    rays_per_step: int = 4096
    samples_per_ray: int = 64
    lr: float = 1e-2
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0


@dataclass(frozen=True)
class ConsistencyResult:
    """What :func:`view_consistency` measured, for N views of H x W pixels (CPU tensors).

    Attributes:
        score: mean of ``per_view`` (lower = more consistent).
        per_view: (N,) mean reprojection error of each view.
        errors: (N, H, W) per-pixel reprojection error: mean absolute RGB difference, in [0, 1].
        targets: (N, H, W, 3) the views as compared (composited over the background where a mask is 0).
        renders: (N, H, W, 3) the fitted NeRF rendered at the views' cameras, in [0, 1].
        nerf: the fitted NeRF.
    """

    score: float
    per_view: Tensor
    errors: Tensor
    targets: Tensor
    renders: Tensor
    nerf: NeRF

    @property
    def worst_view(self) -> int:
        """Index of the view with the largest mean error."""
        return int(self.per_view.argmax())


def view_consistency(images: Tensor, cameras: Cameras, masks: Tensor | None = None,
                     settings: ConsistencySettings = ConsistencySettings(), device: torch.device | str = "cpu",
                     on_step: Callable[[StepInfo, NeRF], None] | None = None,
                     check_interrupt: Callable[[], None] | None = None) -> ConsistencyResult:
    """Fit a fresh NeRF to ``images`` (N, H, W, 3) in [0, 1] seen by ``cameras`` (N views), render it back at the
    same cameras and measure the reprojection error.

    Args:
        masks: (N, H, W) object silhouettes in [0, 1], or None. With masks the fit starts from their visual hull
            and the views are compared composited over ``settings.background`` where the mask is 0.
        device: where the NeRF is fitted and rendered.
        on_step: called after every fitting step with the step's :class:`reconstruct.StepInfo` and the NeRF
            being fitted (for progress previews); may raise to stop.
        check_interrupt: called before every chunk of rays (fitting and rendering); may raise to stop.

    Needs autograd: call it outside ``torch.inference_mode`` (gradients are switched on here).

    Returns:
        :class:`ConsistencyResult` with the score, (N,) per-view errors and (N, H, W) per-pixel errors.
    """
    sizes = check_shape("images", images, ("N", "H", "W", 3))
    n, h, w = sizes["N"], sizes["H"], sizes["W"]
    if len(cameras) != n:
        raise ValueError(f"cameras: {len(cameras)} cameras for {n} images; give one camera per image")
    if masks is not None:
        check_shape("masks", masks, (n, h, w), note=" (one mask per image, of the image size)")
    nerf = new_nerf_for_views(device, settings.background, settings.samples_per_ray, settings.seed)
    views = images.detach().float().cpu()
    mask_views = None if masks is None else masks.detach().float().cpu()
    fit = FitSettings(steps=settings.steps, rays_per_step=settings.rays_per_step, lr=settings.lr,
                      seed=settings.seed)
    step_callback = None if on_step is None else (lambda info: on_step(info, nerf))
    with torch.enable_grad():
        fit_views(nerf, views, cameras, mask_views, fit, on_step=step_callback, check_interrupt=check_interrupt)

    def rendered(done: int, total: int) -> None:
        if check_interrupt is not None:
            check_interrupt()

    with torch.no_grad():
        out = render_views(nerf.field, nerf.background, cameras, h, w, nerf.render, nerf.occupancy,
                           with_normals=False, on_progress=rendered)
    renders = out["features"].clamp(0.0, 1.0)
    targets = composite_targets(views, mask_views, torch.tensor(settings.background, dtype=torch.float32))
    errors = reprojection_errors(renders, targets)
    per_view = errors.mean(dim=(1, 2))
    score = float(per_view.mean())
    if not math.isfinite(score):
        raise ValueError("images: the reprojection error is not finite (are the images finite, in [0, 1]?)")
    return ConsistencyResult(score, per_view, errors, targets, renders, nerf)


def reprojection_errors(renders: Tensor, targets: Tensor) -> Tensor:
    """(N, H, W, 3) renders and (N, H, W, 3) targets -> (N, H, W) mean absolute difference over RGB."""
    return (renders.float() - targets.float()).abs().mean(dim=-1)


def error_heat_colors(errors: Tensor, scale: float) -> Tensor:
    """(N, H, W) errors -> (N, H, W, 3) heat colours (blue 0 .. red ``scale`` and above), one scale for all."""
    return heat_colors(errors.float() / max(scale, 1e-6))


def error_rows(result: ConsistencyResult, scale: float | None = None) -> Tensor:
    """(N, H, 3 * W, 3): per view, [view as compared | render | error heat map] side by side. The heat maps of
    all views share one colour scale: 0 is blue, ``scale`` (default: the largest error of any pixel) red."""
    scale = heat_scale(result.errors) if scale is None else scale
    heat = error_heat_colors(result.errors, scale)
    return torch.cat([result.targets.clamp(0.0, 1.0), result.renders, heat], dim=2).contiguous()


def heat_scale(errors: Tensor) -> float:
    """The error shown red in :func:`error_rows`: the largest pixel error of any view (at least 1e-6)."""
    return max(float(errors.max()), 1e-6) if errors.numel() else 1e-6


def consistency_report(result: ConsistencyResult, cameras: Cameras | None = None,
                       scale: float | None = None) -> str:
    """A short text: the score, one line per view with its error (and camera when given), the worst view named,
    and the heat map's scale."""
    n = result.per_view.shape[0]
    lines = [f"view consistency score: {result.score:.4f} (mean absolute RGB error of {n} views against a NeRF "
             f"fitted to all of them; lower = more consistent)"]
    worst = result.worst_view
    for i, err in enumerate(result.per_view.tolist()):
        where = ""
        if cameras is not None:
            where = (f" (azimuth {float(cameras.azimuth_deg[i]):g} deg, "
                     f"elevation {float(cameras.elevation_deg[i]):g} deg)")
        lines.append(f"view {i}{where}: {err:.4f}" + ("  <- worst" if i == worst and n > 1 else ""))
    if n > 1:
        others = torch.cat([result.per_view[:worst], result.per_view[worst + 1:]]).mean()
        ratio = float(result.per_view[worst] / others.clamp_min(1e-9))
        lines.append(f"worst view: {worst} ({ratio:.1f}x the mean error of the other views; the view the fit "
                     f"explains least, not necessarily the one that differs)")
    shown = heat_scale(result.errors) if scale is None else scale
    lines.append(f"heat maps: blue = 0, red = {shown:.3f} (same scale for every view)")
    return "\n".join(lines)
