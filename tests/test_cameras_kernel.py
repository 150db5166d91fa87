"""kernels.cameras against the official MVDream camera convention, worked out by hand and by an oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compose3d.kernels.cameras import orbit_cameras
from oracles import mvdream_get_camera, orbit_c2w

C30, S30 = math.cos(math.radians(30)), 0.5


def test_front_camera_at_zero_elevation_matches_hand_worked_mvdream_vector():
    # p = (0, 0, 1), forward = (0, 0, -1), right = (1, 0, 0), up = (0, 1, 0): c2w rotation is the identity;
    # the Blender flip maps rows (r0, r1, r2) to (r0, -r2, r1).
    cams = orbit_cameras(views=1, elevation=0.0, azimuth_start=0.0, distance=1.0)
    expected = [1, 0, 0, 0,
                0, 0, -1, -1,
                0, 1, 0, 0,
                0, 0, 0, 1]
    assert cams.mvdream[0].tolist() == pytest.approx(expected, abs=1e-7)


def test_side_camera_at_azimuth_90_matches_hand_worked_c2w():
    # p = (1, 0, 0): forward (-1, 0, 0), right = forward x y = (0, 0, -1), up = right x forward = (0, 1, 0).
    cams = orbit_cameras(views=1, elevation=0.0, azimuth_start=90.0, distance=3.0)
    expected = torch.tensor([[0.0, 0.0, 1.0, 3.0],
                             [0.0, 1.0, 0.0, 0.0],
                             [-1.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(cams.c2w[0], expected, atol=1e-6, rtol=0)


def test_elevated_camera_matches_hand_worked_axes():
    # e = 30, a = 0: p = (0, 1/2, cos 30); right = (1, 0, 0); up = (0, cos 30, -1/2); back = p.
    cams = orbit_cameras(views=1, elevation=30.0, distance=2.0)
    c2w = cams.c2w[0].double()
    torch.testing.assert_close(c2w[:3, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(c2w[:3, 1], torch.tensor([0.0, C30, -S30], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(c2w[:3, 2], torch.tensor([0.0, S30, C30], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(c2w[:3, 3], torch.tensor([0.0, 2 * S30, 2 * C30], dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("views,elevation,start,span,distance", [
    (4, 15.0, 0.0, 360.0, 1.0),       # MVDream's default rig
    (4, 0.0, 45.0, 360.0, 2.5),
    (8, -20.0, -30.0, 180.0, 0.7),
    (1, 89.0, 10.0, 360.0, 4.0),
    (7, 42.5, 123.0, -270.0, 1.3),
])
def test_rig_matches_official_mvdream_convention(views, elevation, start, span, distance):
    cams = orbit_cameras(views=views, elevation=elevation, azimuth_start=start, azimuth_span=span,
                         distance=distance)
    np.testing.assert_allclose(cams.mvdream.numpy(), mvdream_get_camera(views, elevation, start, span), atol=1e-6)
    np.testing.assert_allclose(cams.c2w.numpy(), orbit_c2w(views, elevation, start, span, distance), atol=1e-5)
    np.testing.assert_allclose(cams.azimuth_deg.numpy(), start + span * np.arange(views) / views, atol=1e-4)


def test_mvdream_vectors_do_not_encode_distance():
    near = orbit_cameras(views=4, elevation=15.0, distance=0.5)
    far = orbit_cameras(views=4, elevation=15.0, distance=5.0)
    torch.testing.assert_close(near.mvdream, far.mvdream)
    assert far.positions.norm(dim=-1).tolist() == pytest.approx([5.0] * 4, rel=1e-6)


def test_every_camera_looks_at_the_origin_with_an_upright_orthonormal_frame():
    cams = orbit_cameras(views=12, elevation=-35.0, azimuth_start=7.0, distance=2.0)
    rot = cams.c2w[:, :3, :3].double()
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(12, 3, 3),
                               atol=1e-6, rtol=0)
    assert torch.linalg.det(rot).tolist() == pytest.approx([1.0] * 12, abs=1e-6)
    looking = -rot[:, :, 2]  # the camera looks along its -z axis
    to_origin = -cams.positions.double() / cams.positions.double().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(looking, to_origin, atol=1e-6, rtol=0)
    assert (rot[:, 1, 1] > 0).all()  # camera up has a positive world-y component


def test_pixel_intrinsics_project_the_fov_edge_to_the_image_edge():
    cams = orbit_cameras(views=2, fov=60.0)
    k = cams.pixel_intrinsics(height=256, width=128)[0].double()
    f = 128 / math.tan(math.radians(30))
    torch.testing.assert_close(k, torch.tensor([[f, 0, 64], [0, f, 128], [0, 0, 1]], dtype=torch.float64),
                               atol=1e-3, rtol=0)
    # A point 30 degrees above the optical axis (camera frame, OpenGL: y up, looking along -z) lands on row 0.
    y_cam, z_cam = math.tan(math.radians(30)), -1.0
    row = k[1, 2] - k[1, 1] * (y_cam / -z_cam)
    assert row == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("kwargs,name", [
    ({"views": 0}, "views"),
    ({"views": 2000}, "views"),
    ({"elevation": float("nan")}, "elevation"),
    ({"elevation": 90.0}, "elevation"),
    ({"azimuth_start": float("inf")}, "azimuth_start"),
    ({"azimuth_span": 400.0}, "azimuth_span"),
    ({"distance": 0.0}, "distance"),
    ({"distance": float("-inf")}, "distance"),
    ({"fov": 180.0}, "fov"),
    ({"fov": float("nan")}, "fov"),
])
def test_bad_parameters_are_rejected_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        orbit_cameras(**kwargs)


def test_selecting_and_combining_cameras_keeps_every_field_aligned():
    from compose3d.kernels.cameras import concat_cameras

    rig = orbit_cameras(views=6, elevation=20.0, azimuth_start=10.0)
    assert rig[2].azimuth_deg.tolist() == pytest.approx([130.0])
    assert rig[-1].azimuth_deg.tolist() == pytest.approx([310.0])
    picked = rig[[4, 1]]
    torch.testing.assert_close(picked.mvdream, rig.mvdream[[4, 1]])
    torch.testing.assert_close(picked.c2w, rig.c2w[[4, 1]])
    both = concat_cameras(rig[:2], orbit_cameras(views=1, elevation=-5.0))
    assert both.elevation_deg.tolist() == pytest.approx([20.0, 20.0, -5.0])
    np.testing.assert_allclose(both.mvdream[2].numpy(), mvdream_get_camera(1, -5.0, 0.0, 360.0)[0], atol=1e-6)
