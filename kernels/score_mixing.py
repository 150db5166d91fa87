"""Mixed-score sampling maths (seed 003): the lambda(t) schedules and the mixing of two models' noise predictions.

The mixed score of multi-view sampling is

    eps_mix = lambda(t) * eps_mv + (1 - lambda(t)) * eps_2d  (+ w * eps_consis)
    eps_consis = eps_mv(x | all views) - eps_mv(x | each view alone)

with lambda small early (high t) and rising as t falls. Samplers in ComfyUI work with denoised estimates
``x0`` of the noise-scaled latent ``x = x0 + sigma * eps``; :func:`eps_from_denoised` and
:func:`denoised_from_eps` convert, so an eps-prediction and a v-prediction model (whose x0 ComfyUI computes from
their own parameterisation) mix in eps space.

Timesteps ``t`` are the discrete diffusion timesteps of the models, 0 (clean) .. :data:`T_MAX` (pure noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: The top of the timestep range of SD-family discrete schedules (t = 0 .. 999, shown as 0 .. 1000).
T_MAX = 1000.0

KINDS = ("constant", "linear", "cosine", "piecewise")


# ------------------------------------------------------------------------------------------------ schedules

@dataclass(frozen=True)
class LambdaSchedule:
    """lambda(t): the weight of the multi-view score at timestep t (0 = only the 2D model, 1 = only multi-view).

    ``kind``:
      * ``constant``: ``start`` everywhere;
      * ``linear``: ``start`` at t = T_MAX falling or rising linearly to ``end`` at t = 0;
      * ``cosine``: the same ends, eased: ``end + (start - end) * (1 - cos(pi * t / T_MAX)) / 2``;
      * ``piecewise``: linear between ``points`` ((t, lambda) pairs, t increasing), held at the end values
        outside them.
    """

    kind: str = "linear"
    start: float = 0.5
    end: float = 1.0
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("start", "end"):
            check_lambda(name, getattr(self, name))
        if self.kind == "piecewise":
            check_points(self.points)

    def __call__(self, t: float) -> float:
        """lambda at timestep ``t`` (clamped to [0, T_MAX])."""
        t = min(max(float(t), 0.0), T_MAX)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.end + (self.start - self.end) * t / T_MAX
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * (1.0 - math.cos(math.pi * t / T_MAX)) / 2.0
        ts = [p[0] for p in self.points]
        lams = [p[1] for p in self.points]
        if t <= ts[0]:
            return lams[0]
        if t >= ts[-1]:
            return lams[-1]
        for (t0, l0), (t1, l1) in zip(self.points, self.points[1:]):
            if t0 <= t <= t1:
                return l0 + (l1 - l0) * (t - t0) / (t1 - t0)
        raise AssertionError("unreachable: points cover t")

    def curve(self, count: int = 201) -> tuple[Tensor, Tensor]:
        """(count,) timesteps from T_MAX down to 0 and (count,) lambda at each (for plots)."""
        t = torch.linspace(T_MAX, 0.0, count, dtype=torch.float64)
        return t, torch.tensor([self(float(v)) for v in t], dtype=torch.float64)

    def describe(self) -> str:
        if self.kind == "constant":
            return f"lambda = {self.start:g}"
        if self.kind == "piecewise":
            return "lambda piecewise: " + ", ".join(f"t {t:g} -> {v:g}" for t, v in self.points)
        return f"lambda {self.kind}: {self.start:g} at t={T_MAX:g} -> {self.end:g} at t=0"


def check_lambda(name: str, value: float) -> float:
    """``value`` if it is a finite number in [0, 1]; else ValueError naming ``name``."""
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: lambda must be in [0, 1] (0 = only the 2D model, 1 = only the multi-view model), "
                         f"got {value!r}")
    return v


def check_points(points) -> tuple[tuple[float, float], ...]:
    """Piecewise points ((t, lambda), ...) with t strictly increasing in [0, T_MAX] and lambda in [0, 1]."""
    points = tuple((float(t), float(v)) for t, v in points)
    if len(points) < 1:
        raise ValueError("points: a piecewise schedule needs at least one 't: lambda' point, e.g. "
                         "'0: 1.0, 500: 0.7, 1000: 0.3'")
    for t, v in points:
        if not math.isfinite(t) or not 0.0 <= t <= T_MAX:
            raise ValueError(f"points: timestep {t:g} is outside [0, {T_MAX:g}]")
        check_lambda(f"points: at t {t:g}", v)
    for (t0, _), (t1, _) in zip(points, points[1:]):
        if not t1 > t0:
            raise ValueError(f"points: the timesteps must increase from one point to the next (t {t0:g} is "
                             f"followed by t {t1:g}); write them sorted, e.g. '0: 1.0, 500: 0.7, 1000: 0.3'")
    return points


def parse_points(text: str) -> tuple[tuple[float, float], ...]:
    """'t: lambda, t: lambda, ...' -> checked points (see :func:`check_points`); ValueError naming 'points'."""
    pairs = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if item.count(":") != 1:
            raise ValueError(f"points: {item!r} is not a 't: lambda' pair; write e.g. '0: 1.0, 500: 0.7, 1000: 0.3'")
        t_text, v_text = (s.strip() for s in item.split(":"))
        try:
            pairs.append((float(t_text), float(v_text)))
        except ValueError:
            raise ValueError(f"points: {item!r} does not hold two numbers; write e.g. '0: 1.0, 500: 0.7'") from None
    return check_points(pairs)


# ---------------------------------------------------------------------------------------------------- mixing

def eps_from_denoised(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x - x0) / sigma for the noise-scaled latent x (B, C, H, W) and sigma (B,) > 0."""
    return (x - denoised) / sigma.reshape(-1, *[1] * (x.ndim - 1))


