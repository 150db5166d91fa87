"""Sparse-view reconstruction: fit a NeRF to posed images (+ masks) with a photometric loss.

Grounded-Dreamer's stage 2 without the diffusion prior: every step renders a random batch of pixels from all
views and minimises ``MSE(rgb, target) + mask_weight * MSE(opacity, mask)``, where targets are the images
composited over the NeRF's background where the mask is 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .background import SolidBackground
from .cameras import Cameras
from .field import config_for_device
from .nerf import NeRF
from .rays import camera_rays
from .renderer import RenderSettings, render_rays, rays_per_chunk
from .training import (OccupancySchedule, OccupancyUpdates, ParamGroup, Step, StepDone, TrainingState,
                       load_optimizer_state, make_optimizer, set_learning_rates, train)


@dataclass(frozen=True)
class FitSettings:
    steps: int = 1000
    rays_per_step: int = 4096
    lr: float = 1e-2
    mask_weight: float = 0.1
    occupancy_interval: int = 16
    occupancy_warmup: int = 64
    seed: int = 0


@dataclass
class StepInfo:
    step: int  # 1-based index of the step just taken
    total: int
    loss: float
    psnr: float  # of the batch


def new_nerf_for_views(device: torch.device | str, background_rgb: tuple[float, float, float], samples_per_ray: int,
                       seed: int) -> NeRF:
    """A fresh NeRF for fitting to views: the device's field size, no density blob (views, not a prior, shape it),
    exp density, a solid background colour."""
    device = torch.device(device)
    return NeRF.create(config_for_device(device.type, blob_density=0.0, density_activation="exp"),
                       background=SolidBackground(background_rgb),
                       render=RenderSettings(samples_per_ray=samples_per_ray), device=device, seed=seed)


def nerf_param_groups(nerf: NeRF, lr: float) -> list[ParamGroup]:
    """Reconstruction's groups: ``"grid"`` (the hash table) at ``lr``, ``"networks"`` (the MLPs and a learned
    background) at ``lr / 10``."""
    table = [nerf.field.encoding.table]
    others = [p for n, p in nerf.field.named_parameters() if not n.startswith("encoding.")]
    others += list(nerf.background.parameters())
    return [ParamGroup("grid", table, lr), ParamGroup("networks", others, lr / 10)]


def composite_targets(images: Tensor, masks: Tensor | None, background_rgb: Tensor) -> Tensor:
    """(N, H, W, 3) images over ``background_rgb`` (3,) where the (N, H, W) mask is 0."""
    if masks is None:
        return images
    m = masks[..., None]
    return images * m + background_rgb * (1.0 - m)


@dataclass(frozen=True)
class PosedPixels:
    """Every pixel of the views as a ray with its target, flattened, on the CPU (rays are picked from here).

    origins, directions, targets: (P, 3) with P = N * H * W; masks: (P, 1) or None.
    """

    origins: Tensor
    directions: Tensor
    targets: Tensor
    masks: Tensor | None

    @classmethod
    def of_views(cls, images: Tensor, cameras: Cameras, masks: Tensor | None, background_rgb: Tensor
                 ) -> "PosedPixels":
        """``images`` (N, H, W, 3) seen by ``cameras`` (N views), ``masks`` (N, H, W) or None, composited over
        ``background_rgb`` (3,) where the mask is 0."""
        h, w = images.shape[1:3]
        origins, directions = camera_rays(cameras, h, w, device="cpu")
        masks = None if masks is None else masks.float().cpu()
        targets = composite_targets(images.float().cpu(), masks, background_rgb.detach().float().cpu())
        return cls(origins.reshape(-1, 3), directions.reshape(-1, 3), targets.reshape(-1, 3),
                   None if masks is None else masks.reshape(-1, 1))

    def __len__(self) -> int:
        return self.origins.shape[0]


@dataclass(frozen=True)
class PhotometricLoss:
    """One step's batch losses (floats, detached): ``loss`` (what was minimised) and the colour ``mse``."""

    loss: float
    mse: float

    @property
    def psnr(self) -> float:
        return -10.0 * math.log10(max(self.mse, 1e-10))


