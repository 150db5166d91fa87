"""Renderer: rays -> samples in the field's box -> field -> volume rendering, batched and chunked.

Any field with C feature channels renders: RGB radiance fields have C = 3, a part field C = K part affinities.
A field is a module with ``aabb`` (2, 3), ``channels`` (C), ``field(x) -> (density (P,), features (P, C))`` and,
for normals, ``field.normals(x) -> (P, 3)``; a background maps ray directions (R, 3) to (R, C).

Samples are stratified: each ray's segment inside the box is cut into ``samples_per_ray`` equal intervals and
each interval is sampled once (at its middle, or at a random point when ``perturb``). Samples in empty
occupancy-grid cells are not evaluated. ``render_views`` renders whole images in chunks of rays so large
renders keep a bounded memory footprint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .cameras import Cameras
from .checks import check_shape
from .field import RadianceField
from .occupancy import OccupancyGrid
from .rays import camera_rays, ray_aabb
from .volume_rendering import accumulate, render_weights


#: Most samples (rays x samples per ray) put through the field at once. Rendering and training cut larger batches
#: into chunks of this size, which bounds memory and the time between two interrupt checks whatever the image
#: size or rays per step. On two CPU cores a chunk takes about 0.04-0.08 s of training or 0.25 s of rendering
#: with normals, and big steps get faster, not slower (scripts/bench_interrupts.py).
CHUNK_SAMPLES = 1 << 16


def rays_per_chunk(samples_per_ray: int, limit: int | None = None) -> int:
    """Rays in one chunk of at most :data:`CHUNK_SAMPLES` samples (at least 1, at most ``limit``)."""
    rays = max(1, CHUNK_SAMPLES // max(1, samples_per_ray))
    return rays if limit is None else max(1, min(rays, limit))


@dataclass(frozen=True)
class RenderSettings:
    samples_per_ray: int = 96
    chunk_rays: int = 8192


def render_rays(field: RadianceField, background: nn.Module, origins: Tensor, directions: Tensor,
                samples_per_ray: int, occupancy: OccupancyGrid | None = None, perturb: bool = False,
                with_normals: bool = False, generator: torch.Generator | None = None,
                jitter: Tensor | None = None, with_orientation: bool = False) -> dict[str, Tensor]:
    """Render R rays.

    Args:
        origins, directions: (R, 3); directions unit length.
        samples_per_ray: S intervals per ray inside the box.
        occupancy: skip samples in its empty cells (None: evaluate all).
        perturb: random position inside each interval (training) instead of its middle.
        jitter: (R, S) positions inside the intervals in [0, 1) to use instead of drawing them (``perturb``
            is then ignored); lets a caller draw one batch's randomness once and render it in chunks.
        with_normals: also render normals (one extra density-gradient pass, no graph).
        with_orientation: also return ``orientation`` (R,), the orientation penalty of each ray
            ``sum_i w_i * max(0, n_i . d)^2`` (weights detached) with normals from central differences of the
            density (six more density evaluations per sample), differentiable w.r.t. the field: it penalises
            surfaces that face away from the camera (Ref-NeRF / DreamFusion's orientation loss).

    Returns dict of: ``features`` (R, C) the field's C channels accumulated over the background's (RGB for a
    radiance field), ``opacity`` (R, 1), ``depth`` (R, 1) expected distance along the ray (0 where nothing is
    hit), ``normal`` (R, 3) weighted world-space normals if asked, and ``samples`` (the number of field
    evaluations, for benchmarks). features/opacity/depth are differentiable w.r.t. the field (and background).
    """
    r, s, c = origins.shape[0], samples_per_ray, field.channels
    device = origins.device
    t_near, t_far, hit = ray_aabb(origins, directions, field.aabb)
    t_far = torch.where(hit, t_far, t_near)
    edges = torch.linspace(0.0, 1.0, s + 1, device=device)
    span = (t_far - t_near)[:, None]
    t_starts = t_near[:, None] + span * edges[:-1]
    t_ends = t_near[:, None] + span * edges[1:]
    if jitter is not None:
        u = jitter.to(device=device, dtype=origins.dtype)
    elif perturb:
        u = torch.rand(r, s, generator=generator, device="cpu" if generator is not None else device).to(device)
    else:
        u = torch.full((r, s), 0.5, device=device)
    t_mid = t_starts + (t_ends - t_starts) * u
    points = origins[:, None, :] + directions[:, None, :] * t_mid[..., None]  # (R, S, 3)
    valid = hit[:, None].expand(r, s)
    if occupancy is not None:
        valid = valid & occupancy.query(points.reshape(-1, 3)).view(r, s)
    flat = points[valid]
    sigmas = torch.zeros(r, s, device=device, dtype=points.dtype)
    features = torch.zeros(r, s, c, device=device, dtype=points.dtype)
    if flat.shape[0] > 0:
        sigma_v, features_v = field(flat)
        check_shape("field features", features_v, ("P", c), sizes={"P": flat.shape[0]},
                    note=f" (the field has {c} channels)")
        sigmas = sigmas.masked_scatter(valid, sigma_v)
        features = features.masked_scatter(valid[..., None].expand(r, s, c), features_v)
    behind = background(directions)
    check_shape("background", behind, ("R", c), sizes={"R": r}, note=" (one value per channel of the field)")
    weights, _, _ = render_weights(t_starts, t_ends, sigmas)
    opacity = accumulate(weights)
    out = {
        "features": accumulate(weights, features) + (1.0 - opacity) * behind,
        "opacity": opacity,
        "depth": accumulate(weights, t_mid[..., None]),
        "samples": torch.tensor(flat.shape[0]),
    }
    if with_orientation:
        facing = torch.zeros(r, s, device=device, dtype=points.dtype)
        if flat.shape[0] > 0:
            normals_v = difference_normals(field, flat, float((field.aabb[1] - field.aabb[0]).max()) / (2 * s))
            dirs = directions[:, None, :].expand(r, s, 3)[valid]
            facing = facing.masked_scatter(valid, (normals_v * dirs).sum(-1).clamp_min(0.0).pow(2))
        out["orientation"] = (weights.detach() * facing).sum(dim=-1)
    if with_normals:
        normals = torch.zeros(r, s, 3, device=device, dtype=points.dtype)
        if flat.shape[0] > 0:
            normals = normals.masked_scatter(valid[..., None].expand(r, s, 3), field.normals(flat))
        out["normal"] = accumulate(weights.detach(), normals)
    return out


def difference_normals(field: RadianceField, points: Tensor, step: float) -> Tensor:
    """(P, 3) unit normals ``-grad density`` by central differences of half-width ``step``, differentiable
    w.r.t. the field (unlike ``field.normals``, which detaches)."""
    step = max(step, 1e-4)
    offsets = torch.eye(3, device=points.device, dtype=points.dtype) * step  # (3, 3)
    probes = torch.cat([points[:, None, :] + offsets, points[:, None, :] - offsets], dim=1)  # (P, 6, 3)
    density = field.density(probes.reshape(-1, 3)).reshape(-1, 2, 3)
    grad = (density[:, 0] - density[:, 1]) / (2 * step)
    return torch.nn.functional.normalize(-grad, dim=-1)


@torch.no_grad()
def render_views(field: RadianceField, background: nn.Module, cameras: Cameras, height: int, width: int,
                 settings: RenderSettings = RenderSettings(), occupancy: OccupancyGrid | None = None,
                 with_normals: bool = True, on_progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, Tensor]:
    """Render every camera at ``height x width``; returns CPU tensors ``features`` (N, H, W, C), ``opacity``
    (N, H, W), ``depth`` (N, H, W) and ``normal`` (N, H, W, 3). Rays are made one view at a time and go
    through the field in chunks of at most ``settings.chunk_rays`` rays and :data:`CHUNK_SAMPLES` samples, so
    device memory is bounded by one view's rays and one chunk's samples; ``on_progress(done_rays, total_rays)``
    is called after each chunk (it may raise to stop)."""
    device = next(field.parameters()).device
    n = len(cameras)
    per_view = height * width
    total = n * per_view
    keys = ("features", "opacity", "depth") + (("normal",) if with_normals else ())
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    chunk = rays_per_chunk(settings.samples_per_ray, settings.chunk_rays)
    for view in range(n):
        origins, directions = camera_rays(cameras[view], height, width, device=device)
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        for start in range(0, per_view, chunk):
            sl = slice(start, start + chunk)
            out = render_rays(field, background, origins[sl], directions[sl], settings.samples_per_ray,
                              occupancy=occupancy, with_normals=with_normals)
            for k in keys:
                parts[k].append(out[k].float().cpu())
            if on_progress is not None:
                on_progress(view * per_view + min(start + chunk, per_view), total)
    result = {k: torch.cat(v).view(n, height, width, -1) for k, v in parts.items()}
    result["opacity"] = result["opacity"].squeeze(-1)
    result["depth"] = result["depth"].squeeze(-1)
    return result
