"""The camera nodes called in-process the way ComfyUI's executor calls them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from compose3d.kernels.cameras import Cameras
from compose3d.nodes.cameras import OrbitCameras, PreviewCameras
from harness.inprocess import run_node
from oracles import mvdream_get_camera


def orbit(**overrides):
    inputs = dict(views=4, elevation=15.0, azimuth_start=0.0, azimuth_span=360.0, distance=2.0, fov=40.0)
    inputs.update(overrides)
    return run_node(OrbitCameras, **inputs)


def test_orbit_cameras_node_outputs_the_mvdream_rig(comfy_inprocess):
    (cameras,) = orbit(views=4, elevation=15.0).result
    assert isinstance(cameras, Cameras)
    assert len(cameras) == 4
    assert cameras.intrinsics.shape == (4, 3, 3)
    np.testing.assert_allclose(cameras.mvdream.numpy(), mvdream_get_camera(4, 15.0, 0.0, 360.0), atol=1e-6)


def test_orbit_cameras_node_names_a_non_finite_input(comfy_inprocess):
    # ComfyUI's range check lets NaN through (every comparison with NaN is false), so the node must catch it.
    with pytest.raises(ValueError, match="^elevation: expected a finite number"):
        orbit(elevation=float("nan"))


def test_preview_cameras_shows_a_picture_and_the_matrices(comfy_inprocess):
    (cameras,) = orbit(views=3, elevation=20.0, azimuth_start=10.0).result
    out = run_node(PreviewCameras, cameras=cameras)
    (image,) = out.ui["images"]
    picture = Image.open(comfy_inprocess / "temp" / image["subfolder"] / image["filename"])
    assert picture.size == (512, 256)
    summary = json.loads(out.ui["text"][0])
    assert summary["views"] == 3
    np.testing.assert_allclose(summary["mvdream"], mvdream_get_camera(3, 20.0, 10.0, 360.0), atol=1e-6)
    # Camera 0 is drawn in red: the picture has red pixels where the top view puts camera 0 (on +z, below centre).
    pixels = np.asarray(picture)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 120) & (pixels[..., 2] < 100)
    rows, cols = np.nonzero(red[:, :256])
    assert rows.size > 0 and rows.mean() > 128
