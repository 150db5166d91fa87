"""The camera nodes called in-process the way ComfyUI's executor calls them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from compose3d.kernels.cameras import Cameras
from compose3d.nodes.cameras import OrbitCameras, PreviewCameras, SDSCameras
from compose3d.nodes.validation import InputError
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


SDS_CAMERAS = dict(groups=20, views_per_group=4, elevation_min=0.0, elevation_max=30.0, fov_min=15.0, fov_max=60.0,
                   distance_min=0.8, distance_max=1.0, seed=0)


def test_sds_cameras_are_groups_of_four_views_a_quarter_turn_apart_within_mvdreams_ranges(comfy_inprocess):
    (cameras,) = run_node(SDSCameras, **SDS_CAMERAS).result
    assert len(cameras) == 80
    position = cameras.c2w[:, :3, 3].double().numpy()
    radius = np.linalg.norm(position, axis=1)
    elevation = np.degrees(np.arcsin(position[:, 1] / radius))
    azimuth = np.degrees(np.arctan2(position[:, 0], position[:, 2]))  # 0 on +z, MVDream's convention
    fov = cameras.fov_y.double().numpy()
    for group in range(20):
        g = slice(4 * group, 4 * group + 4)
        assert np.ptp(radius[g]) < 1e-5 and np.ptp(elevation[g]) < 1e-3 and np.ptp(fov[g]) < 1e-6
        steps = np.diff(np.unwrap(np.radians(azimuth[g])))
        np.testing.assert_allclose(np.degrees(steps) % 360.0, 90.0, atol=1e-3)
    assert 0.0 <= elevation.min() and elevation.max() <= 30.0 and np.ptp(elevation) > 10.0
    assert np.radians(15.0) - 1e-6 <= fov.min() and fov.max() <= np.radians(60.0) + 1e-6
    size = radius * np.tan(fov / 2)  # the distance before MVDream's 1 / tan(fov / 2) scaling
    assert 0.8 - 1e-5 <= size.min() and size.max() <= 1.0 + 1e-5
    (other,) = run_node(SDSCameras, **{**SDS_CAMERAS, "seed": 1}).result
    assert not np.allclose(other.c2w.numpy(), cameras.c2w.numpy())


@pytest.mark.parametrize("name", ["elevation", "fov", "distance"])
def test_sds_cameras_refuse_an_empty_range(comfy_inprocess, name):
    low, high = SDS_CAMERAS[f"{name}_min"], SDS_CAMERAS[f"{name}_max"]
    with pytest.raises(InputError, match=f"^{name}_min: .* is above {name}_max"):
        run_node(SDSCameras, **{**SDS_CAMERAS, f"{name}_min": high, f"{name}_max": low})
