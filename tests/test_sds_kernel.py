"""SDS maths against independent formulas: annealed timesteps, camera batches, the two losses, regularisers."""
from __future__ import annotations

import math

import pytest
import torch

from compose3d.kernels.cameras import orbit_cameras
from compose3d.kernels.distill import (References, SDSSettings, reference_weight, sds_start, timestep_range)
from compose3d.kernels.field import FieldConfig, RadianceField
from compose3d.kernels.renderer import difference_normals
from compose3d.kernels.sds import (CameraRanges, ResolutionSchedule, TimestepRange, classic_sds_loss,
                                   sample_cameras, sample_timestep, x0_reconstruction_loss)


def threestudio_bounds(step: int, timesteps: int = 1000) -> tuple[int, int]:
    """MVDream-threestudio's min/max step: [0, 0.98, 0.02, 8000] and [0, 0.98, 0.50, 8000], int(T * value)."""
    u = min(step / 8000, 1.0)
    return int(timesteps * (0.98 + (0.02 - 0.98) * u)), int(timesteps * (0.98 + (0.50 - 0.98) * u))


@pytest.mark.parametrize("step", [0, 1, 2000, 4000, 7999, 8000, 9500])
def test_annealed_bounds_follow_mvdream(step):
    assert TimestepRange.mvdream(8000).bounds(step, 1000) == threestudio_bounds(step)


def test_sampled_timesteps_cover_the_range_and_stay_inside():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_timestep((480, 500), gen) for _ in range(2000)]
    assert min(draws) == 480 and max(draws) == 500  # both ends included, as torch.randint(lo, hi + 1)
    assert 480 <= sum(draws) / len(draws) <= 500


def test_settings_scale_the_schedules_with_the_steps():
    s = SDSSettings(steps=1000)
    assert s.resolution().at(499) == (64, 8) and s.resolution().at(500) == (256, 4)
    assert timestep_range(s, None).bounds(800, 1000) == (20, 500)  # annealed over 80% of the steps
    assert timestep_range(s, None).bounds(400, 1000) == threestudio_bounds(4000)
    assert ResolutionSchedule(((0, 64, 8),)).largest() == (64, 8)


def test_hybrid_warm_start_caps_timesteps_and_decays_the_reference_weight():
    s = SDSSettings(steps=100)
    refs = References(torch.zeros(4, 8, 8, 3), orbit_cameras(4), fit_fraction=0.2, weight_start=1000.0,
                      weight_end=100.0, warm_max_t=0.4)
    assert sds_start(s, refs) == 20
    t = timestep_range(s, refs)
    assert t.bounds(20, 1000) == (400, 400)  # SDS enters at the warm-start maximum, not 0.98
    assert t.bounds(20 + 64, 1000) == (20, 400)  # annealed over 80% of the 80 SDS steps, capped at 0.4
    assert reference_weight(0, s, refs) == 1.0 and reference_weight(19, s, refs) == 1.0
    assert reference_weight(20, s, refs) == 1000.0 and reference_weight(99, s, refs) == pytest.approx(100.0)
    assert 100.0 < reference_weight(60, s, refs) < 1000.0


