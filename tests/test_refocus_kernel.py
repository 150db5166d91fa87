"""Refocusing maths against hand-made inputs with known answers (Attend-and-Excite formulas)."""
from __future__ import annotations

import math

import pytest
import torch

from compose3d.kernels.refocus import (parse_thresholds, refocus_loss, refocus_step_size, smooth_maps, subject_maps,
                                       subject_token_maps)


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The oracle: the normalised 3x3 Gaussian written out, the outer product of the 1-D one."""
    side = math.exp(-1 / (2 * sigma ** 2))
    g = torch.tensor([side, 1.0, side]) / (1 + 2 * side)
    return torch.outer(g, g)


def test_gaussian_kernel_is_the_normalised_3x3_with_sigma_half():
    side = math.exp(-1 / (2 * 0.5 ** 2))
    g = torch.tensor([side, 1.0, side]) / (1 + 2 * side)
    torch.testing.assert_close(gaussian_kernel(3, 0.5), torch.outer(g, g))
    assert g.tolist() == pytest.approx([0.10650698, 0.78698604, 0.10650698], abs=1e-7)


def test_smoothing_a_centred_delta_gives_the_kernel_and_keeps_shape():
    m = torch.zeros(2, 1, 5, 5)
    m[0, 0, 2, 2] = 1.0
    out = smooth_maps(m)
    assert out.shape == m.shape
    torch.testing.assert_close(out[0, 0, 1:4, 1:4], gaussian_kernel(3, 0.5))
    assert float(out[1].abs().max()) == 0.0


def test_smoothing_reflects_at_the_border():
    """Reflect padding: the column beyond the left edge mirrors column 1, so a delta in column 1 of the top row
    reaches the corner from both sides."""
    m = torch.zeros(1, 4, 4)
    m[0, 0, 1] = 1.0
    k = gaussian_kernel(3, 0.5)
    out = smooth_maps(m)
    torch.testing.assert_close(out[0, 0, 0], k[1, 0] + k[1, 2])  # the delta and its mirror image
    torch.testing.assert_close(out[0, 1, 0], k[0, 0] + k[0, 2])
    torch.testing.assert_close(out[0, 0, 1], k[1, 1])


def test_token_maps_softmax_over_words_after_the_start_token():
    # 1 view, 4 image tokens (2x2), text: [SOT, "a", "cat", "dog", EOT, pad]
    probs = torch.zeros(1, 4, 6)
    probs[0, :, 0] = 0.9  # the start token soaks up attention; it must not compete
    probs[0, 0, 2] = 0.1  # pixel 0 looks at "cat"
    probs[0, 3, 3] = 0.1  # pixel 3 looks at "dog"
    maps = subject_token_maps(probs, [2, 3], 2, 2, last_token=4)
    e = math.exp(10.0)
    assert maps[0, 0, 0, 0].item() == pytest.approx(e / (e + 2))  # cat at pixel 0
    assert maps[0, 0, 0, 1].item() == pytest.approx(1 / 3)  # a tie between the three words
    assert maps[0, 1, 1, 1].item() == pytest.approx(e / (e + 2))  # dog at pixel 3
    with pytest.raises(ValueError, match="^token_indices: "):
        subject_token_maps(probs, [0], 2, 2, last_token=4)


def test_refocus_loss_is_driven_by_the_most_neglected_subject_in_its_weakest_view():
    maps = torch.zeros(4, 2, 3, 3)  # 4 views, 2 subjects
    maps[:, 0, 1, 1] = torch.tensor([0.9, 0.8, 0.7, 0.95])  # subject 0 weakest in view 2: 0.7
    maps[:, 1, 0, 0] = torch.tensor([0.6, 0.9, 0.9, 0.9])  # subject 1 weakest in view 0: 0.6
    loss, per_token = refocus_loss(maps)
    assert per_token.tolist() == pytest.approx([0.7, 0.6])
    assert loss.item() == pytest.approx(0.4)
    maps[0, 1, 2, 2] = 0.85  # subject 1 now found in view 0 too: subject 0 (0.7) leads
    loss, _ = refocus_loss(maps)
    assert loss.item() == pytest.approx(0.3)


def test_refocus_loss_gradient_reaches_only_the_neglected_maximum():
    maps = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    maps[:, 0].flatten(1)[:, 5] = 0.9  # subject 0 well attended everywhere
    maps.requires_grad_(True)
    loss, per_token = refocus_loss(maps)
    loss.backward()
    nonzero = maps.grad.nonzero().tolist()
    assert len(nonzero) == 1
    v, k = nonzero[0][:2]
    assert k == 1 and maps[v, 1].max().item() == pytest.approx(per_token[1].item())


def test_step_size_follows_sqrt_linspace_from_one_to_a_half():
    assert refocus_step_size(0, 25) == pytest.approx(20.0)
    assert refocus_step_size(24, 25) == pytest.approx(20 * math.sqrt(0.5))
    assert refocus_step_size(12, 25) == pytest.approx(20 * math.sqrt(0.75))


def test_a_subject_of_several_tokens_gets_the_sum_of_their_maps():
    probs = torch.rand(2, 4, 8, generator=torch.Generator().manual_seed(0))
    tokens = subject_token_maps(probs, [2, 3, 5], 2, 2, last_token=7)
    maps = subject_maps(probs, [[2, 3], [5]], 2, 2, last_token=7)
    torch.testing.assert_close(maps[:, 0], tokens[:, 0] + tokens[:, 1])
    torch.testing.assert_close(maps[:, 1], tokens[:, 2])
    assert float(maps.max()) <= 1.0


def test_threshold_schedule_parsing():
    assert parse_thresholds("0: 0.05, 10: 0.5, 20: 0.8") == {0: 0.05, 10: 0.5, 20: 0.8}
    assert parse_thresholds("") == {}
    for bad, message in [("10 0.5", "is not 'step: value'"), ("-1: 0.5", "needs a step >= 0"),
                         ("2: 0", "value in \\(0, 1\\]")]:
        with pytest.raises(ValueError, match="^thresholds: .*" + message):
            parse_thresholds(bad)
