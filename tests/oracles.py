"""Independent references written from the specifications (DESIGN.md, the papers), not from the pack's code."""
from __future__ import annotations

import numpy as np


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
