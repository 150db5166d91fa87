"""DreamBeast's part-aware attention modulation inside a MVDream MODEL's attention (ComfyUI glue).

:class:`PartModulator` is what the SDS optimiser uses: before each step's prediction, :meth:`PartModulator.prepare`
renders the Part-Affinity NeRF at the step's cameras (at the latent size) and, inside the step window, makes the
step's :class:`kernels.part_modulation.StepBiases`; :meth:`PartModulator.model_options` installs attn2 (cross)
and attn1 (self, views folded by MVDream's UNet) replace patches on every transformer block through
:func:`nodes.attention_patch.patch_unet_attention`. A patch adds its bias to the conditional rows only
(``cond_or_uncond`` says which batch chunk is which) through PyTorch's fused attention with a float mask
(:func:`kernels.attention.biased_attention`); the unconditional rows, the steps outside the window and a term
whose strength is 0 run the attention that was there before, untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.attention import biased_attention
from ..kernels.cameras import Cameras
from ..kernels.part_field import PartField, render_part_maps
from ..kernels.part_maps import PartMaps
from ..kernels.part_modulation import ModulationSettings, StepBiases
from .attention_patch import BlockKey, AttentionFn, patch_unet_attention

COND = 0  # ComfyUI's cond_or_uncond value of a conditional chunk


@dataclass
class ModulationStats:
    """What the modulation did in a run: steps modulated and the biased attention calls (cross, self)."""

    steps: int = 0
    cross_calls: int = 0
    self_calls: int = 0


class PartModulator:
    """Per-step part maps from a part field and the attention patches that add their biases.

    Args:
        part_field: the Part-Affinity NeRF (its K parts, in order, match ``token_groups``).
        token_groups: per part, its token columns in the MODEL's text context.
        settings: strengths and step window.
        steps: the run's step count (the window is a fraction of it).
        views: views per object in a batch (MVDream: 4).
    """

    def __init__(self, part_field: PartField, token_groups: list[list[int]], settings: ModulationSettings,
                 steps: int, views: int):
        self.part_field, self.token_groups, self.settings = part_field, token_groups, settings
        self.steps, self.views = steps, views
        self.biases: StepBiases | None = None
        self.maps: PartMaps | None = None
        self.stats = ModulationStats()

    def prepare(self, step: int, cameras: Cameras, latent_size: tuple[int, int]) -> None:
        """Make step ``step``'s biases for the batch seen by ``cameras`` (none outside the window)."""
        self.biases, self.maps = None, None
        if not self.settings.active(step, self.steps):
            return
        with torch.no_grad():
            self.maps = render_part_maps(self.part_field, cameras, *latent_size)
        self.biases = StepBiases(self.maps.maps, self.views, self.token_groups, self.settings)
        self.stats.steps += 1

    def model_options(self, diffusion_model, model_options: dict) -> dict:
        """A copy of ``model_options`` with the modulation's attn2 and attn1 replacements (for a term whose
        strength is above 0) on every transformer block."""
        options = model_options
        if self.settings.cross_strength > 0:
            options = patch_unet_attention(options, diffusion_model, "attn2", self._cross_patch)
        if self.settings.self_strength > 0:
            options = patch_unet_attention(options, diffusion_model, "attn1", self._self_patch)
        return options

    def _cross_patch(self, key: BlockKey, fallback: AttentionFn) -> AttentionFn:
        def attn2(q, k, v, extra_options):
            if self.biases is None:
                return fallback(q, k, v, extra_options)
            bias = self.biases.cross(_resolution(extra_options), k.shape[1])
            self.stats.cross_calls += 1
            return _cond_rows(q, k, v, extra_options, bias, fallback, self.biases.batch, "cross")

        return attn2

    def _self_patch(self, key: BlockKey, fallback: AttentionFn) -> AttentionFn:
        def attn1(q, k, v, extra_options):  # q, k, v: (B / V, V * h * w, C), folded by MVDream's UNet
            if self.biases is None:
                return fallback(q, k, v, extra_options)
            size = _resolution(extra_options)
            if q.shape[1] != self.views * size[0] * size[1]:
                raise RuntimeError(f"part modulation: self-attention over {q.shape[1]} tokens, expected the "
                                   f"{self.views} views of one object folded together (an MVDream MODEL)")
            bias = self.biases.self(size)
            self.stats.self_calls += 1
            return _cond_rows(q, k, v, extra_options, bias, fallback, self.biases.objects, "self")

        return attn1


def _resolution(extra_options: dict) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is None:
        raise RuntimeError("part modulation: the attention call does not say its resolution (activations_shape)")
    return int(shape[-2]), int(shape[-1])


def _cond_rows(q: Tensor, k: Tensor, v: Tensor, extra_options: dict, bias: Tensor, fallback: AttentionFn,
               rows_expected: int, term: str) -> Tensor:
    """The attention of a batch made of ``cond_or_uncond`` chunks: conditional chunks with ``bias`` (one row per
    chunk row), the others through ``fallback``."""
    chunks = list(extra_options.get("cond_or_uncond") or [COND])
    rows = q.shape[0] // len(chunks)
    if rows != rows_expected or rows * len(chunks) != q.shape[0]:
        raise RuntimeError(f"part modulation ({term}): a batch of {q.shape[0]} rows in {len(chunks)} chunks, "
                           f"expected {rows_expected} rows per chunk (the step's cameras)")
    outs = []
    for index, kind in enumerate(chunks):
        part = slice(index * rows, (index + 1) * rows)
        if kind == COND:
            out = biased_attention(q[part], k[part], v[part], extra_options["n_heads"], bias.to(q.device))
        else:
            out = fallback(q[part], k[part], v[part], extra_options)
        outs.append(out)
    return torch.cat(outs) if len(outs) > 1 else outs[0]
