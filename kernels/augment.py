"""Seeded image augmentations for fine-tuning on a handful of views (Make-Your-3D's identity-aware tuning).

The seed augments the subject's multi-views before the image encoder sees them, so the tuned adapter keys on the
subject rather than on one framing of it. It does not list the augmentations; these are the usual mild ones that
keep the subject recognisable: a random crop of 80-100 % of the side resized back (zoom and shift), a horizontal
flip, and brightness/contrast jitter. Everything is drawn from a ``torch.Generator``, so a seed repeats a run
(kornia's augmentations draw from the global random state, hence this small module).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .checks import check_shape


def augment_views(images: Tensor, count: int, generator: torch.Generator, *, min_scale: float = 0.8,
                  flip: float = 0.5, jitter: float = 0.1) -> tuple[Tensor, Tensor]:
    """``count`` versions of each image; the first version of each is the image itself.

    Args:
        images: (N, H, W, 3) in [0, 1].
        count: versions per image (>= 1).
        generator: the random stream (CPU generator).
        min_scale: smallest crop side, as a fraction of the image side.
        flip: probability of a horizontal flip.
        jitter: brightness and contrast change by factors in [1 - jitter, 1 + jitter].

    Returns:
        (N * count, H, W, 3) augmented images in [0, 1], grouped by image (rows ``i * count ... i * count +
        count - 1`` come from image i), and (N * count,) the source image index of each row.
    """
    check_shape("images", images, ("N", "H", "W", 3))
    if count < 1:
        raise ValueError(f"count: expected >= 1, got {count}")
    n, h, w, _ = images.shape
    out = []
    for i in range(n):
        out.append(images[i])
        for _ in range(count - 1):
            out.append(_augment_one(images[i], generator, min_scale, flip, jitter))
    source = torch.arange(n).repeat_interleave(count)
    return torch.stack(out), source


def _augment_one(image: Tensor, generator: torch.Generator, min_scale: float, flip: float, jitter: float) -> Tensor:
    h, w, _ = image.shape
    u = torch.rand(6, generator=generator).tolist()
    scale = min_scale + (1.0 - min_scale) * u[0]
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = int(u[1] * (h - ch + 1)), int(u[2] * (w - cw + 1))
    crop = image[top:top + ch, left:left + cw].movedim(-1, 0)[None].float()
    x = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].movedim(0, -1)
    if u[3] < flip:
        x = x.flip(1)
    brightness = 1.0 + jitter * (2.0 * u[4] - 1.0)
    contrast = 1.0 + jitter * (2.0 * u[5] - 1.0)
    mean = x.mean()
    x = (x - mean) * contrast + mean * brightness
    return x.clamp(0.0, 1.0).to(image.dtype)