def test_camera_batches_follow_the_ranges_and_the_official_rig():
    ranges = CameraRanges(elevation=(0.0, 30.0), fov=(15.0, 60.0), distance=(0.8, 1.0))
    cams = sample_cameras(64, ranges, torch.Generator().manual_seed(3))
    elev, azim = cams.elevation_deg.double(), cams.azimuth_deg.double()
    fov = torch.rad2deg(cams.fov_y.double())
    dist = cams.positions.double().norm(dim=-1)
    assert elev.min() >= 0 and elev.max() <= 30 and fov.min() >= 15 and fov.max() <= 60
    scaled = dist * torch.tan(torch.deg2rad(fov) / 2)  # MVDream's relative radius: distance / tan(fov / 2)
    assert scaled.min() >= 0.8 - 1e-5 and scaled.max() <= 1.0 + 1e-5
    assert elev.max() - elev.min() > 20 and fov.max() - fov.min() > 30  # the ranges are used, not one value
    for obj in range(16):
        v = slice(4 * obj, 4 * obj + 4)
        for values in (elev[v], fov[v], dist[v]):
            assert torch.allclose(values, values[0].expand(4), atol=1e-5)  # one per object
        steps = torch.diff(azim[v])
        assert torch.allclose(steps, torch.full((3,), 90.0, dtype=torch.float64), atol=1e-4)
    for i in (0, 5, 33, 63):  # each camera is the official orbit camera at its elevation/azimuth/distance/fov
        ref = orbit_cameras(1, float(elev[i]), float(azim[i]), 360.0, float(dist[i]), float(fov[i]))
        assert torch.allclose(cams.c2w[i], ref.c2w[0], atol=1e-5)
        assert torch.allclose(cams.mvdream[i], ref.mvdream[0], atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        sample_cameras(6, ranges, torch.Generator())


def _latents(seed: int, b: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(4)]


def test_x0_reconstruction_loss_matches_mvdream():
    z, x0_cfg, x0_cond, _ = _latents(0)
    x0_cond = 0.5 * x0_cond  # a different std, so the rescale matters
    z.requires_grad_(True)
    loss = x0_reconstruction_loss(z, x0_cfg, x0_cond, views=4, rescale=0.5)
    # MVDream-threestudio, written out: per object of 4 views, factor = std(no cfg) / std(cfg) over all its
    # latents; x0' = rescale * x0 * factor + (1 - rescale) * x0; loss = 0.5 * sum((z - x0')^2) / B.
    nocfg = x0_cond.view(-1, 4, 4, 8, 8)
    cfg = x0_cfg.view(-1, 4, 4, 8, 8)
    factor = (nocfg.std([1, 2, 3, 4], keepdim=True) + 1e-8) / (cfg.std([1, 2, 3, 4], keepdim=True) + 1e-8)
    adjusted = (cfg * factor).view(8, 4, 8, 8)
    target = 0.5 * adjusted + 0.5 * x0_cfg
    expected = 0.5 * ((z.detach() - target) ** 2).sum() / 8
    assert torch.allclose(loss.detach(), expected, rtol=1e-12)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, (z.detach() - target) / 8, rtol=1e-10)
    plain = x0_reconstruction_loss(z, x0_cfg, x0_cond, views=4, rescale=0.0)
    assert torch.allclose(plain.detach(), 0.5 * ((z.detach() - x0_cfg) ** 2).sum() / 8)
    assert not torch.allclose(plain.detach(), loss.detach())  # the rescale changed the target


def test_classic_sds_gradient_is_weighted_eps_difference():
    z, eps_hat, noise, _ = _latents(1)
    z.requires_grad_(True)
    eps_hat[0, 0, 0, 0] = float("nan")
    loss = classic_sds_loss(z, eps_hat, noise, weight=0.3)
    (grad,) = torch.autograd.grad(loss, z)
    expected = 0.3 * (eps_hat - noise) / 8
    expected[0, 0, 0, 0] = 0.0  # non-finite entries are dropped, as threestudio's nan_to_num
    assert torch.allclose(grad, expected, rtol=1e-12)
    assert math.isfinite(float(loss.detach()))


def test_difference_normals_match_autograd_normals():
    torch.manual_seed(0)
    field = RadianceField(FieldConfig(levels=4, log2_table_size=12, blob_density=10.0))
    points = (torch.rand(256, 3) - 0.5) * 0.6
    fd = difference_normals(field, points, 1e-3)
    exact = field.normals(points)
    cosine = (fd * exact).sum(-1).detach()
    assert float(cosine.median()) > 0.999
    assert float(cosine.min()) > 0.95
    points.requires_grad_(False)
    (g,) = torch.autograd.grad(difference_normals(field, points, 1e-3)[:, 0].sum(), field.encoding.table)
    assert g.abs().sum() > 0  # differentiable w.r.t. the field, unlike field.normals
