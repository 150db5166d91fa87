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
from .nerf import NeRF
from .rays import camera_rays
from .renderer import render_rays, rays_per_chunk


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


def make_optimizer(nerf: NeRF, lr: float) -> torch.optim.Optimizer:
    """Adam with the hash tables at ``lr`` and the MLPs at ``lr / 10`` (Instant-NGP style eps)."""
    table = [nerf.field.encoding.table]
    others = [p for n, p in nerf.field.named_parameters() if not n.startswith("encoding.")]
    others += list(nerf.background.parameters())
    return torch.optim.Adam([{"params": table, "lr": lr}, {"params": others, "lr": lr / 10}],
                            betas=(0.9, 0.99), eps=1e-15)


def composite_targets(images: Tensor, masks: Tensor | None, background_rgb: Tensor) -> Tensor:
    """(N, H, W, 3) images over ``background_rgb`` (3,) where the (N, H, W) mask is 0."""
    if masks is None:
        return images
    m = masks[..., None]
    return images * m + background_rgb * (1.0 - m)


def fit_views(nerf: NeRF, images: Tensor, cameras: Cameras, masks: Tensor | None = None,
              settings: FitSettings = FitSettings(), on_step: Callable[[StepInfo], None] | None = None,
              check_interrupt: Callable[[], None] | None = None) -> NeRF:
    """Train ``nerf`` in place on ``images`` (N, H, W, 3) in [0, 1] seen by ``cameras`` (N views).

    ``masks`` (N, H, W) in [0, 1] or None. ``on_step`` is called after every step. A step's rays are rendered
    in chunks of at most :data:`renderer.CHUNK_SAMPLES` samples whose gradients add up to the whole batch's
    (memory stays bounded for any ``rays_per_step``); ``check_interrupt`` is called before each chunk and each
    piece of an occupancy update. Either may raise to stop: the NeRF then holds the last finished step.
    Continues from ``nerf.training`` if it holds optimiser state. Returns ``nerf``.
    """
    device = nerf.device
    gen = torch.Generator().manual_seed(settings.seed + nerf.steps_trained)
    n, h, w, _ = images.shape
    origins, directions = camera_rays(cameras, h, w, device="cpu")
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    if not isinstance(nerf.background, SolidBackground):
        raise ValueError("background: fitting to views needs a NeRF with a solid background colour")
    bg_rgb = nerf.background.rgb.detach().float().cpu()
    targets = composite_targets(images.float().cpu(), None if masks is None else masks.float().cpu(), bg_rgb)
    targets = targets.reshape(-1, 3)
    mask_flat = None if masks is None else masks.float().cpu().reshape(-1, 1)

    optimizer = make_optimizer(nerf, settings.lr)
    if "optimizer" in nerf.training:
        optimizer.load_state_dict(nerf.training["optimizer"])  # keeps Adam's moments...
        for group, lr in zip(optimizer.param_groups, (settings.lr, settings.lr / 10)):
            group["lr"] = lr  # ...but the step size asked for now
    start = nerf.steps_trained
    threshold = nerf.occupancy_threshold()
    # With masks the grid starts as their visual hull, so empty space is skipped from the first step;
    # without, every cell is sampled until the warm-up has shown where the density is.
    warmup = settings.occupancy_warmup
    if masks is not None:
        if start == 0:
            nerf.occupancy.carve(cameras.c2w, cameras.pixel_intrinsics(h, w), masks.float().cpu())
        warmup = 0
    samples = nerf.render.samples_per_ray
    chunk = rays_per_chunk(samples)
    density = nerf.field.density
    if check_interrupt is not None:
        def density(points: Tensor) -> Tensor:
            check_interrupt()
            return nerf.field.density(points)
    nerf.field.train()
    for i in range(settings.steps):
        step = start + i
        if step >= warmup and step % settings.occupancy_interval == 0 and step > 0:
            fraction = 1.0 if step == max(warmup, settings.occupancy_interval) else 0.25
            nerf.occupancy.update(density, threshold, fraction=fraction, generator=gen)
        pick = torch.randint(0, origins.shape[0], (settings.rays_per_step,), generator=gen)
        jitter = torch.rand(settings.rays_per_step, samples, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss = mse = 0.0
        for rays in torch.arange(settings.rays_per_step).split(chunk):
            if check_interrupt is not None:
                check_interrupt()
            chunk_mse, chunk_loss = _chunk_loss(nerf, origins, directions, targets, mask_flat, pick[rays],
                                                jitter[rays], step >= warmup, settings.mask_weight)
            share = len(rays) / settings.rays_per_step  # the batch's mean is the share-weighted chunk means
            (chunk_loss * share).backward()
            loss, mse = loss + float(chunk_loss.detach()) * share, mse + float(chunk_mse.detach()) * share
        optimizer.step()
        nerf.training = {"steps": step + 1, "optimizer": optimizer.state_dict()}
        if on_step is not None:
            on_step(StepInfo(i + 1, settings.steps, loss, -10.0 * math.log10(max(mse, 1e-10))))
    nerf.field.eval()
    return nerf


def _chunk_loss(nerf: NeRF, origins: Tensor, directions: Tensor, targets: Tensor, masks: Tensor | None,
                pick: Tensor, jitter: Tensor, skip_empty: bool, mask_weight: float) -> tuple[Tensor, Tensor]:
    """Photometric MSE and total loss of the rays ``pick`` (R,) of the flattened views, sampled at ``jitter``
    (R, S). origins/directions/targets: (P, 3) on the CPU; masks (P, 1) or None. Differentiable w.r.t. the
    field (and a learned background)."""
    device = nerf.device
    out = render_rays(nerf.field, nerf.background, origins[pick].to(device), directions[pick].to(device),
                      nerf.render.samples_per_ray, occupancy=nerf.occupancy if skip_empty else None,
                      jitter=jitter)
    mse = F.mse_loss(out["rgb"], targets[pick].to(device))
    loss = mse
    if masks is not None and mask_weight > 0:
        loss = loss + mask_weight * F.mse_loss(out["opacity"], masks[pick].to(device))
    return mse, loss
