"""Occupancy grid for empty-space skipping, in plain torch (nerfacc's estimator needs a CUDA build).

A ``resolution^3`` grid over the field's box keeps an exponential moving maximum of the density seen in each
cell; cells whose value exceeds a threshold are "occupied". Samples in unoccupied cells are skipped: they
would get (near) zero weight anyway.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class OccupancyGrid(nn.Module):
    """Args: aabb (2, 3) box; resolution: cells per axis. Starts fully occupied."""

    def __init__(self, aabb: Tensor, resolution: int = 64):
        super().__init__()
        self.resolution = resolution
        self.register_buffer("aabb", aabb.clone().float())
        self.register_buffer("density", torch.zeros(resolution ** 3))
        self.register_buffer("occupied", torch.ones(resolution ** 3, dtype=torch.bool))
        # Cells that may ever be occupied (e.g. the visual hull of masks); updates never leave it.
        self.register_buffer("allowed", torch.ones(resolution ** 3, dtype=torch.bool))

    def cell_index(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(P, 3) points -> flat cell index (P,) long and inside-the-box flag (P,) bool."""
        unit = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        ijk = (unit * self.resolution).long().clamp(0, self.resolution - 1)
        r = self.resolution
        return ijk[:, 0] * r * r + ijk[:, 1] * r + ijk[:, 2], inside

    def query(self, x: Tensor) -> Tensor:
        """(P, 3) -> (P,) bool: the point is inside the box and its cell is occupied."""
        index, inside = self.cell_index(x)
        return inside & self.occupied[index]

    def cell_centers(self, index: Tensor, jitter: Tensor | None = None) -> Tensor:
        """Positions (P, 3) inside cells ``index`` (P,): centres, or offset by ``jitter`` (P, 3) in [0, 1)."""
        r = self.resolution
        ijk = torch.stack([index // (r * r), (index // r) % r, index % r], dim=-1).to(self.aabb.dtype)
        frac = 0.5 if jitter is None else jitter
        return self.aabb[0] + (ijk + frac) / r * (self.aabb[1] - self.aabb[0])

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], threshold: float, decay: float = 0.95,
               fraction: float = 1.0, generator: torch.Generator | None = None, chunk: int = 1 << 17) -> None:
        """Re-evaluate the density at a random point of a random ``fraction`` of the cells.

        ``density = max(density * decay, new)`` for the visited cells; ``occupied = allowed & density >
        min(threshold, mean density)`` so a field that is still faint everywhere keeps its densest cells.
        """
        n = self.density.numel()
        device = self.density.device
        if fraction >= 1.0:
            index = torch.arange(n, device=device)
        else:
            index = torch.randperm(n, generator=generator, device="cpu")[: max(1, int(n * fraction))].to(device)
        jitter = torch.rand(index.shape[0], 3, generator=generator, device="cpu").to(device)
        points = self.cell_centers(index, jitter)
        fresh = torch.cat([density_fn(points[i:i + chunk]) for i in range(0, points.shape[0], chunk)])
        self.density[index] = torch.maximum(self.density[index] * decay, fresh.float())
        self.occupied.copy_(self.allowed & (self.density > min(threshold, float(self.density.mean()))))

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    @torch.no_grad()
    def carve(self, c2w: Tensor, intrinsics: Tensor, masks: Tensor, dilation_px: int = 1) -> None:
        """Restrict the grid to the visual hull of silhouettes (space carving).

        A cell stays allowed unless its centre projects inside some view onto a background pixel of that
        view's mask (dilated by ``dilation_px`` pixels and by the projected cell size, so thin parts survive).

        Args:
            c2w: (N, 4, 4) OpenGL camera-to-world matrices.
            intrinsics: (N, 3, 3) pixel intrinsics for the masks' size.
            masks: (N, H, W) in [0, 1]; > 0.5 is foreground.
        """
        device = self.density.device
        centres = self.cell_centers(torch.arange(self.density.numel(), device=device))
        keep = torch.ones(centres.shape[0], dtype=torch.bool, device=device)
        cell = float((self.aabb[1] - self.aabb[0]).max()) / self.resolution
        n, h, w = masks.shape
        for i in range(n):
            w2c = torch.linalg.inv(c2w[i].to(device).double()).float()
            cam = centres @ w2c[:3, :3].T + w2c[:3, 3]
            depth = (-cam[:, 2]).clamp_min(1e-6)
            k = intrinsics[i].to(device)
            u = k[0, 0] * cam[:, 0] / depth + k[0, 2]
            v = -k[1, 1] * cam[:, 1] / depth + k[1, 2]
            radius = dilation_px + int(torch.ceil(k[1, 1] * cell * 0.87 / depth.min()))  # half diagonal
            fg = (masks[i].to(device) > 0.5).float()[None, None]
            fg = torch.nn.functional.max_pool2d(fg, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
            inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (cam[:, 2] < 0)
            col = u.long().clamp(0, w - 1)
            row = v.long().clamp(0, h - 1)
            keep &= ~inside | fg[row, col]
        self.allowed.copy_(keep)
        self.occupied &= keep
