"""Score distillation maths (MVDream's multi-view SDS): schedules, random camera batches and the two losses.

Everything here is framework-free: the diffusion model's predictions come in as tensors, in the k-diffusion
parameterisation ComfyUI uses (``x = z + sigma * eps``; a prediction is the denoised ``x0``).

- :class:`Anneal`: a value interpolated linearly between two steps (threestudio's ``[start_step, start_value,
  end_value, end_step]``), :class:`TimestepRange` two of them (t min and t max as fractions of the training
  timesteps) and :func:`sample_timestep` one t per batch.
- :class:`ResolutionSchedule`: render size and batch per step (64 px x 8 views, then 256 px x 4).
- :class:`CameraRanges` / :func:`sample_cameras`: objects of ``views`` cameras, each object with one elevation,
  fov and distance (``distance / tan(fov / 2)``) and azimuths evenly spaced from a random start.
- :func:`x0_reconstruction_loss` (MVDream's, with std rescale) and :func:`classic_sds_loss` (``w(t) (eps_hat -
  eps)``), both written so that backward gives the latents the SDS gradient divided by the batch size, as the
  official code does.

Reference: MVDream-threestudio (``mvdream_guidance.py``, ``random_multiview.py``, ``mvdream-sd21.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cameras import Cameras, spherical_cameras
from .checks import check_int_range, check_range, check_shape


# ------------------------------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class Anneal:
    """``start_value`` until ``start_step``, then linear to ``end_value`` at ``end_step``, constant after.

    >>> Anneal(0.98, 0.5, 0, 8000).at(4000)
    0.74
    """

    start_value: float
    end_value: float
    start_step: int = 0
    end_step: int = 0

    def at(self, step: int) -> float:
        if self.end_step <= self.start_step:
            return self.end_value if step >= self.end_step else self.start_value
        u = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        return self.start_value + (self.end_value - self.start_value) * u


@dataclass(frozen=True)
class TimestepRange:
    """t min and t max as fractions of the model's training timesteps (e.g. 1000), each annealed.

    MVDream: min 0.98 -> 0.02 and max 0.98 -> 0.50 over the first 8000 of 10000 steps.
    """

    low: Anneal
    high: Anneal

    @classmethod
    def mvdream(cls, anneal_steps: int = 8000, start_step: int = 0, low=(0.98, 0.02), high=(0.98, 0.50)
                ) -> "TimestepRange":
        return cls(Anneal(low[0], low[1], start_step, start_step + anneal_steps),
                   Anneal(high[0], high[1], start_step, start_step + anneal_steps))

    def bounds(self, step: int, timesteps: int) -> tuple[int, int]:
        """Integer (t_min, t_max) at ``step`` for a model trained on ``timesteps`` steps (threestudio rounds
        both down: ``int(timesteps * fraction)``), with t_min <= t_max, both in [1, timesteps - 1]."""
        lo = int(timesteps * self.low.at(step))
        hi = int(timesteps * self.high.at(step))
        lo = min(max(lo, 1), timesteps - 1)
        hi = min(max(hi, lo), timesteps - 1)
        return lo, hi


def sample_timestep(bounds: tuple[int, int], generator: torch.Generator) -> int:
    """One integer t uniform in [t_min, t_max] (both included), shared by the whole batch."""
    lo, hi = bounds
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


@dataclass(frozen=True)
class ResolutionSchedule:
    """Render size and batch per step: ``stages`` ((first step, size px, batch), ...) sorted by first step.

    >>> s = ResolutionSchedule(((0, 64, 8), (5000, 256, 4)))
    >>> s.at(4999), s.at(5000)
    ((64, 8), (256, 4))
    """

    stages: tuple[tuple[int, int, int], ...] = ((0, 64, 8), (5000, 256, 4))

    def at(self, step: int) -> tuple[int, int]:
        size, batch = self.stages[0][1:]
        for first, s, b in self.stages:
            if step >= first:
                size, batch = s, b
        return size, batch

    def largest(self) -> tuple[int, int]:
        """The (size, batch) with the most pixels (for memory estimates)."""
        return max(((s, b) for _, s, b in self.stages), key=lambda sb: sb[0] * sb[0] * sb[1])


# --------------------------------------------------------------------------------------------------- cameras

@dataclass(frozen=True)
class CameraRanges:
    """Ranges cameras are drawn from (degrees; distances in scene units before the fov scaling).

    MVDream: elevation 0-30, fovy 15-60, distance 0.8-1.0 scaled by ``1 / tan(fov / 2)`` (so the object keeps
    its size in the image whatever the fov), 4 views per object.
    """

    elevation: tuple[float, float] = (0.0, 30.0)
    fov: tuple[float, float] = (15.0, 60.0)
    distance: tuple[float, float] = (0.8, 1.0)
    relative_distance: bool = True
    views: int = 4

    def __post_init__(self):
        for name, (lo, hi) in (("elevation", self.elevation), ("fov", self.fov), ("distance", self.distance)):
            if not lo <= hi:
                raise ValueError(f"{name}: the range's minimum {lo:g} is above its maximum {hi:g}")
        check_range("elevation", self.elevation[0], -90.0, 90.0, low_open=True, high_open=True, unit="degrees")
        check_range("elevation", self.elevation[1], -90.0, 90.0, low_open=True, high_open=True, unit="degrees")
        check_range("fov", self.fov[0], 0.0, 180.0, low_open=True, high_open=True, unit="degrees")
        check_range("fov", self.fov[1], 0.0, 180.0, low_open=True, high_open=True, unit="degrees")
        check_range("distance", self.distance[0], 0.0, 1e4, low_open=True)
        check_int_range("views", self.views, 1, 64)

    def distance_of(self, distance: Tensor, fov_deg: Tensor) -> Tensor:
        """The camera distance for drawn ``distance`` and ``fov_deg`` (both (N,), float64)."""
        if not self.relative_distance:
            return distance
        return distance / torch.tan(torch.deg2rad(fov_deg) / 2)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_cameras(batch: int, ranges: CameraRanges, generator: torch.Generator) -> Cameras:
    """``batch`` cameras: ``batch / ranges.views`` objects of ``ranges.views`` contiguous views.

    Per object one elevation, fov and distance (uniform in their ranges) and one azimuth start u in [0, 1): view
    i sits at azimuth ``(u + i) / views * 360 - 180`` degrees (MVDream's random multi-view camera sampler). The
    draws come from ``generator`` in a fixed order (elevation, azimuth start, fov, distance).
    """
    views = ranges.views
    if batch % views:
        raise ValueError(f"batch: {batch} cameras are not a whole number of objects of {views} views")
    objects = batch // views
    elevation = _uniform(objects, *ranges.elevation, generator)
    start = torch.rand(objects, generator=generator, dtype=torch.float64)
    fov = _uniform(objects, *ranges.fov, generator)
    distance = ranges.distance_of(_uniform(objects, *ranges.distance, generator), fov)
    azimuth = ((start[:, None] + torch.arange(views, dtype=torch.float64)) / views * 360.0 - 180.0).reshape(-1)
    elevation, fov, distance = (v.repeat_interleave(views) for v in (elevation, fov, distance))
    return spherical_cameras(elevation, azimuth, distance, fov)


# ---------------------------------------------------------------------------------------------------- losses

def noised(latents: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """``latents + sigma * noise``: the latents noised to ``sigma`` (k-diffusion / ComfyUI parameterisation;
    the DDPM-normalised input is this times ``1 / sqrt(1 + sigma^2)``)."""
    return latents + sigma * noise


def eps_of(x_noisy: Tensor, x0: Tensor, sigma: float) -> Tensor:
    """The noise a prediction ``x0`` implies at ``x_noisy``: ``(x_noisy - x0) / sigma``."""
    return (x_noisy - x0) / sigma


def sds_weight(sigma: float) -> float:
    """``w(t) = 1 - alpha_bar_t`` with ``alpha_bar = 1 / (1 + sigma^2)``: ``sigma^2 / (1 + sigma^2)``."""
    return sigma * sigma / (1.0 + sigma * sigma)


def std_rescale_factor(x0_cond: Tensor, x0_cfg: Tensor, views: int) -> Tensor:
    """(B, 1, 1, 1) per object of ``views`` latents: ``(std(x0_cond) + 1e-8) / (std(x0_cfg) + 1e-8)``, the std
    taken over the object's views and all latent elements (unbiased, as ``torch.std``)."""
    b = x0_cfg.shape[0]
    if b % views:
        raise ValueError(f"latents: a batch of {b} is not a whole number of objects of {views} views")
    cond = x0_cond.reshape(b // views, -1).std(dim=1)
    cfg = x0_cfg.reshape(b // views, -1).std(dim=1)
    factor = (cond + 1e-8) / (cfg + 1e-8)
    return factor.repeat_interleave(views).reshape(b, 1, 1, 1)


def x0_reconstruction_target(x0_cfg: Tensor, x0_cond: Tensor, views: int, rescale: float) -> Tensor:
    """MVDream's target ``rescale * factor * x0_cfg + (1 - rescale) * x0_cfg`` (detached); rescale 0 is x0_cfg."""
    x0_cfg, x0_cond = x0_cfg.detach(), x0_cond.detach()
    if rescale <= 0:
        return x0_cfg
    factor = std_rescale_factor(x0_cond, x0_cfg, views)
    return rescale * (x0_cfg * factor) + (1.0 - rescale) * x0_cfg


def x0_reconstruction_loss(latents: Tensor, x0_cfg: Tensor, x0_cond: Tensor, views: int,
                           rescale: float = 0.5) -> Tensor:
    """MVDream's x0-reconstruction SDS: ``0.5 * sum((z - target)^2) / B`` with the target of
    :func:`x0_reconstruction_target`.

    Args:
        latents: (B, C, h, w) the encoded renders z, differentiable.
        x0_cfg: (B, C, h, w) the denoised prediction with classifier-free guidance.
        x0_cond: (B, C, h, w) the conditional denoised prediction (no guidance), for the std rescale.
        views: views per object (the rescale factor is computed per object).
        rescale: 0.5 in MVDream; 0 turns the rescale off.
    """
    check_shape("x0_cfg", x0_cfg, tuple(latents.shape))
    target = x0_reconstruction_target(x0_cfg, x0_cond, views, rescale).to(latents.dtype)
    return 0.5 * (latents - target).pow(2).sum() / latents.shape[0]


def classic_sds_loss(latents: Tensor, eps_cfg: Tensor, noise: Tensor, weight: float) -> Tensor:
    """Classic SDS written as a loss whose gradient w.r.t. ``latents`` (B, C, h, w) is
    ``weight * (eps_cfg - noise) / B`` (non-finite entries of the gradient set to 0, as threestudio)."""
    check_shape("eps_cfg", eps_cfg, tuple(latents.shape))
    grad = torch.nan_to_num(weight * (eps_cfg.detach() - noise.detach())).to(latents.dtype)
    target = (latents - grad).detach()
    return 0.5 * (latents - target).pow(2).sum() / latents.shape[0]


# ------------------------------------------------------------------------------------------- regularisers

def sparsity_loss(opacity: Tensor) -> Tensor:
    """Mean ``sqrt(opacity^2 + 0.01)`` over rays: pushes empty space to be empty (threestudio's sparsity)."""
    return (opacity.pow(2) + 0.01).sqrt().mean()


def opaque_loss(opacity: Tensor) -> Tensor:
    """Mean binary entropy of the (clamped) opacity: pushes every ray to be fully empty or fully opaque."""
    o = opacity.clamp(1e-3, 1.0 - 1e-3)
    return -(o * o.log() + (1 - o) * (1 - o).log()).mean()

