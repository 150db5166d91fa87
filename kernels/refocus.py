"""Attention refocusing maths (Attend-and-Excite, adapted to multi-view generation as in Grounded-Dreamer; no comfy).

1. For each view, the cross-attention probabilities of the image tokens over the text tokens, averaged over
   heads, are restricted to the text tokens after the start token, multiplied by 100 and re-normalised with a
   softmax over tokens; the maps of the subject tokens are reshaped to ``h x w``.
2. Each map is smoothed with a 3x3 Gaussian (sigma 0.5, reflect padding).
3. A token's attention in a view is its map's maximum. Over the views, the weakest view counts:
   ``a_k = min_v max_p map[v, k, p]``.
4. ``loss = max_k (1 - a_k)``: it rises when any subject is neglected in any view.
"""
from __future__ import annotations

import math

import torch
from kornia.filters import filter2d, get_gaussian_kernel2d
from torch import Tensor


def subject_token_maps(probs: Tensor, token_indices: list[int], height: int, width: int, last_token: int,
                       temperature: float = 100.0) -> Tensor:
    """Per-view attention maps of the subject tokens.

    Args:
        probs: (V, P, T) cross-attention probabilities of P = height * width image tokens over T text tokens,
            averaged over heads (and over the layers of one resolution).
        token_indices: positions of the subject tokens in the text (start token = 0), each in [1, last_token).
        last_token: index of the end token; text tokens 1 .. last_token - 1 compete in the softmax.
        temperature: multiplies the probabilities before the softmax over tokens (100 in Attend-and-Excite).

    Returns:
        (V, K, height, width) maps; differentiable w.r.t. ``probs``.
    """
    v, p, t = probs.shape
    if p != height * width:
        raise ValueError(f"probs: {p} image tokens do not make a {height}x{width} map")
    bad = [i for i in token_indices if not 1 <= i < last_token]
    if bad or last_token > t:
        raise ValueError(f"token_indices: {bad or token_indices} must lie between 1 and {last_token - 1} "
                         f"(the prompt's words)")
    text = torch.softmax(probs[:, :, 1:last_token] * temperature, dim=-1)  # (V, P, last_token - 1)
    maps = text[:, :, [i - 1 for i in token_indices]]  # (V, P, K)
    return maps.permute(0, 2, 1).reshape(v, len(token_indices), height, width)


def smooth_maps(maps: Tensor, size: int = 3, sigma: float = 0.5) -> Tensor:
    """Gaussian-smooth (..., H, W) maps with reflect padding (shape kept), with kornia's filters.

    The ``size x size`` kernel is kornia's normalised Gaussian built in float64 and cast to the maps' dtype
    (``kornia.filters.gaussian_blur2d`` would build it in float32, a last-bit change of the refocus results).
    """
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    sigmas = torch.tensor([[sigma, sigma]], dtype=torch.float64)
    kernel = get_gaussian_kernel2d((size, size), sigmas, dtype=torch.float64).to(maps.dtype)  # (1, size, size)
    out = filter2d(maps.reshape(-1, 1, h, w), kernel.to(maps.device), border_type="reflect")
    return out.reshape(*lead, h, w)


def token_attention(maps: Tensor) -> Tensor:
    """(V, K, H, W) smoothed maps -> (V, K) each token's maximum attention in each view."""
    return maps.flatten(-2).amax(dim=-1)


def refocus_loss(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Refocusing loss of (V, K, H, W) smoothed subject maps.

    Returns:
        loss: scalar ``max_k (1 - min_v max_p maps[v, k, p])``, differentiable.
        per_token: (K,) ``min_v max_p maps[v, k, p]``, the attention each subject gets in its weakest view.
    """
    per_token = token_attention(maps).amin(dim=0)
    return (1.0 - per_token).amax(), per_token


def refocus_step_size(step: int, steps: int, scale: float = 20.0) -> float:
    """Latent update size at sampling step ``step`` of ``steps``: ``scale * sqrt(linspace(1, 0.5, steps))``."""
    if steps <= 1:
        return scale
    return scale * math.sqrt(1.0 - 0.5 * step / (steps - 1))


def subject_maps(probs: Tensor, positions: list[list[int]], height: int, width: int, last_token: int,
                 temperature: float = 100.0) -> Tensor:
    """Per-view maps of whole subjects: a subject of several tokens gets the sum of its tokens' maps.

    Args:
        probs: (V, P, T) cross-attention probabilities (see :func:`subject_token_maps`).
        positions: per subject, its token positions in the text.

    Returns:
        (V, K, height, width) maps, each in [0, 1] (the tokens' shares after the softmax over words).
    """
    flat = [i for pos in positions for i in pos]
    maps = subject_token_maps(probs, flat, height, width, last_token, temperature)
    out, start = [], 0
    for pos in positions:
        out.append(maps[:, start:start + len(pos)].sum(dim=1))
        start += len(pos)
    return torch.stack(out, dim=1)


def parse_thresholds(text: str) -> dict[int, float]:
    """``"0: 0.05, 10: 0.5, 20: 0.8"`` -> {0: 0.05, 10: 0.5, 20: 0.8} (sampling step -> attention target).

    Raises:
        ValueError: not ``step: value`` pairs, a negative step, or a value outside (0, 1].
    """
    out: dict[int, float] = {}
    if not text.strip():
        return out
    for part in text.split(","):
        step, sep, value = part.partition(":")
        try:
            if not sep:
                raise ValueError
            s, v = int(step.strip()), float(value.strip())
        except ValueError:
            raise ValueError(f"thresholds: {part.strip()!r} is not 'step: value'; expected e.g. "
                             f"'0: 0.05, 10: 0.5, 20: 0.8'") from None
        if s < 0 or not 0.0 < v <= 1.0:
            raise ValueError(f"thresholds: {part.strip()!r} needs a step >= 0 and a value in (0, 1]")
        out[s] = v
    return out
