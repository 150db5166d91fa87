"""DreamBeast's attention modulation maths (kernels/part_maps.py) against its formulas written out element by
element on hand-made part maps: 4 views, several attention resolutions, both terms.

Formulas (DreamBeast, seed 000 and its code): cross-attention logits of part k's tokens += s log(m / mean m + eps),
the mean over every view's pixels; multi-view self-attention logits += s sum_k log(A_k + eps) with
A_k = (sqrt(damp(m m^T) + eps) + sqrt(damp(i i^T) + eps)) / 2, m = map / mean, i = (max - map) / (max - min) / mean,
damp() dividing entries below the matrix's mean by 10.
"""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels.attention import attention
from compose3d.kernels.part_maps import cross_attention_bias, self_attention_bias
from oracles import cross_oracle, hand_made_maps, self_oracle

@pytest.mark.parametrize("size", [2, 4, 6])
def test_the_cross_attention_bias_is_the_formula_at_every_resolution(size):
    maps = hand_made_maps(size=size)
    groups = [[2, 3], [5]]
    bias = cross_attention_bias(maps, (size, size), groups, context_length=8, strength=0.6)
    assert bias.shape == (4, size * size, 8)
    torch.testing.assert_close(bias.double(), cross_oracle(maps, groups, 8, 0.6), rtol=1e-5, atol=1e-5)
    assert torch.all(bias[..., [0, 1, 4, 6, 7]] == 0)  # other tokens untouched


@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_self_attention_bias_is_the_formula_over_all_views_tokens(size):
    maps = hand_made_maps(size=size)
    bias = self_attention_bias(maps, (size, size), strength=1.2)
    assert bias.shape == (4 * size * size,) * 2
    torch.testing.assert_close(bias.double(), self_oracle(maps, 1.2), rtol=1e-5, atol=1e-4)


def test_maps_are_resized_to_the_attention_resolution_bilinearly():
    maps = hand_made_maps(size=8).float()  # the kernels compute in float32
    small = torch.nn.functional.interpolate(maps, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cross_attention_bias(maps, (4, 4), [[1], [2]], 4, 0.6),
                               cross_attention_bias(small, (4, 4), [[1], [2]], 4, 0.6))
    torch.testing.assert_close(self_attention_bias(maps, (4, 4), 1.2), self_attention_bias(small, (4, 4), 1.2))


def test_strength_zero_gives_no_bias_and_the_plain_attention():
    maps = hand_made_maps()
    assert torch.all(cross_attention_bias(maps, (4, 4), [[1], [2]], 4, 0.0) == 0)
    assert torch.all(self_attention_bias(maps, (4, 4), 0.0) == 0)
    q, k, v = torch.randn(1, 64, 8), torch.randn(1, 64, 8), torch.randn(1, 64, 8)
    plain, _ = attention(q, k, v, heads=2)
    zero, _ = attention(q, k, v, heads=2, logit_bias=self_attention_bias(maps, (4, 4), 0.0))
    assert torch.equal(plain, zero)


def test_the_cross_bias_moves_a_parts_token_mass_into_its_region():
    """Uniform logits: with the bias, part 0's token gets more attention inside part 0's blob than outside."""
    maps = hand_made_maps()
    bias = cross_attention_bias(maps, (4, 4), [[1], [2]], 4, 0.6)  # (V, 16, 4)
    q, k, v = torch.zeros(4, 16, 8), torch.randn(4, 4, 8), torch.randn(4, 4, 8)
    _, probs = attention(q, k, v, heads=1, logit_bias=bias, keep=torch.tensor([1]))
    inside = maps[:, 0].reshape(4, 16) > maps[:, 0].reshape(4, 16).median()
    assert float(probs[..., 0][inside].mean()) > 1.5 * float(probs[..., 0][~inside].mean())