def denoised_from_eps(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x - sigma * eps (the inverse of :func:`eps_from_denoised`)."""
    return x - sigma.reshape(-1, *[1] * (x.ndim - 1)) * eps


def mix_eps(eps_mv: Tensor, eps_2d: Tensor, lam: float, consistency: Tensor | None = None,
            weight: float = 0.0) -> Tensor:
    """lam * eps_mv + (1 - lam) * eps_2d (+ weight * consistency); all (B, C, H, W)."""
    out = lam * eps_mv + (1.0 - lam) * eps_2d
    if consistency is not None and weight != 0.0:
        out = out + weight * consistency
    return out


def consistency_eps(eps_joint: Tensor, eps_single: Tensor) -> Tensor:
    """eps_consis = eps_mv(x | all views) - eps_mv(x | each view alone)."""
    return eps_joint - eps_single


# ---------------------------------------------------------------------------------------------------- preview

def plot_schedule(schedule: LambdaSchedule, width: int = 512, height: int = 288) -> Tensor:
    """(height, width, 3) float image in [0, 1]: lambda(t) from t = T_MAX (left, first step) to 0 (right)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 44, width - 16, 28, height - 30

    def px(t: float, lam: float) -> tuple[float, float]:
        return (left + (T_MAX - t) / T_MAX * (right - left), bottom - lam * (bottom - top))

    for lam in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid and lambda labels
        y = px(0.0, lam)[1]
        draw.line([(left, y), (right, y)], fill=(60, 60, 70) if lam not in (0.0, 1.0) else (110, 110, 120))
        draw.text((6, y - 6), f"{lam:.2f}", fill=(200, 200, 200), font=font)
    for t in (1000.0, 750.0, 500.0, 250.0, 0.0):  # time ticks
        x = px(t, 0.0)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=(110, 110, 120))
        draw.text((x - 10, bottom + 8), f"t={t:g}", fill=(200, 200, 200), font=font)
    ts, lams = schedule.curve(max(2, right - left))
    draw.line([px(float(t), float(v)) for t, v in zip(ts, lams)], fill=(80, 170, 245), width=3)
    for t, v in schedule.points if schedule.kind == "piecewise" else ():
        x, y = px(t, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(235, 90, 70), width=2)
    draw.text((left, 8), schedule.describe(), fill=(230, 230, 230), font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
