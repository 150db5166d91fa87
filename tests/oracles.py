"""Independent references written from the specifications (DESIGN.md, the papers), not from the pack's code."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import torch

from harness.paths import PACK_ROOT


def import_hiding_pack_root(*names: str) -> list:
    """Import the modules ``names`` (e.g. diffusers) with the repository root off ``sys.path``.

    transformers (which some diffusers modules import) imports Hugging Face's ``kernels`` package when it is
    installed; with the repository root on ``sys.path`` (pytest's ``pythonpath``) the pack's own top-level
    ``kernels/`` folder would be found under that name instead. The pack itself is imported as ``compose3d``
    and never as a top-level ``kernels``.
    """
    def is_root(entry: str) -> bool:
        return Path(entry or ".").resolve() == PACK_ROOT.resolve()

    shadowing = sys.modules.get("kernels")
    if shadowing is not None and is_root(str(Path(getattr(shadowing, "__file__", "") or ".").parent.parent)):
        del sys.modules["kernels"]
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not is_root(entry)]
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path[:] = saved


def mvdream_get_camera(views: int, elevation: float, azimuth_start: float, azimuth_span: float) -> np.ndarray:
    """MVDream's official camera vectors (views, 16), from the convention written in DESIGN.md.

    Azimuths start, start + span/N, ...; OpenGL position p = (cos e sin a, sin e, cos e cos a) on the unit
    sphere; forward = normalise(-p); right = normalise(forward x (0,1,0)); up = normalise(right x forward);
    c2w[:3,:3] = [right, up, -forward] as columns; c2w[:3,3] = p; left-multiplied by the OpenGL->Blender
    flip; flattened row-major.
    """
    out = []
    for i in range(views):
        a = np.radians(azimuth_start + azimuth_span * i / views)
        e = np.radians(elevation)
        p = np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
        forward = -p / np.linalg.norm(p)
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        up /= np.linalg.norm(up)
        m = np.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -forward, p
        flip = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
        out.append((flip @ m).reshape(16))
    return np.stack(out)


def orbit_c2w(views: int, elevation: float, azimuth_start: float, azimuth_span: float,
              distance: float) -> np.ndarray:
    """OpenGL camera-to-world matrices (views, 4, 4) of the same rig at ``distance`` (no flip)."""
    flip_inv = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)
    mats = flip_inv @ mvdream_get_camera(views, elevation, azimuth_start, azimuth_span).reshape(-1, 4, 4)
    mats[:, :3, 3] *= distance
    return mats


# ------------------------------------------------------------------ DreamBeast's attention modulation

#: DreamBeast's guard inside logarithms and square roots.
EPS = 1e-9


def hand_made_maps(views: int = 4, size: int = 4) -> torch.Tensor:
    """(V, 2, size, size): part 0 a soft blob moving across the views, part 1 its complement plus a ramp."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    maps = []
    for v in range(views):
        cx = 0.2 + 0.2 * v
        blob = torch.exp(-((x - cx) ** 2 + (y - 0.5) ** 2) / 0.08)
        maps.append(torch.stack([blob, 1.0 - blob + 0.3 * y]))
    return torch.stack(maps).double()


def cross_oracle(maps, groups, length, s):
    v, k, h, w = maps.shape
    out = torch.zeros(v, h * w, length, dtype=torch.float64)
    for part, columns in enumerate(groups):
        values = [float(maps[vi, part, r, c]) for vi in range(v) for r in range(h) for c in range(w)]
        mean = sum(values) / len(values)
        for vi in range(v):
            for r in range(h):
                for c in range(w):
                    for column in columns:
                        out[vi, r * w + c, column] += s * math.log(float(maps[vi, part, r, c]) / mean + EPS)
    return out


def self_oracle(maps, s):
    v, k, h, w = maps.shape
    n = v * h * w
    out = torch.zeros(n, n, dtype=torch.float64)
    for part in range(k):
        flat = [float(maps[vi, part, r, c]) for vi in range(v) for r in range(h) for c in range(w)]
        mean, high, low = sum(flat) / n, max(flat), min(flat)
        m = [x / mean for x in flat]
        inv = [(high - x) / (high - low) / mean if high > low else 0.0 for x in flat]  # constant: no inverse
        a = [[m[i] * m[j] for j in range(n)] for i in range(n)]
        b = [[inv[i] * inv[j] for j in range(n)] for i in range(n)]
        a_mean = sum(map(sum, a)) / n ** 2
        b_mean = sum(map(sum, b)) / n ** 2
        for i in range(n):
            for j in range(n):
                x = a[i][j] / 10 if a[i][j] < a_mean else a[i][j]
                y = b[i][j] / 10 if b[i][j] < b_mean else b[i][j]
                out[i, j] += s * math.log((math.sqrt(x + EPS) + math.sqrt(y + EPS)) / 2 + EPS)
    return out
