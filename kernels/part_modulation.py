"""DreamBeast's part-aware attention modulation for one SDS step (no comfy).

Given the part maps of a step's camera batch (rendered from the Part-Affinity NeRF at the batch's cameras),
:class:`StepBiases` builds the additive logit biases that the multi-view model's attention layers add on the
conditional half:

* cross-attention (every view): :func:`part_maps.cross_attention_bias` per object, (views, 1, h * w, L);
* self-attention across the views of one object (MVDream folds them into one sequence):
  :func:`part_maps.self_attention_bias` per object, (objects, 1, V * h * w, V * h * w).

Each is built once per step and attention resolution, on first use, and shared by every head and every layer
of that resolution. :class:`ModulationSettings` holds the strengths and the step window (fractions of the run's
steps, so that shorter runs keep DreamBeast's schedule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_shape
from .part_maps import cross_attention_bias, self_attention_bias

#: DreamBeast's schedule: 7000 SDS steps, plain until 1000 (part maps recorded then), modulated from 3020.
DREAMBEAST_STEPS = 7000
DREAMBEAST_MAPS_STEP = 1000
DREAMBEAST_MODULATION_START = 3020


@dataclass(frozen=True)
class ModulationSettings:
    """Strengths of the two terms and the step window ``[start, end)`` as fractions of the run's steps.

    DreamBeast: cross 0.6, self 1.2, modulation in steps 3020-7000 of 7000.
    """

    cross_strength: float = 0.6
    self_strength: float = 1.2
    start: float = DREAMBEAST_MODULATION_START / DREAMBEAST_STEPS
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"window: expected 0 <= start < end <= 1 (fractions of the steps), got "
                             f"{self.start:g}-{self.end:g}")
        if self.cross_strength < 0 or self.self_strength < 0:
            raise ValueError("strengths: expected values >= 0")

    def window(self, steps: int) -> tuple[int, int]:
        """The first step modulated and the first step after the window, for a run of ``steps`` steps."""
        return int(round(self.start * steps)), int(round(self.end * steps))

    def active(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (0-based) of a ``steps``-step run is modulated (some strength above 0)."""
        first, stop = self.window(steps)
        return first <= step < stop and (self.cross_strength > 0 or self.self_strength > 0)


class StepBiases:
    """The logit biases of one step's camera batch, built lazily per attention resolution and kept for the step.

    Args:
        maps: (B, K, H, W) part maps of the batch's B = objects x ``views`` cameras, objects' views contiguous.
        views: views per object (MVDream: 4).
        token_groups: for each of the K parts, its token columns in the context.
        settings: the strengths (a strength of 0 gives no bias for that term: see :meth:`cross` / :meth:`self`).
    """

    def __init__(self, maps: Tensor, views: int, token_groups: list[list[int]], settings: ModulationSettings):
        sizes = check_shape("maps", maps, ("B", "K", "H", "W"))
        if sizes["B"] % views:
            raise ValueError(f"maps: {sizes['B']} maps are not a whole number of objects of {views} views")
        if len(token_groups) != sizes["K"]:
            raise ValueError(f"token_groups: {len(token_groups)} token groups for {sizes['K']} parts")
        self.maps, self.views, self.token_groups, self.settings = maps, views, token_groups, settings
        self.batch = sizes["B"]
        self.objects = sizes["B"] // views
        self._cross: dict[tuple[int, int, int], Tensor] = {}
        self._self: dict[tuple[int, int], Tensor] = {}

    def _objects(self):
        return (self.maps[o * self.views:(o + 1) * self.views] for o in range(self.objects))

    def cross(self, size: tuple[int, int], context_length: int) -> Tensor | None:
        """(B, 1, h * w, L) cross-attention bias at attention resolution ``size``, or None when its strength is 0.
        Each object's maps are normalised by their own mean (DreamBeast runs one object per batch)."""
        if self.settings.cross_strength == 0:
            return None
        key = (size[0], size[1], context_length)
        if key not in self._cross:
            per_object = [cross_attention_bias(m, size, self.token_groups, context_length,
                                               self.settings.cross_strength) for m in self._objects()]
            self._cross[key] = torch.cat(per_object)[:, None]
        return self._cross[key]

    def self(self, size: tuple[int, int]) -> Tensor | None:
        """(objects, 1, V * h * w, V * h * w) multi-view self-attention bias at ``size``, or None at strength 0."""
        if self.settings.self_strength == 0:
            return None
        if size not in self._self:
            per_object = [self_attention_bias(m, size, self.settings.self_strength)[None] for m in self._objects()]
            self._self[size] = torch.cat(per_object)[:, None]
        return self._self[size]

