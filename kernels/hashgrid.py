"""Multi-resolution hash-grid encoding (Instant-NGP), in plain torch.

Level l has resolution ``floor(base_resolution * per_level_scale ** l)``. A point's 8 surrounding grid
vertices index the level's table directly when the level's ``(res + 1) ** 3`` vertices fit in the table, and
through the spatial hash ``(x * 1) ^ (y * 2654435761) ^ (z * 805459861) mod T`` otherwise; their features are
blended trilinearly. All levels are gathered in one lookup whose backward is a scatter-add.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)


class _InterpolatedLookup(torch.autograd.Function):
    """``out[p, l] = sum_c w[p, l, c] * table[index[p, l, c]]`` with an ``index_add_`` backward.

    table (T, F), index (P, L, 8) long, w (P, L, 8) -> (P, L, F). torch's own embedding backward sorts the
    indices, which dominated the whole encoding's time on the CPU; a scatter-add is several times faster.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, w: Tensor) -> Tensor:
        feats = table[index]  # (P, L, 8, F)
        ctx.save_for_backward(table, index, w)
        return torch.einsum("plcf,plc->plf", feats, w)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, index, w = ctx.saved_tensors
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            contrib = w[..., None] * grad_out[:, :, None, :]  # (P, L, 8, F)
            grad_table = torch.zeros_like(table).index_add_(0, index.reshape(-1), contrib.reshape(-1, table.shape[1]))
        if ctx.needs_input_grad[2]:
            grad_w = torch.einsum("plcf,plf->plc", table[index], grad_out)
        return grad_table, None, grad_w


class HashGrid(nn.Module):
    """Encode points in [0, 1]^3 as (P, levels * features) features.

    Args:
        levels: number of resolution levels L.
        features: features per level F.
        log2_table_size: log2 of the per-level table size T.
        base_resolution: coarsest resolution.
        per_level_scale: resolution growth factor between levels.
        init_scale: table entries start uniform in [-init_scale, init_scale].
    """

    def __init__(self, levels: int = 16, features: int = 2, log2_table_size: int = 19, base_resolution: int = 16,
                 per_level_scale: float = 1.4473, init_scale: float = 1e-4):
        super().__init__()
        self.levels, self.features = levels, features
        table = 1 << log2_table_size
        resolutions, sizes, hashed = [], [], []
        for level in range(levels):
            res = int(math.floor(base_resolution * per_level_scale ** level))
            dense = (res + 1) ** 3
            resolutions.append(res)
            sizes.append(min(dense, table))
            hashed.append(dense > table)
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.long), persistent=False)
        assert hashed == sorted(hashed), "dense levels must come before hashed ones"
        self.dense_levels = hashed.count(False)
        self.register_buffer("offsets", torch.tensor(offsets[:-1], dtype=torch.long), persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.long), persistent=False)
        self.table_mask = table - 1  # T is a power of two: "mod T" of the hash is a bit mask
        self.table = nn.Parameter(torch.empty(offsets[-1], features).uniform_(-init_scale, init_scale))

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    def forward(self, x: Tensor) -> Tensor:
        """x: (P, 3) in [0, 1] (clamped) -> (P, L * F); differentiable w.r.t. the table (and x)."""
        x = x.clamp(0.0, 1.0)
        pos = x[:, None, :] * self.resolutions.to(x.dtype)[None, :, None]  # (P, L, 3)
        cell = pos.floor().long().clamp_max(self.resolutions[None, :, None] - 1)
        frac = pos - cell.to(x.dtype)  # (P, L, 3)
        # Per axis, the two grid coordinates (cell, cell + 1): (P, L, 3, 2). The 8 corner indices are then
        # combined by broadcasting instead of materialising (P, L, 8, 3) integer coordinates. Dense levels come
        # first (resolution grows with the level), so each kind of index is computed for its own levels only.
        both = cell[..., None] + torch.arange(2, device=x.device)
        nd = self.dense_levels
        parts = []
        if nd > 0:
            b = both[:, :nd]
            stride = (self.resolutions[:nd] + 1)[None, :, None]
            dx, dy, dz = b[:, :, 0], b[:, :, 1] * stride, b[:, :, 2] * stride * stride
            parts.append((dx[..., :, None, None] + dy[..., None, :, None] + dz[..., None, None, :]).flatten(-3))
        if nd < self.levels:
            b = both[:, nd:]
            hx, hy, hz = (b[:, :, a] * self.primes[a] for a in range(3))
            hashed = hx[..., :, None, None] ^ hy[..., None, :, None] ^ hz[..., None, None, :]
            parts.append(hashed.flatten(-3) & self.table_mask)
        index = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (P, L, 8)
        wx, wy, wz = (torch.stack([1.0 - frac[:, :, a], frac[:, :, a]], dim=-1) for a in range(3))
        w = (wx[..., :, None, None] * wy[..., None, :, None] * wz[..., None, None, :]).flatten(-3)  # (P, L, 8)
        out = _InterpolatedLookup.apply(self.table, index + self.offsets[None, :, None], w)  # (P, L, F)
        return out.reshape(x.shape[0], -1)
