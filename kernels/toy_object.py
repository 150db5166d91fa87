"""A built-in synthetic object with exact renders and an exact surface: the demo's and the tests' ground truth.

A toy made of solids: a body sphere, a head sphere and a flat box base. Rays are intersected analytically
(the first entry point into any solid is on the union's surface, since cameras are outside all solids), so
renders are exact; surface points are sampled on each solid's surface, keeping those not inside another
solid. Colours are smooth functions of position (bands and gradients), so they can be learned and baked.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .cameras import Cameras
from .rays import camera_rays, ray_aabb

#: (centre, radius) of the spheres
SPHERES = (((0.0, -0.05, 0.0), 0.42), ((0.0, 0.48, 0.05), 0.24))
#: (min corner, max corner) of the boxes
BOXES = (((-0.5, -0.62, -0.4), (0.5, -0.42, 0.4)),)


#: The toy's parts, named as a prompt would: the head sphere, the body sphere's left (x < 0) and right halves,
#: and the base box. The body is cut in two so that part maps are not the same from every side.
TOY_PARTS = ("head", "left side", "right side", "base")


def surface_color(points: Tensor) -> Tensor:
    """(P, 3) surface points -> (P, 3) rgb in [0, 1]: smooth bands on the body, warm head, wood-like base."""
    x, y, z = points.unbind(-1)
    azimuth = torch.atan2(x, z)
    body = torch.stack([0.55 + 0.35 * torch.cos(2 * azimuth), 0.45 + 0.3 * torch.sin(3 * y + 1.0),
                        0.6 + 0.3 * torch.sin(azimuth)], dim=-1)
    head = torch.stack([0.95 - 0.3 * (y - 0.48), 0.6 + 0.25 * torch.cos(4 * x), 0.25 + 0.2 * z], dim=-1)
    base = torch.stack([0.55 + 0.15 * torch.sin(6 * x), 0.35 + 0.1 * torch.sin(6 * x), 0.2 + 0.1 * z], dim=-1)
    color = torch.where((y > 0.3)[:, None], head, body)
    color = torch.where((y < -0.40)[:, None], base, color)
    return color.clamp(0.0, 1.0)


def _ray_sphere(origins: Tensor, directions: Tensor, centre: tuple, radius: float) -> Tensor:
    """(R,) entry distance of unit-direction rays into a sphere, inf where missed."""
    oc = origins - torch.tensor(centre, dtype=origins.dtype)
    b = (oc * directions).sum(-1)
    c = (oc * oc).sum(-1) - radius * radius
    disc = b * b - c
    t = -b - torch.sqrt(disc.clamp_min(0.0))
    return torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))


def _ray_box(origins: Tensor, directions: Tensor, lo: tuple, hi: tuple) -> Tensor:
    aabb = torch.tensor([lo, hi], dtype=origins.dtype)
    t_near, _, hit = ray_aabb(origins, directions, aabb, near=1e-6)
    return torch.where(hit, t_near, torch.full_like(t_near, math.inf))


def render_toy_object(cameras: Cameras, height: int, width: int,
                       background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[Tensor, Tensor, Tensor]:
    """Exact renders of the object.

    Returns:
        rgb: (N, H, W, 3) float32 in [0, 1], composited over ``background``.
        mask: (N, H, W) float32, 1 where a ray hits the object.
        depth: (N, H, W) float32 distance along the ray to the surface (0 where missed).
    """
    origins, directions = camera_rays(cameras, height, width, device="cpu")
    o, d = origins.reshape(-1, 3).double(), directions.reshape(-1, 3).double()
    hits = [_ray_sphere(o, d, c, r) for c, r in SPHERES] + [_ray_box(o, d, lo, hi) for lo, hi in BOXES]
    t = torch.stack(hits, dim=-1).amin(dim=-1)
    hit = torch.isfinite(t)
    points = o + d * torch.where(hit, t, torch.zeros_like(t))[:, None]
    rgb = torch.where(hit[:, None], surface_color(points.float()).double(),
                      torch.tensor(background, dtype=torch.float64))
    n = len(cameras)
    return (rgb.float().view(n, height, width, 3), hit.float().view(n, height, width),
            torch.where(hit, t, torch.zeros_like(t)).float().view(n, height, width))


def render_toy_part_maps(cameras: Cameras, height: int, width: int) -> Tensor:
    """Exact part maps: (N, K, H, W) float32, 1 where the ray's first hit is on part k (:data:`TOY_PARTS`),
    0 elsewhere (and everywhere for rays that miss the object)."""
    origins, directions = camera_rays(cameras, height, width, device="cpu")
    o, d = origins.reshape(-1, 3).double(), directions.reshape(-1, 3).double()
    body, head = (_ray_sphere(o, d, c, r) for c, r in SPHERES)
    base = _ray_box(o, d, *BOXES[0])
    t, solid = torch.stack([body, head, base], dim=-1).min(dim=-1)  # solid: 0 body, 1 head, 2 base
    hit = torch.isfinite(t)
    x = (o + d * torch.where(hit, t, torch.zeros_like(t))[:, None])[:, 0]
    label = torch.where(solid == 1, 0, torch.where(solid == 2, 3, torch.where(x < 0, 1, 2)))
    maps = torch.nn.functional.one_hot(label, len(TOY_PARTS)).double() * hit[:, None]
    return maps.float().T.reshape(len(TOY_PARTS), len(cameras), height, width).transpose(0, 1).contiguous()


def inside_object(points: Tensor, margin: float = 0.0) -> Tensor:
    """(P, 3) -> (P,) bool, the point lies inside some solid by more than ``margin``."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for c, r in SPHERES:
        inside |= (points - torch.tensor(c, dtype=points.dtype)).norm(dim=-1) < r - margin
    for lo, hi in BOXES:
        lo_t, hi_t = torch.tensor(lo, dtype=points.dtype), torch.tensor(hi, dtype=points.dtype)
        inside |= ((points > lo_t + margin) & (points < hi_t - margin)).all(dim=-1)
    return inside


def sample_surface(count: int, seed: int = 0) -> np.ndarray:
    """About ``count`` points (P, 3) float64 uniformly spread over the object's outer surface."""
    gen = torch.Generator().manual_seed(seed)
    areas = [4 * math.pi * r * r for _, r in SPHERES]
    for lo, hi in BOXES:
        e = np.subtract(hi, lo)
        areas.append(2 * (e[0] * e[1] + e[1] * e[2] + e[0] * e[2]))
    total = sum(areas)
    parts = []
    for (c, r), a in zip(SPHERES, areas):
        k = int(count * 1.5 * a / total)
        v = torch.nn.functional.normalize(torch.randn(k, 3, generator=gen, dtype=torch.float64), dim=-1)
        parts.append(v * r + torch.tensor(c, dtype=torch.float64))
    for (lo, hi), a in zip(BOXES, areas[len(SPHERES):]):
        lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
        e = hi_t - lo_t
        face_areas = torch.tensor([e[1] * e[2], e[0] * e[2], e[0] * e[1]] * 2)
        k = int(count * 1.5 * a / total)
        face = torch.multinomial(face_areas, k, replacement=True, generator=gen)
        p = lo_t + torch.rand(k, 3, generator=gen, dtype=torch.float64) * e
        axis = face % 3
        side = torch.where(face < 3, lo_t[axis], hi_t[axis])
        p[torch.arange(k), axis] = side
        parts.append(p)
    points = torch.cat(parts)
    points = points[~inside_object(points, margin=1e-9)]
    keep = torch.randperm(points.shape[0], generator=gen)[:count]
    return points[keep].numpy()
