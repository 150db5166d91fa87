"""Rays: pixel rays of a camera rig and their intersection with an axis-aligned box.

Pixel (row i, column j) is sampled at its centre (j + 0.5, i + 0.5). Camera frame is OpenGL (x right, y up,
looking along -z), so image rows grow downwards while camera y grows upwards (see kernels/cameras.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cameras import Cameras


def camera_rays(cameras: Cameras, height: int, width: int, device: torch.device | str | None = None
                ) -> tuple[Tensor, Tensor]:
    """Rays through every pixel centre of every camera.

    Returns:
        origins: (N, H, W, 3) float32 world-space camera centres.
        directions: (N, H, W, 3) float32 unit world-space directions.
    """
    device = device if device is not None else cameras.c2w.device
    k = cameras.pixel_intrinsics(height, width).to(device)
    c2w = cameras.c2w.to(device)
    rows = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    cols = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    v, u = torch.meshgrid(rows, cols, indexing="ij")  # (H, W)
    fx, fy = k[:, 0, 0].view(-1, 1, 1), k[:, 1, 1].view(-1, 1, 1)
    cx, cy = k[:, 0, 2].view(-1, 1, 1), k[:, 1, 2].view(-1, 1, 1)
    x = (u - cx) / fx
    y = -(v - cy) / fy
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (N, H, W, 3)
    d_world = torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], d_cam)
    directions = torch.nn.functional.normalize(d_world, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return origins.contiguous(), directions.contiguous()


def ray_aabb(origins: Tensor, directions: Tensor, aabb: Tensor, near: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays against the box ``aabb`` (2, 3) = (min corner, max corner).

    Args:
        origins, directions: (..., 3) rays (directions need not be unit; t is in their units).
        near: smallest allowed t.

    Returns:
        t_near, t_far: (...) entry and exit distances (t_near >= near); undefined where ``hit`` is False.
        hit: (...) bool, the ray crosses the box beyond ``near``.
    """
    tiny = 1e-9
    safe = torch.where(directions.abs() < tiny, torch.full_like(directions, tiny).copysign(directions), directions)
    inv = 1.0 / safe
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far, t_far > t_near
