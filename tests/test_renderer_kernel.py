"""Renderer pieces against independent oracles: nerfacc, closed forms, hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compose3d.kernels.background import SolidBackground
from compose3d.kernels.cameras import orbit_cameras, concat_cameras
from compose3d.kernels.field import FieldConfig, RadianceField
from compose3d.kernels.hashgrid import HashGrid
from compose3d.kernels.occupancy import OccupancyGrid
from compose3d.kernels.rays import camera_rays, ray_aabb
from compose3d.kernels.renderer import RenderSettings, render_rays, render_views
from compose3d.kernels.volume_rendering import accumulate, render_weights


class ConstantSphere(nn.Module):
    """Density ``sigma`` inside a sphere of radius ``radius`` at the origin, 0 outside; constant colour."""

    def __init__(self, sigma: float, radius: float, bound: float = 1.0):
        super().__init__()
        self.sigma, self.radius = sigma, radius
        self.register_buffer("aabb", torch.tensor([[-bound] * 3, [bound] * 3]))

    def forward(self, x):
        inside = (x.norm(dim=-1) < self.radius).to(x.dtype)
        return self.sigma * inside, torch.full_like(x, 0.25)

    channels = 3

    def normals(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


def test_weights_match_nerfacc_reference():
    from nerfacc.volrend import accumulate_along_rays, render_weight_from_density

    gen = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(64, 33, generator=gen) * 4, dim=-1).values
    sigmas = torch.rand(64, 32, generator=gen) * 5
    sigmas[:, ::7] = 0.0  # padding-like gaps
    ours_w, ours_t, ours_a = render_weights(t[:, :-1], t[:, 1:], sigmas)
    ref_w, ref_t, ref_a = render_weight_from_density(t[:, :-1], t[:, 1:], sigmas)
    torch.testing.assert_close(ours_w, ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_t, ref_t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_a, ref_a, atol=1e-6, rtol=1e-5)
    values = torch.rand(64, 32, 3, generator=gen)
    torch.testing.assert_close(accumulate(ours_w, values), accumulate_along_rays(ref_w, values), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impact", [0.0, 0.3, 0.55])
def test_constant_density_sphere_matches_closed_form_opacity_and_depth(impact):
    sigma, radius, z0 = 3.0, 0.6, 3.0
    field = ConstantSphere(sigma, radius)
    origins = torch.tensor([[impact, 0.0, z0]])
    directions = torch.tensor([[0.0, 0.0, -1.0]])
    out = render_rays(field, SolidBackground((1.0, 1.0, 1.0)), origins, directions, samples_per_ray=4096,
                      with_normals=True)
    half = math.sqrt(radius ** 2 - impact ** 2)
    length, t1 = 2 * half, z0 - half
    opacity = 1 - math.exp(-sigma * length)
    depth = t1 * opacity + 1 / sigma - (length + 1 / sigma) * math.exp(-sigma * length)
    assert out["opacity"].item() == pytest.approx(opacity, abs=2e-3)
    assert out["depth"].item() == pytest.approx(depth, abs=5e-3)
    assert out["features"][0].tolist() == pytest.approx([0.25 * opacity + (1 - opacity)] * 3, abs=2e-3)
    # Weighted normals: integrate the radial normal's x component b / sqrt(b^2 + z^2) against the closed-form
    # weights sigma * exp(-sigma (t - t1)) along the chord (fine trapezoid rule).
    t = torch.linspace(t1, t1 + length, 200001, dtype=torch.float64)
    z = z0 - t
    integrand = sigma * torch.exp(-sigma * (t - t1)) * impact / torch.sqrt(impact ** 2 + z ** 2).clamp_min(1e-12)
    assert out["normal"][0, 0].item() == pytest.approx(float(torch.trapezoid(integrand, t)), abs=3e-3)


class SmoothFeatureField(nn.Module):
    """A C-channel field known in closed form: a Gaussian density bump and features ``sigmoid(x W^T + b)``."""

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.channels = channels
        self.weight = nn.Parameter(torch.randn(channels, 3, generator=gen))
        self.bias = nn.Parameter(torch.randn(channels, generator=gen))
        self.register_buffer("aabb", torch.tensor([[-1.0] * 3, [1.0] * 3]))

    def forward(self, x):
        return 6.0 * torch.exp(-(x * x).sum(-1) / 0.2), torch.sigmoid(x @ self.weight.T + self.bias)


def nerfacc_render(field, background, origins, directions, samples_per_ray):
    """The same stratified midpoints (box entry to exit by the slab method) through nerfacc's weights and
    accumulation (its ``rendering`` insists on 3 channels, its ray-box test on its CUDA extension)."""
    from nerfacc.volrend import accumulate_along_rays, render_weight_from_density

    slabs = (field.aabb[:, None] - origins) / directions  # (2, R, 3)
    t_near = slabs.min(dim=0).values.max(dim=-1).values.clamp_min(0.0)
    t_far = slabs.max(dim=0).values.min(dim=-1).values
    hit = (t_far > t_near)[:, None]
    t_near, t_far = torch.where(hit[:, 0], t_near, 0.0), torch.where(hit[:, 0], t_far, 0.0)
    t = t_near[:, None] + (t_far - t_near)[:, None] * torch.linspace(0.0, 1.0, samples_per_ray + 1)
    t_starts, t_ends = t[:, :-1], t[:, 1:]
    midpoints = (t_starts + t_ends) / 2
    sigmas, features = field((origins[:, None] + directions[:, None] * midpoints[..., None]).reshape(-1, 3))
    weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas.reshape(t_starts.shape) * hit)
    opacities = accumulate_along_rays(weights, None)
    colors = accumulate_along_rays(weights, features.reshape(*t_starts.shape, -1))
    depths = accumulate_along_rays(weights, midpoints[..., None])
    return colors + (1.0 - opacities) * background(directions), opacities, depths


def feature_rays(count: int = 48, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    origins = torch.tensor([0.0, 0.0, 2.5]) + 0.3 * torch.randn(count, 3, generator=gen)
    directions = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, -1.0]) + 0.35 * torch.randn(count, 3,
                                                                                             generator=gen), dim=-1)
    directions[0] = torch.tensor([0.0, 1.0, 0.0])  # misses the box: background only
    return origins, directions


@pytest.mark.parametrize("channels", [5, 1])
def test_c_channel_rendering_and_its_gradients_match_nerfacc(channels):
    from compose3d.kernels.background import LearnedBackground

    field = SmoothFeatureField(channels)
    background = LearnedBackground(channels=channels)
    origins, directions = feature_rays()
    ours = render_rays(field, background, origins, directions, samples_per_ray=64)
    ours_loss = (ours["features"] * torch.arange(1.0, channels + 1)).sum() + ours["depth"].sum()
    ours_grads = torch.autograd.grad(ours_loss, [field.weight, field.bias, *background.parameters()])
    colors, opacities, depths = nerfacc_render(field, background, origins, directions, 64)
    ref_loss = (colors * torch.arange(1.0, channels + 1)).sum() + depths.sum()
    ref_grads = torch.autograd.grad(ref_loss, [field.weight, field.bias, *background.parameters()])
    assert ours["features"].shape == (48, channels)
    torch.testing.assert_close(ours["features"], colors, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["opacity"], opacities, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["depth"], depths, atol=1e-5, rtol=1e-5)
    assert float(ours["opacity"][0]) == 0.0 and float(ours["opacity"].max()) > 0.5  # a miss and dense hits
    for mine, ref in zip(ours_grads, ref_grads):
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_c_channel_views_render_the_same_in_any_chunking():
    field = SmoothFeatureField(5, seed=1)
    background = SolidBackground((0.1, 0.2, 0.3, 0.4, 0.5))
    cams = orbit_cameras(views=2, distance=2.5)
    small = render_views(field, background, cams, 9, 11, RenderSettings(samples_per_ray=32, chunk_rays=13),
                         with_normals=False)
    large = render_views(field, background, cams, 9, 11, RenderSettings(samples_per_ray=32, chunk_rays=10000),
                         with_normals=False)
    assert small["features"].shape == (2, 9, 11, 5) and small["opacity"].shape == (2, 9, 11)
    for key in ("features", "opacity", "depth"):
        torch.testing.assert_close(small[key], large[key], atol=1e-6, rtol=1e-6)
    corner = small["features"][0, 0, 0]  # the corner rays miss the bump: mostly background
    assert corner.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5], abs=0.05)


def test_a_background_or_field_output_with_other_channels_than_the_field_has_is_refused():
    origins, directions = feature_rays(4)
    with pytest.raises(ValueError, match=r"^background: expected shape \(R, 5\).*got \(4, 3\)"):
        render_rays(SmoothFeatureField(5), SolidBackground(), origins, directions, samples_per_ray=8)
    field = SmoothFeatureField(3)
    field.channels = 4  # claims one channel more than it computes
    with pytest.raises(ValueError, match=r"^field features: expected shape \(P, 4\) \(the field has 4 channels\)"):
        render_rays(field, SolidBackground((0.0,) * 4), origins, directions, samples_per_ray=8)


def test_ray_box_intersection_matches_hand_values():
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.5, 0.5, 0.0], [5.0, 0.0, 0.0]])
    dirs = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    assert hit.tolist() == [True, False, True, False]
    assert (t_near[0].item(), t_far[0].item()) == (2.0, 4.0)
    assert (t_near[2].item(), t_far[2].item()) == (0.0, 0.5)  # starts inside: entry clamped to near = 0


def test_pixel_rays_follow_the_pinhole_model():
    fov = 50.0
    cams = orbit_cameras(views=1, elevation=10.0, azimuth_start=30.0, distance=2.0, fov=fov)
    origins, dirs = camera_rays(cams, 3, 3)
    forward = -cams.c2w[0, :3, 2]
    up = cams.c2w[0, :3, 1]
    torch.testing.assert_close(dirs[0, 1, 1], forward, atol=1e-6, rtol=0)  # middle pixel looks straight ahead
    torch.testing.assert_close(origins[0, 0, 0], cams.positions[0])
    # The top-middle pixel centre is 1 pixel above the centre: angle atan(tan(fov/2) * 2/3), tilted up.
    top = dirs[0, 0, 1]
    assert math.degrees(math.acos(float(top @ forward))) == pytest.approx(
        math.degrees(math.atan(math.tan(math.radians(fov / 2)) * 2 / 3)), abs=1e-4)
    assert float(top @ up) > 0


def test_hashed_level_uses_the_spatial_hash_and_trilinear_weights():
    grid = HashGrid(levels=1, features=2, log2_table_size=10, base_resolution=64)  # 65^3 > 1024: hashed
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    x = torch.tensor([[0.3141, 0.2718, 0.7071]])
    pos = [v * 64 for v in x[0].tolist()]
    cell = [math.floor(p) for p in pos]
    frac = [p - c for p, c in zip(pos, cell)]
    expected = torch.zeros(2)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                i, j, k = cell[0] + dx, cell[1] + dy, cell[2] + dz
                index = (i * 1 ^ j * 2654435761 ^ k * 805459861) % 1024
                w = (frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1]) * (frac[2] if dz else 1 - frac[2])
                expected += w * grid.table[index].detach()
    torch.testing.assert_close(grid(x)[0].detach(), expected, atol=1e-5, rtol=1e-5)


def test_dense_level_indexes_grid_vertices_directly():
    grid = HashGrid(levels=1, features=2, log2_table_size=10, base_resolution=4)  # 5^3 = 125 <= 1024: dense
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    vertex = torch.tensor([[1 / 4, 2 / 4, 3 / 4]])  # grid vertex (1, 2, 3)
    torch.testing.assert_close(grid(vertex)[0].detach(), grid.table[1 + 2 * 5 + 3 * 25].detach())


def test_field_normals_match_finite_differences_of_its_density():
    torch.manual_seed(0)
    field = RadianceField(FieldConfig(levels=4, log2_table_size=12, blob_density=10.0))
    x = torch.tensor([[0.2, 0.1, -0.15], [-0.3, 0.2, 0.1]])
    eps = 1e-3
    grad = torch.stack([(field.density(x + eps * e) - field.density(x - eps * e)) / (2 * eps)
                        for e in torch.eye(3)], dim=-1).detach()
    torch.testing.assert_close(field.normals(x), torch.nn.functional.normalize(-grad, dim=-1), atol=2e-2, rtol=0)


def test_blob_initialisation_is_dense_at_the_centre_and_empty_outside():
    field = RadianceField(FieldConfig(levels=4, log2_table_size=12))
    d = field.density(torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0]])).detach()
    assert d[0] == pytest.approx(10.0, abs=0.5)  # softplus(10 + ~0)
    assert d[1] < 0.01  # softplus(10 * (1 - 0.9 / 0.5))


def test_chunked_rendering_equals_unchunked():
    torch.manual_seed(1)
    field = RadianceField(FieldConfig(levels=4, log2_table_size=12))
    cams = orbit_cameras(views=2, distance=2.5)
    bg = SolidBackground((0.0, 0.0, 0.0))
    small = render_views(field, bg, cams, 16, 20, RenderSettings(samples_per_ray=32, chunk_rays=97))
    large = render_views(field, bg, cams, 16, 20, RenderSettings(samples_per_ray=32, chunk_rays=100000))
    for key in ("features", "opacity", "depth", "normal"):
        torch.testing.assert_close(small[key], large[key], atol=1e-5, rtol=1e-5)
    assert small["features"].shape == (2, 16, 20, 3) and small["opacity"].shape == (2, 16, 20)


def test_carving_keeps_the_inside_of_a_sphere_and_removes_far_space():
    radius = 0.5
    cams = concat_cameras(orbit_cameras(8, 30.0, 0, 360, 2.5, 40), orbit_cameras(8, -30.0, 22.5, 360, 2.5, 40))
    origins, dirs = camera_rays(cams, 48, 48)
    b = (origins * dirs).sum(-1)
    masks = ((b * b - (origins * origins).sum(-1) + radius ** 2) > 0).float()  # ray meets the sphere
    grid = OccupancyGrid(torch.tensor([[-1.0] * 3, [1.0] * 3]), resolution=32)
    grid.carve(cams.c2w, cams.pixel_intrinsics(48, 48), masks)
    centres = grid.cell_centers(torch.arange(32 ** 3))
    r = centres.norm(dim=-1)
    assert grid.allowed[r < radius - 0.05].all()
    assert grid.allowed[r > 0.9].float().mean() < 0.05
    assert grid.occupied.equal(grid.allowed)


def test_occupancy_update_marks_only_dense_allowed_cells():
    grid = OccupancyGrid(torch.tensor([[-1.0] * 3, [1.0] * 3]), resolution=16)
    grid.allowed[: 16 ** 3 // 2] = False  # x < 0 half is outside the hull
    grid.update(lambda p: 100.0 * (p.norm(dim=-1) < 0.5).float(), threshold=1.0)
    centres = grid.cell_centers(torch.arange(16 ** 3))
    inside = (centres.norm(dim=-1) < 0.4) & (centres[:, 0] > 0)
    assert grid.occupied[inside].all()
    assert not grid.occupied[centres.norm(dim=-1) > 0.6].any()
    assert not grid.occupied[centres[:, 0] < 0].any()


def test_learned_background_depends_on_direction_trains_and_is_refused_by_fitting():
    from compose3d.kernels.background import LearnedBackground
    from compose3d.kernels.nerf import NeRF
    from compose3d.kernels.reconstruct import FitSettings, fit_views

    torch.manual_seed(0)
    bg = LearnedBackground()
    dirs = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    rgb = bg(dirs).detach()
    assert rgb.shape == (64, 3) and 0 < float(rgb.min()) and float(rgb.max()) < 1
    assert float(rgb.std(dim=0).min()) > 0  # not a constant colour
    target = torch.full((64, 3), 0.8)
    opt = torch.optim.Adam(bg.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        ((bg(dirs) - target) ** 2).mean().backward()
        opt.step()
    assert float((bg(dirs).detach() - target).abs().max()) < 0.02
    nerf = NeRF.create(FieldConfig(levels=2, log2_table_size=10), background=LearnedBackground())
    cams = orbit_cameras(views=1)
    with pytest.raises(ValueError, match="^background: "):
        fit_views(nerf, torch.ones(1, 4, 4, 3), cams, settings=FitSettings(steps=1))
