"""Attention math shared by the multi-view and refocusing mechanisms (framework-free).

Multi-view self-attention (MVDream): the tokens of the V views of one object attend to each other, so before
self-attention ``(b v) l c -> b (v l) c`` and after it back. Views of one object are contiguous in the batch.

Attention refocusing (Attend-and-Excite, adapted to multi-view generation as in Grounded-Dreamer):

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
import torch.nn.functional as F
from torch import Tensor


def views_to_sequence(x: Tensor, views: int) -> Tensor:
    """(B * V, L, C) -> (B, V * L, C): one sequence holding every view of an object."""
    bv, length, channels = x.shape
    if bv % views:
        raise ValueError(f"views: the batch of {bv} is not a multiple of {views} views")
    return x.reshape(bv // views, views * length, channels)


def sequence_to_views(x: Tensor, views: int) -> Tensor:
    """(B, V * L, C) -> (B * V, L, C), the inverse of :func:`views_to_sequence`."""
    b, vl, channels = x.shape
    return x.reshape(b * views, vl // views, channels)


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


def gaussian_kernel(size: int = 3, sigma: float = 0.5, dtype=torch.float32) -> Tensor:
    """(size, size) normalised Gaussian, the outer product of the 1-D one."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


def smooth_maps(maps: Tensor, size: int = 3, sigma: float = 0.5) -> Tensor:
    """Gaussian-smooth (..., H, W) maps with reflect padding (shape kept)."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = maps.reshape(-1, 1, h, w)
    pad = size // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(flat, gaussian_kernel(size, sigma, maps.dtype).to(maps.device)[None, None])
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
