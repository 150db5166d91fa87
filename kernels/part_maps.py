"""Part maps: one map per view and part, how attention read from a model becomes them, and how they are shown.

DreamBeast reads, for each view, the attention that each part phrase's text tokens receive from the image
tokens of chosen joint-attention blocks of SD3, over a window of timesteps, and turns it into one map per view
and part. Two readings are offered:

* ``"probability"``: the exact attention probabilities (softmax over all keys, averaged over heads), averaged
  over blocks, timesteps and the phrase's tokens; resized bilinearly to the output size. Values are
  probabilities (small: a few tokens share each query's mass with every other key).
* ``"official"``: DreamBeast's code. Raw scores ``q . k`` (heads merged, no softmax), summed over blocks and
  timesteps, upsampled bilinearly to the output size, min-max normalised per token and raised to the power
  0.95, averaged over the phrase's tokens, min-max normalised again. Values in [0, 1].

Maps gathered during sampling arrive per image token; :class:`MapAccumulator` adds them up on the fly so only
(views x image tokens x kept tokens) numbers are ever held.

DreamBeast's attention modulation during SDS (mechanism 3) turns part maps back into additive logit biases:
:func:`cross_attention_bias` (part tokens towards their regions) and :func:`self_attention_bias` (tokens
towards same-part tokens of every view, through :func:`part_affinity`).

>>> token_maps = torch.zeros(1, 2, 2, 2); token_maps[0, 0, 0, 0] = 1.0; token_maps[0, 1, 1, 1] = 3.0
>>> official_part_maps(token_maps, [[0, 1]], (2, 2))[0, 0]  # each token min-maxed, then their mean
tensor([[1., 0.],
        [0., 1.]])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .cameras import Cameras
from .checks import check_shape

#: How a set of part maps was made (:attr:`PartMaps.kind`).
PART_MAP_KINDS = ("probability", "official", "rendered", "exact")
#: DreamBeast's exponent after the per-token min-max.
OFFICIAL_POWER = 0.95


@dataclass(frozen=True)
class PartMaps:
    """The value behind the ``C3D_PART_MAPS`` socket: one map per view and part, with the views' cameras.

    Attributes:
        maps: (V, K, H, W) float32 on the CPU, finite and >= 0.
        cameras: the V views' cameras (a map pixel is the view's pixel at the same relative position).
        parts: the K part phrases, in the order of the maps.
        kind: how the maps were made, one of :data:`PART_MAP_KINDS`.
    """

    maps: Tensor
    cameras: Cameras
    parts: tuple[str, ...]
    kind: str

    def __post_init__(self):
        sizes = check_shape("maps", self.maps, ("V", "K", "H", "W"))
        if len(self.cameras) != sizes["V"]:
            raise ValueError(f"cameras: {len(self.cameras)} cameras for {sizes['V']} views of part maps")
        if len(self.parts) != sizes["K"]:
            raise ValueError(f"parts: {len(self.parts)} part names for {sizes['K']} maps per view")
        if self.kind not in PART_MAP_KINDS:
            raise ValueError(f"kind: expected one of {PART_MAP_KINDS}, got {self.kind!r}")

    @property
    def views(self) -> int:
        return self.maps.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the maps."""
        return self.maps.shape[2], self.maps.shape[3]

    def normalized(self) -> Tensor:
        """(V, K, H, W) each map min-max normalised to [0, 1] (a constant map becomes 0)."""
        return minmax(self.maps, dims=(2, 3))

    def __repr__(self) -> str:
        return f"PartMaps(views={self.views}, parts={list(self.parts)}, size={self.size}, kind={self.kind!r})"


def minmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``(x - min) / (max - min)`` over ``dims``; 0 where the range is empty (a constant slice)."""
    low = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, h, w) -> (N, C, H, W), bilinear (half-pixel centres; the identity when the size is the same)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def token_grid(maps: Tensor, height: int, width: int) -> Tensor:
    """(V, L, T) values per image token (row-major over the ``height x width`` token grid) -> (V, T, h, w)."""
    v, length, tokens = maps.shape
    if length != height * width:
        raise ValueError(f"maps: {length} image tokens do not form a {height}x{width} grid")
    return maps.transpose(1, 2).reshape(v, tokens, height, width)


def group_means(token_maps: Tensor, groups: list[list[int]]) -> Tensor:
    """(V, T, ...) per token -> (V, K, ...): part k is the mean of its tokens ``groups[k]`` (indices into T)."""
    return torch.stack([token_maps[:, g].mean(dim=1) for g in groups], dim=1)


def probability_part_maps(token_maps: Tensor, groups: list[list[int]], size: tuple[int, int]) -> Tensor:
    """Mean attention probabilities per part: (V, T, h, w) per kept token -> (V, K, H, W).

    ``groups[k]`` lists the indices (into T) of part k's tokens; a part's map is the mean of its tokens' maps,
    resized bilinearly to ``size``.
    """
    return resize_maps(group_means(token_maps, groups), size)


def official_part_maps(token_scores: Tensor, groups: list[list[int]], size: tuple[int, int],
                       power: float = OFFICIAL_POWER) -> Tensor:
    """DreamBeast's map: (V, T, h, w) raw scores summed over steps -> (V, K, H, W) in [0, 1].

    Upsample to ``size`` (bilinear), min-max per view and token, ``** power``, mean over the part's tokens,
    min-max per view and part.
    """
    up = minmax(resize_maps(token_scores, size), dims=(2, 3)) ** power
    return minmax(group_means(up, groups), dims=(2, 3))


class MapAccumulator:
    """Running sums of per-image-token values for V views: (V, L, T) float32, plus how many were added per view.

    The capture adds one (B, L, T) batch per model call with the views it belongs to; nothing else is kept.
    """

    def __init__(self, views: int, image_tokens: int, tokens: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(views, image_tokens, tokens, device=device)
        self.counts = torch.zeros(views, device=device)

    def add(self, view_index: Tensor, values: Tensor) -> None:
        """Add ``values`` (B, L, T) to the views ``view_index`` (B,) long."""
        check_shape("values", values, ("B", self.sums.shape[1], self.sums.shape[2]))
        index = view_index.to(self.sums.device)
        self.sums.index_add_(0, index, values.to(self.sums))
        self.counts.index_add_(0, index, torch.ones(index.shape[0], device=self.sums.device))

    def mean(self) -> Tensor:
        """(V, L, T): the mean of what each view received (0 for a view that received nothing)."""
        return self.sums / self.counts.clamp_min(1.0)[:, None, None]


# ------------------------------------------------------------------------------------------------- pictures

def heat_colors(values: Tensor) -> Tensor:
    """(...) values in [0, 1] -> (..., 3) a blue-cyan-yellow-red heat colour map (jet-like)."""
    x = values.clamp(0.0, 1.0)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25], dtype=x.dtype, device=x.device)  # red, green, blue peaks
    return (1.5 - (4.0 * x - 4.0 * centres).abs()).clamp(0.0, 1.0)


def heat_map_preview(maps: Tensor, images: Tensor | None = None, alpha: float = 0.6) -> Tensor:
    """(V, K, H, W) maps -> (V, H, K * W, 3): per view, the K maps side by side, each min-max normalised and
    heat-coloured; laid over ``images`` (V, H, W, 3) with opacity ``alpha`` when given."""
    v, k, h, w = maps.shape
    heat = heat_colors(minmax(maps.float(), dims=(2, 3)))  # (V, K, H, W, 3)
    if images is not None:
        under = resize_maps(images.float().permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1)[:, None]
        heat = alpha * heat + (1.0 - alpha) * under
    return heat.permute(0, 2, 1, 3, 4).reshape(v, h, k * w, 3).contiguous()


def part_colors(parts: int) -> Tensor:
    """(K, 3) distinct, saturated colours (hues spread evenly, starting at red)."""
    hue = torch.arange(parts, dtype=torch.float32) / max(parts, 1)
    channel = torch.tensor([0.0, 2.0 / 3.0, 1.0 / 3.0])  # hue offsets of r, g, b
    wave = torch.cos(2 * math.pi * (hue[:, None] - channel[None, :]))
    return (0.5 + 0.5 * wave).clamp(0.0, 1.0)


def part_legend(parts: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    """``[{"name", "color"}]`` per part in map order, ``color`` the part's ``#rrggbb`` in :func:`colored_preview`:
    what a viewer needs to read a part preview (the colours) or a heat-map row (the column order)."""
    rgb = (part_colors(len(parts)) * 255.0).round().to(torch.uint8).tolist()
    return [{"name": name, "color": "#{:02x}{:02x}{:02x}".format(*c)} for name, c in zip(parts, rgb)]


def colored_preview(maps: Tensor) -> Tensor:
    """(V, K, H, W) -> (V, H, W, 3): each pixel in the colour of its parts, weighted by their normalised maps
    and as bright as the strongest of them (black where every map is 0)."""
    m = minmax(maps.float(), dims=(2, 3))
    colors = part_colors(maps.shape[1]).to(m)
    mix = torch.einsum("vkhw,kc->vhwc", m, colors) / m.sum(dim=1).clamp_min(1e-6)[..., None]
    return (mix * m.amax(dim=1)[..., None]).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------- attention modulation

#: DreamBeast's guard inside its logarithms and square roots.
LOG_EPS = 1e-9
#: DreamBeast damps affinities below their mean by this factor.
AFFINITY_DAMPING = 10.0


def cross_attention_bias(maps: Tensor, size: tuple[int, int], token_groups: list[list[int]], context_length: int,
                         strength: float) -> Tensor:
    """DreamBeast's cross-attention modulation: (V, K, H, W) part maps -> (V, h * w, L) additive logit bias.

    Each part's map is resized (bilinear) to the attention resolution ``size`` = (h, w), divided by its mean over
    all V views and pixels, and ``strength * log(m / mean m + eps)`` is added to the logits of every query pixel
    (row-major) towards each of the part's text tokens ``token_groups[k]`` (columns of the L context tokens);
    other columns get 0. A token of two parts gets both terms. Shared by every head and every layer of one
    resolution; DreamBeast's strength is 0.6.
    """
    v, k = maps.shape[:2]
    if len(token_groups) != k:
        raise ValueError(f"token_groups: {len(token_groups)} token groups for {k} parts")
    m = resize_maps(maps.float(), size).reshape(v, k, -1)  # (V, K, h*w)
    bias = m.new_zeros(v, m.shape[-1], context_length)
    for part, columns in enumerate(token_groups):
        mk = m[:, part]
        term = strength * torch.log(mk / mk.mean().clamp_min(torch.finfo(mk.dtype).tiny) + LOG_EPS)
        for column in columns:
            bias[:, :, column] += term
    return bias


def part_affinity(part_map: Tensor) -> Tensor:
    """One part's affinity between all views' tokens, DreamBeast's way: (N,) map over every view's pixels ->
    (N, N).

    ``m`` is normalised to mean 1 and its inverse ``(max - m) / (max - min)`` is divided by the same mean;
    ``A = m m^T`` and ``I = inv inv^T`` each have their entries below their own mean divided by 10, and the
    affinity is ``(sqrt(A + eps) + sqrt(I + eps)) / 2``: high between tokens that are both in the part or both
    out of it. (A constant map has no inverse: its inverse is taken as 0.)
    """
    m = part_map.float()
    mean = m.mean().clamp_min(torch.finfo(m.dtype).tiny)
    span = m.max() - m.min()
    inverse = (m.max() - m) / span if span > 0 else torch.zeros_like(m)
    m, inverse = m / mean, inverse / mean

    def damped(outer: Tensor) -> Tensor:
        return torch.where(outer < outer.mean(), outer / AFFINITY_DAMPING, outer)

    a = torch.sqrt(damped(torch.outer(m, m)) + LOG_EPS)
    a += torch.sqrt(damped(torch.outer(inverse, inverse)) + LOG_EPS)
    return a / 2


def self_attention_bias(maps: Tensor, size: tuple[int, int], strength: float) -> Tensor:
    """DreamBeast's multi-view self-attention modulation: (V, K, H, W) -> (V * h * w, V * h * w) logit bias.

    Over the joint sequence of the V views' tokens (views in order, each row-major at the attention resolution
    ``size``, as MVDream folds them), ``strength * sum_k log(A_k + eps)`` with ``A_k`` :func:`part_affinity` of
    part k: tokens attend more to tokens of the same part, in every view. One (V h w)^2 matrix shared by every
    head and layer of one resolution; DreamBeast's strength is 1.2.
    """
    v, k = maps.shape[:2]
    m = resize_maps(maps.float(), size).permute(1, 0, 2, 3).reshape(k, -1)  # (K, V*h*w), views in order
    bias = m.new_zeros(m.shape[1], m.shape[1])
    for part in range(k):
        bias += torch.log(part_affinity(m[part]) + LOG_EPS)
    return strength * bias
