"""Quality measures: PSNR of images, Chamfer distance of point sets."""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images (any matching shapes) with values in [0, 1]."""
    mse = torch.mean((prediction.float() - target.float()) ** 2)
    return float(-10.0 * torch.log10(mse.clamp_min(1e-12)))


def chamfer_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance: mean nearest-neighbour distance a->b plus b->a, points (Na, 3), (Nb, 3)."""
    d_ab, _ = cKDTree(b).query(a)
    d_ba, _ = cKDTree(a).query(b)
    return float(d_ab.mean() + d_ba.mean())
