"""Backgrounds: what a ray sees after passing through the field.

Each background maps unit ray directions (R, 3) to C values (R, C) in [0, 1], C being the rendered field's
channels (3 for RGB).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SolidBackground(nn.Module):
    """One fixed value per channel (e.g. white (1, 1, 1) behind masked objects; C values for a C-channel field)."""

    def __init__(self, color: tuple[float, ...] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("rgb", torch.tensor(color, dtype=torch.float32).reshape(-1))

    @property
    def channels(self) -> int:
        return self.rgb.shape[0]

    def forward(self, directions: Tensor) -> Tensor:
        return self.rgb.to(directions.dtype).expand(directions.shape[0], self.channels)


class LearnedBackground(nn.Module):
    """A small MLP of the view direction (frequency-encoded), as used behind SDS-trained fields."""

    def __init__(self, frequencies: int = 2, hidden: int = 16, channels: int = 3):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(frequencies, dtype=torch.float32))
        dim = 3 + 6 * frequencies
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    @property
    def channels(self) -> int:
        return self.net[-1].out_features

    def forward(self, directions: Tensor) -> Tensor:
        x = directions[..., None] * self.freqs  # (R, 3, K)
        enc = torch.cat([directions, x.sin().flatten(1), x.cos().flatten(1)], dim=-1)
        return torch.sigmoid(self.net(enc))
