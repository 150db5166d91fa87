"""lambda(t) schedules and eps mixing (kernels/score_mixing.py) against their closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compose3d.kernels.score_mixing import (LambdaSchedule, consistency_eps, denoised_from_eps, eps_from_denoised,
                                            mix_eps, parse_points, plot_schedule)


@pytest.mark.parametrize("t", [0.0, 1.0, 250.0, 499.0, 500.0, 777.0, 999.0, 1000.0])
def test_schedules_follow_their_formulas(t):
    a, b = 0.2, 0.95
    assert LambdaSchedule("constant", a, b)(t) == a
    assert LambdaSchedule("linear", a, b)(t) == pytest.approx(b + (a - b) * t / 1000)
    assert LambdaSchedule("cosine", a, b)(t) == pytest.approx(b + (a - b) * 0.5 * (1 - math.cos(math.pi * t / 1000)))
    pts = ((100.0, 0.9), (600.0, 0.5), (900.0, 0.1))
    expected = float(np.interp(t, [p[0] for p in pts], [p[1] for p in pts]))
    assert LambdaSchedule("piecewise", points=pts)(t) == pytest.approx(expected)


def test_schedules_run_from_start_at_the_first_step_to_end_at_the_last():
    for kind in ("linear", "cosine"):
        s = LambdaSchedule(kind, 0.3, 0.9)
        assert s(1000) == pytest.approx(0.3) and s(0) == pytest.approx(0.9)
        ts, lams = s.curve(11)
        assert ts[0] == 1000 and ts[-1] == 0
        assert bool((lams[1:] >= lams[:-1]).all())  # rising as t falls
    assert LambdaSchedule("linear", 0.3, 0.9)(5000) == pytest.approx(0.3)  # clamped outside [0, 1000]


def test_points_parse_and_bad_schedules_are_refused_by_name():
    assert parse_points("0: 1.0, 500: 0.6,\n1000: 0.3") == ((0.0, 1.0), (500.0, 0.6), (1000.0, 0.3))
    with pytest.raises(ValueError, match=r"^points: the timesteps must increase .*t 500 is followed by t 100"):
        parse_points("0: 1, 500: 0.5, 100: 0.2")
    with pytest.raises(ValueError, match=r"^points: the timesteps must increase"):
        parse_points("0: 1, 0: 0.5")
    with pytest.raises(ValueError, match=r"^points: at t 500: lambda must be in \[0, 1\]"):
        parse_points("0: 1, 500: 1.5")
    with pytest.raises(ValueError, match=r"^points: timestep 1200 is outside"):
        parse_points("0: 1, 1200: 0.5")
    with pytest.raises(ValueError, match=r"^points: 'abc' is not a 't: lambda' pair"):
        parse_points("abc")
    with pytest.raises(ValueError, match=r"^points: 'x: 1' does not hold two numbers"):
        parse_points("x: 1")
    with pytest.raises(ValueError, match=r"^points: a piecewise schedule needs at least one"):
        parse_points(" , ")
    with pytest.raises(ValueError, match=r"^start: lambda must be in \[0, 1\]"):
        LambdaSchedule("linear", -0.1, 0.5)
    with pytest.raises(ValueError, match=r"^end: lambda must be in \[0, 1\]"):
        LambdaSchedule("linear", 0.1, float("nan"))
    with pytest.raises(ValueError, match=r"^kind: 'exp' is not one of"):
        LambdaSchedule("exp")


def test_eps_conversions_and_the_mixture():
    gen = torch.Generator().manual_seed(0)
    x, x0a, x0b, x0s = (torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    sigma = torch.full((4,), 2.5, dtype=torch.float64)
    ea, eb, es = (eps_from_denoised(x, v, sigma) for v in (x0a, x0b, x0s))
    assert torch.allclose(ea, (x - x0a) / 2.5)
    assert torch.allclose(denoised_from_eps(x, ea, sigma), x0a)
    lam, w = 0.3, 0.7
    mixed = mix_eps(ea, eb, lam, consistency_eps(ea, es), w)
    assert torch.allclose(mixed, lam * ea + (1 - lam) * eb + w * (ea - es))
    # in x0 terms the mixture is the same linear combination of the denoised estimates
    assert torch.allclose(denoised_from_eps(x, mix_eps(ea, eb, lam), sigma), lam * x0a + (1 - lam) * x0b)


def test_the_preview_draws_the_curve():
    image = plot_schedule(LambdaSchedule("linear", 0.0, 1.0))
    assert image.shape == (288, 512, 3) and image.min() >= 0 and image.max() <= 1
    blue = (image[..., 2] > 0.8) & (image[..., 0] < 0.5)  # the curve's colour
    rows, cols = blue.nonzero(as_tuple=True)
    # lambda rises from 0 (bottom) at the left to 1 (top) at the right: the curve's rows fall as columns grow
    left = rows[cols < cols.float().quantile(0.2)].float().mean()
    right = rows[cols > cols.float().quantile(0.8)].float().mean()
    assert left > right + 100
