"""View Consistency Score (issue 13, MVC): reconstruct the views, render them back, measure the reprojection error.

The issue's property: the score is lower for views rendered from one object than for the same views with one of
them replaced by a view of another object. The views are exact renders of the built-in test object from 4 orbit
cameras; the other object is a small green sphere, rendered here from the replaced view's camera. Both with masks
(the sphere's own silhouette for the replaced view) and without.

The per-view errors do not single out the replaced view, so no test asks them to (measured, seeds 0-2): without
masks the view opposite the replaced one sees the same lines of sight and shares the conflict about equally, and
view 1 has the largest error even when all views agree; with masks the sphere's small silhouette carves the
visual hull the fit starts from, so the replaced view is explained best and the others lose parts of the object.
"""
from __future__ import annotations

import math
import re
import time

import pytest
import torch

from compose3d.kernels.cameras import Cameras, orbit_cameras
from compose3d.kernels.rays import camera_rays
from compose3d.kernels.toy_object import render_toy_object
from compose3d.nodes.view_consistency import ViewConsistencyScore
from harness.inprocess import run_node

SIZE = 32
REPLACED = 2  # the view seen from behind (azimuth 180)
FIT = dict(steps=150, rays_per_step=1024, samples_per_ray=32, learning_rate=0.01, background="white", seed=0)
#: without masks every cell is sampled until the occupancy warm-up ends: fewer rays keep the fit as fast
RAYS_WITHOUT_MASKS = 512
#: least replaced / consistent score ratio accepted (measured with seeds 0-2: see the test)
MIN_RATIO = {"masks": 1.4, "no masks": 1.15}


def rig() -> Cameras:
    return orbit_cameras(4, 15.0, 0.0, 360, 2.5, 40)


def other_object(cameras: Cameras, size: int, centre=(0.15, 0.1, 0.0), radius: float = 0.3,
                 color=(0.1, 0.7, 0.2)) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact renders of a shaded sphere over white: rgb (N, H, W, 3) and mask (N, H, W)."""
    origins, directions = camera_rays(cameras, size, size, device="cpu")
    o, d = origins.reshape(-1, 3).double(), directions.reshape(-1, 3).double()
    c = torch.tensor(centre, dtype=torch.float64)
    b = ((o - c) * d).sum(-1)
    disc = b * b - ((o - c) ** 2).sum(-1) + radius * radius
    t = -b - disc.clamp_min(0.0).sqrt()
    hit = (disc > 0) & (t > 0)
    normal = (o + d * t[:, None] - c) / radius
    shade = (0.6 + 0.4 * normal[:, 1:2]).clamp(0.0, 1.0)  # lit from above
    rgb = torch.where(hit[:, None], torch.tensor(color, dtype=torch.float64) * shade,
                      torch.ones(1, 3, dtype=torch.float64))
    n = len(cameras)
    return rgb.float().view(n, size, size, 3), hit.float().view(n, size, size)


def views(replace: bool):
    """The 4 views and their masks; with ``replace``, view REPLACED shows the other object instead."""
    cameras = rig()
    images, masks, _ = render_toy_object(cameras, SIZE, SIZE)
    if replace:
        rgb, mask = other_object(cameras[REPLACED], SIZE)
        images[REPLACED], masks[REPLACED] = rgb[0], mask[0]
    return images, masks, cameras


def measure(replace: bool, with_masks: bool) -> dict:
    images, masks, cameras = views(replace)
    started = time.monotonic()
    fit = FIT if with_masks else {**FIT, "rays_per_step": RAYS_WITHOUT_MASKS}
    score, report, error_images = run_node(ViewConsistencyScore, images=images, cameras=cameras,
                                           masks=masks if with_masks else None, **fit).result
    return {"score": score, "report": report, "error_images": error_images,
            "seconds": time.monotonic() - started}


@pytest.fixture(scope="module", params=["masks", "no masks"])
def pair(request, comfy_inprocess):
    """(consistent, one view replaced), measured with or without masks."""
    with_masks = request.param == "masks"
    return request.param, measure(replace=False, with_masks=with_masks), measure(replace=True, with_masks=with_masks)


def per_view_errors(report: str) -> list[float]:
    """The per-view errors of the report, in view order."""
    lines = [re.match(r"view (\d+)\b.*: ([0-9.]+)", line) for line in report.splitlines()]
    return [float(m[2]) for m in lines if m]


def test_one_view_of_another_object_raises_the_score(pair):
    """Measured scores (consistent -> replaced), seeds 0/1/2: with masks 0.015 -> 0.025 (x1.7), x2.3, x1.8 (with
    512 rays per step, seed 0: x1.54); without 0.048 -> 0.063 (x1.33), x1.33, x1.51 (with 1024 rays, seed 0:
    x1.26)."""
    kind, consistent, replaced = pair
    print(f"\n{kind}: consistent {consistent['score']:.4f} ({consistent['seconds']:.1f} s), view {REPLACED} "
          f"replaced {replaced['score']:.4f} ({replaced['seconds']:.1f} s), "
          f"ratio {replaced['score'] / consistent['score']:.2f}\n{consistent['report']}\n{replaced['report']}")
    assert replaced["score"] > MIN_RATIO[kind] * consistent["score"]


def test_the_outputs_have_the_documented_shapes(pair):
    kind, consistent, _ = pair
    score, report, rows = consistent["score"], consistent["report"], consistent["error_images"]
    assert rows.shape == (4, SIZE, 3 * SIZE, 3)
    assert rows.dtype == torch.float32 and float(rows.min()) >= 0.0 and float(rows.max()) <= 1.0
    assert isinstance(score, float) and math.isfinite(score) and score > 0.0
    errors = per_view_errors(report)
    assert len(errors) == 4
    assert score == pytest.approx(sum(errors) / 4, abs=1e-4)  # the report rounds to 4 decimals
    worst = max(range(4), key=lambda i: errors[i])
    assert f"worst view: {worst}" in report
    # the left third is the view as compared: with masks, the image over the white background
    images, masks, _ = views(replace=False)
    compared = images * masks[..., None] + (1 - masks[..., None]) if kind == "masks" else images
    assert torch.allclose(rows[:, :, :SIZE], compared, atol=1e-6)


def test_images_and_cameras_of_different_counts_are_refused(comfy_inprocess):
    images, _, cameras = views(replace=False)
    with pytest.raises(ValueError, match=r"^cameras: 4 cameras for 3 images"):
        run_node(ViewConsistencyScore, images=images[:3], cameras=cameras, **FIT)


def test_masks_of_the_wrong_size_are_refused(comfy_inprocess):
    images, masks, cameras = views(replace=False)
    small = torch.nn.functional.interpolate(masks[:, None], size=(16, 16))[:, 0]
    with pytest.raises(ValueError, match=r"^masks: mask size 16x16 differs from the image size 32x32"):
        run_node(ViewConsistencyScore, images=images, cameras=cameras, masks=small, **FIT)
    with pytest.raises(ValueError, match=r"^masks: 3 masks for 4 images"):
        run_node(ViewConsistencyScore, images=images, cameras=cameras, masks=masks[:3], **FIT)


def test_cancel_stops_the_fit(comfy_inprocess):
    import comfy.model_management

    images, masks, cameras = views(replace=False)
    comfy.model_management.interrupt_current_processing(True)
    started = time.monotonic()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(ViewConsistencyScore, images=images, cameras=cameras, masks=masks, **{**FIT, "steps": 100000})
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert time.monotonic() - started < 10.0