def photometric_step(nerf: NeRF, pixels: PosedPixels, step: Step, rays_per_step: int, mask_weight: float,
                     skip_empty: bool, weight: float = 1.0) -> PhotometricLoss:
    """Accumulate the gradients of one reconstruction step (a :func:`training.train` step function's body).

    Draws ``rays_per_step`` random pixels and their sample jitter (rays_per_step, S) from ``step.generator``,
    renders them in chunks of at most :data:`renderer.CHUNK_SAMPLES` samples (``step.check_interrupt()`` before
    each) and backpropagates each chunk's share, so the gradients are those of the whole batch's
    ``MSE(rgb, target) + mask_weight * MSE(opacity, mask)``, times ``weight`` (the returned losses are not
    weighted). ``skip_empty``: sample only occupied cells.
    """
    samples = nerf.render.samples_per_ray
    pick = torch.randint(0, len(pixels), (rays_per_step,), generator=step.generator)
    jitter = torch.rand(rays_per_step, samples, generator=step.generator)
    loss = mse = 0.0
    for rays in torch.arange(rays_per_step).split(rays_per_chunk(samples)):
        step.check_interrupt()
        chunk_mse, chunk_loss = _chunk_loss(nerf, pixels, pick[rays], jitter[rays], skip_empty, mask_weight)
        share = len(rays) / rays_per_step  # the batch's mean is the share-weighted chunk means
        if chunk_loss.requires_grad:  # a chunk whose samples all lie in empty cells has nothing to learn from
            (chunk_loss * (share * weight)).backward()
        loss, mse = loss + float(chunk_loss.detach()) * share, mse + float(chunk_mse.detach()) * share
    return PhotometricLoss(loss, mse)


def fit_views(nerf: NeRF, images: Tensor, cameras: Cameras, masks: Tensor | None = None,
              settings: FitSettings = FitSettings(), on_step: Callable[[StepInfo], None] | None = None,
              check_interrupt: Callable[[], None] | None = None) -> NeRF:
    """Train ``nerf`` in place on ``images`` (N, H, W, 3) in [0, 1] seen by ``cameras`` (N views).

    ``masks`` (N, H, W) in [0, 1] or None. ``on_step`` is called after every step. A step's rays are rendered
    in chunks of at most :data:`renderer.CHUNK_SAMPLES` samples whose gradients add up to the whole batch's
    (memory stays bounded for any ``rays_per_step``); ``check_interrupt`` is called before each chunk and each
    piece of an occupancy update. Either may raise to stop: the NeRF then holds the last finished step (its
    occupancy grid included). Continues from ``nerf.training`` if it holds optimiser state (at the learning
    rates of ``settings``); the random stream of a call starts from ``settings.seed + nerf.steps_trained``.
    Returns ``nerf``.
    """
    if not isinstance(nerf.background, SolidBackground):
        raise ValueError("background: fitting to views needs a NeRF with a solid background colour")
    pixels = PosedPixels.of_views(images, cameras, masks, nerf.background.rgb)
    groups = nerf_param_groups(nerf, settings.lr)
    optimizer = make_optimizer(groups)
    if "optimizer" in nerf.training:
        load_optimizer_state(optimizer, nerf.training["optimizer"])  # keeps Adam's moments...
        set_learning_rates(optimizer, {g.name: g.lr for g in groups})  # ...but the step size asked for now
    start = nerf.steps_trained
    state = TrainingState(optimizer, torch.Generator().manual_seed(settings.seed + start), start)
    # With masks the grid starts as their visual hull, so empty space is skipped from the first step;
    # without, every cell is sampled until the warm-up has shown where the density is.
    schedule = OccupancySchedule(settings.occupancy_interval, 0 if masks is not None else settings.occupancy_warmup)
    if masks is not None and start == 0:
        h, w = images.shape[1:3]
        nerf.occupancy.carve(cameras.c2w, cameras.pixel_intrinsics(h, w), masks.float().cpu())
    occupancy = OccupancyUpdates(nerf.occupancy, nerf.field.density, nerf.occupancy_threshold(), schedule)

    def step_fn(step: Step) -> PhotometricLoss:
        return photometric_step(nerf, pixels, step, settings.rays_per_step, settings.mask_weight,
                                schedule.skips_empty(step.index))

    def finished(done: StepDone[PhotometricLoss]) -> None:
        nerf.training = {"steps": done.step, "optimizer": optimizer.state_dict()}
        if on_step is not None:
            on_step(StepInfo(done.count, done.total, done.result.loss, done.result.psnr))

    nerf.field.train()
    try:
        train(state, step_fn, settings.steps, occupancy=occupancy, on_step=finished, check_interrupt=check_interrupt)
    finally:
        nerf.field.eval()
    return nerf


def _chunk_loss(nerf: NeRF, pixels: PosedPixels, pick: Tensor, jitter: Tensor, skip_empty: bool,
                mask_weight: float) -> tuple[Tensor, Tensor]:
    """Photometric MSE and total loss of the rays ``pick`` (R,) of ``pixels``, sampled at ``jitter`` (R, S).
    Differentiable w.r.t. the field (and a learned background)."""
    device = nerf.device
    out = render_rays(nerf.field, nerf.background, pixels.origins[pick].to(device),
                      pixels.directions[pick].to(device), nerf.render.samples_per_ray,
                      occupancy=nerf.occupancy if skip_empty else None, jitter=jitter)
    mse = F.mse_loss(out["features"], pixels.targets[pick].to(device))
    loss = mse
    if pixels.masks is not None and mask_weight > 0:
        loss = loss + mask_weight * F.mse_loss(out["opacity"], pixels.masks[pick].to(device))
    return mse, loss
