"""kernels.mesh_extract, mesh_texture and mesh_files against analytic shapes: spheres with known radius and volume,
colour fields known in closed form, textures sampled back by hand with the glTF texel convention, and files reloaded
through trimesh's readers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from compose3d.kernels.mesh_extract import (NoSurfaceError, clean_mesh, extract_mesh, sample_density_grid,
                                            simplify_mesh)
from compose3d.kernels.mesh_files import write_mesh
from compose3d.kernels.mesh_texture import bake_uv_texture, bake_vertex_colors

CUBE = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def sphere_density(centre=(0.0, 0.0, 0.0), radius=0.5, inverted=False):
    """Density linear in the distance r from ``centre``: exactly 10 at r = radius, larger inside (or outside)."""
    c = torch.tensor(centre, dtype=torch.float32)

    def fn(points: torch.Tensor) -> torch.Tensor:
        r = (points - c).norm(dim=-1)
        inside = radius - r if not inverted else r - radius
        return torch.clamp(10.0 + 100.0 * inside, min=0.0)

    return fn


def smooth_color(points: torch.Tensor) -> torch.Tensor:
    """A slowly varying colour field with a different pattern per channel."""
    x, y, z = points.unbind(-1)
    return torch.stack([0.5 + 0.4 * torch.sin(2.0 * x + 0.3),
                        0.5 + 0.4 * torch.cos(1.5 * y - 0.2 * z),
                        0.5 + 0.4 * torch.sin(1.7 * z + x)], dim=-1)


def other_color(points: torch.Tensor) -> torch.Tensor:
    return 1.0 - smooth_color(points)


def color_np(fn, points: np.ndarray) -> np.ndarray:
    return fn(torch.as_tensor(points, dtype=torch.float32)).double().numpy()


def sample_texture_gltf(image: Image.Image, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup (clamp to edge) the way a glTF viewer does it, written from the spec.

    ``uv`` is in trimesh's convention (v up); glTF's t = 1 - v runs down the image; texel i has its centre at
    (i + 0.5) / size. Returns (N, 3) float64 in [0, 1].
    """
    img = np.asarray(image.convert("RGB"), np.float64) / 255.0
    height, width = img.shape[:2]
    x = uv[:, 0] * width - 0.5
    y = (1.0 - uv[:, 1]) * height - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    xi0, xi1 = np.clip(x0, 0, width - 1).astype(int), np.clip(x0 + 1, 0, width - 1).astype(int)
    yi0, yi1 = np.clip(y0, 0, height - 1).astype(int), np.clip(y0 + 1, 0, height - 1).astype(int)
    return ((1 - fx) * (1 - fy) * img[yi0, xi0] + fx * (1 - fy) * img[yi0, xi1]
            + (1 - fx) * fy * img[yi1, xi0] + fx * fy * img[yi1, xi1])


def outward_fraction(mesh: trimesh.Trimesh, centre) -> float:
    """Fraction of faces whose normal points away from ``centre`` (near-zero-area slivers have no normal)."""
    real = mesh.area_faces > 1e-12
    radial = mesh.triangles_center[real] - np.asarray(centre)
    return float((np.einsum("ij,ij->i", mesh.face_normals[real], radial) > 0).mean())


def sphere_volume(radius: float) -> float:
    return 4.0 / 3.0 * math.pi * radius ** 3


@pytest.fixture(scope="module")
def sphere64() -> trimesh.Trimesh:
    return extract_mesh(sphere_density(), CUBE, resolution=64, threshold=10.0)


@pytest.fixture(scope="module")
def textured_sphere() -> trimesh.Trimesh:
    base = simplify_mesh(extract_mesh(sphere_density(), CUBE, resolution=48, threshold=10.0), 3000)
    return bake_uv_texture(base, smooth_color, texture_size=256, padding=2)


# -------------------------------------------------------------------------------------------- density grid


def test_density_grid_matches_pointwise_numpy_evaluation_with_uneven_chunks():
    aabb = torch.tensor([[-0.5, 0.0, 1.0], [1.5, 0.5, 4.0]])
    res = 17

    def fn(p):
        return p[:, 0] + 10.0 * p[:, 1] + 100.0 * p[:, 2]

    grid = sample_density_grid(fn, aabb, res, chunk=1000)  # 4913 points: the last chunk is partial
    x, y, z = (np.linspace(aabb[0, d].item(), aabb[1, d].item(), res) for d in range(3))
    expected = x[:, None, None] + 10.0 * y[None, :, None] + 100.0 * z[None, None, :]
    assert grid.shape == (res, res, res) and grid.dtype == np.float32
    np.testing.assert_allclose(grid, expected, rtol=1e-6, atol=1e-4)


def test_density_grid_rejects_nan_naming_density_fn():
    with pytest.raises(ValueError, match=r"^density_fn: returned NaN"):
        sample_density_grid(lambda p: torch.full((len(p),), float("nan")), CUBE, 16)


def test_density_grid_rejects_wrong_output_shape_naming_density_fn():
    with pytest.raises(ValueError, match=r"^density_fn: expected shape"):
        sample_density_grid(lambda p: p, CUBE, 16)


@pytest.mark.parametrize("aabb", [torch.zeros(3), torch.tensor([[1.0, 0, 0], [0, 1, 1]])])
def test_bad_aabb_is_rejected_naming_aabb(aabb):
    with pytest.raises(ValueError, match=r"^aabb: "):
        sample_density_grid(sphere_density(), aabb, 16)


# ------------------------------------------------------------------------------------------ marching cubes


def test_sphere_vertices_lie_on_the_radius_within_a_voxel(sphere64):
    voxel = 2.0 / 63
    r = np.linalg.norm(sphere64.vertices, axis=1)
    assert np.abs(r - 0.5).max() < 0.1 * voxel  # density is linear in r, so interpolation is nearly exact
    assert len(sphere64.faces) > 1000


def test_sphere_is_watertight_with_the_analytic_volume(sphere64):
    assert sphere64.is_watertight
    assert sphere64.volume == pytest.approx(sphere_volume(0.5), rel=0.02)


def test_sphere_face_normals_point_out_of_the_dense_region(sphere64):
    assert outward_fraction(sphere64, (0, 0, 0)) == 1.0


def test_hollow_shell_normals_point_towards_the_empty_centre():
    # Dense outside r = 0.4 and empty inside: "outward" (towards lower density) is towards the centre.
    mesh = extract_mesh(sphere_density(radius=0.4, inverted=True), CUBE, resolution=48, threshold=10.0,
                        fill_interior=False)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - 0.4).max() < 0.01
    assert outward_fraction(mesh, (0, 0, 0)) == 0.0


def shell_density(inner: float, outer: float, pore_radius: float = 0.0):
    """Density exactly 10 at r = inner and r = outer, above it between (linear ramps), below it elsewhere;
    optionally 0 in a straight pore of ``pore_radius`` drilled along +x from the cavity to the outside."""

    def fn(points: torch.Tensor) -> torch.Tensor:
        r = points.norm(dim=-1)
        density = torch.clamp(10.0 + 100.0 * torch.minimum(r - inner, outer - r), min=0.0)
        if pore_radius > 0:
            pore = (points[:, 0] > 0) & (points[:, 1:].norm(dim=-1) < pore_radius)
            density = torch.where(pore, torch.zeros_like(density), density)
        return density

    return fn


def test_enclosed_cavity_is_filled_so_only_the_outer_surface_remains():
    outer, inner = 0.5, 0.25
    hollow = extract_mesh(shell_density(inner, outer), CUBE, resolution=64, threshold=10.0, fill_interior=False)
    filled = extract_mesh(shell_density(inner, outer), CUBE, resolution=64, threshold=10.0)
    assert len(hollow.split(only_watertight=False)) == 2  # outer and inner surfaces
    assert len(filled.split(only_watertight=False)) == 1
    assert np.linalg.norm(filled.vertices, axis=1).min() > outer - 0.05
    assert filled.volume == pytest.approx(sphere_volume(outer), rel=0.05)


def test_sealing_closes_a_narrow_pore_so_the_cavity_is_filled_too():
    outer, inner, pore = 0.5, 0.25, 0.04  # pore 0.08 wide: under three cells of 2/63
    porous = extract_mesh(shell_density(inner, outer, pore), CUBE, resolution=64, threshold=10.0)
    sealed = extract_mesh(shell_density(inner, outer, pore), CUBE, resolution=64, threshold=10.0, seal_radius=3)
    # Without sealing the cavity is reached through the pore, so its surface stays part of the mesh.
    assert np.linalg.norm(porous.vertices, axis=1).min() < inner + 0.05
    assert np.linalg.norm(sealed.vertices, axis=1).min() > outer - 0.1
    assert sealed.volume == pytest.approx(sphere_volume(outer), rel=0.06)


def test_off_centre_sphere_in_a_non_cubic_box_maps_back_to_world_coordinates():
    centre, radius = (0.6, -0.2, 0.7), 0.35
    aabb = torch.tensor([[0.6 - 0.5, -0.2 - 0.9, 0.7 - 0.4], [0.6 + 0.8, -0.2 + 0.6, 0.7 + 0.45]])
    mesh = extract_mesh(sphere_density(centre, radius), aabb, resolution=72, threshold=10.0)
    voxel = ((aabb[1] - aabb[0]) / 71).max().item()
    r = np.linalg.norm(mesh.vertices - np.array(centre), axis=1)
    assert np.abs(r - radius).max() < 0.2 * voxel
    np.testing.assert_allclose(mesh.bounds, [np.subtract(centre, radius), np.add(centre, radius)], atol=voxel)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(sphere_volume(radius), rel=0.03)
    assert outward_fraction(mesh, centre) == 1.0


def test_threshold_above_the_maximum_density_raises_no_surface_error_naming_threshold():
    with pytest.raises(NoSurfaceError, match=r"^threshold: 1000 .*ranges from 0 to 60\b.*lower threshold") as info:
        extract_mesh(sphere_density(), CUBE, resolution=17, threshold=1000.0)  # the centre is a grid point
    assert isinstance(info.value, ValueError)


def test_constant_density_raises_no_surface_error_suggesting_to_check_the_box():
    with pytest.raises(NoSurfaceError, match=r"^threshold: .*everywhere.*aabb"):
        extract_mesh(lambda p: torch.zeros(len(p)), CUBE, resolution=16, threshold=10.0)


@pytest.mark.parametrize("resolution", [8, 1025, 64.5, "64"])
def test_bad_resolution_raises_naming_resolution(resolution):
    with pytest.raises(ValueError, match=r"^resolution: "):
        extract_mesh(sphere_density(), CUBE, resolution=resolution)


# ------------------------------------------------------------------------------------------------ clean-up


def _spheres(*specs) -> tuple[trimesh.Trimesh, list[trimesh.Trimesh]]:
    parts = [trimesh.creation.icosphere(subdivisions=s, radius=r).apply_translation(t) for s, r, t in specs]
    return trimesh.util.concatenate(parts), parts


def test_clean_keeps_only_the_largest_component():
    mesh, (big, tiny) = _spheres((3, 1.0, (0, 0, 0)), (1, 0.1, (3, 0, 0)))
    before = mesh.vertices.copy(), mesh.faces.copy()
    cleaned = clean_mesh(mesh, keep_components=1)
    assert len(cleaned.faces) == len(big.faces) and len(cleaned.vertices) == len(big.vertices)
    np.testing.assert_allclose(cleaned.bounds, big.bounds)
    assert cleaned.is_watertight
    np.testing.assert_array_equal(mesh.vertices, before[0])  # input untouched
    np.testing.assert_array_equal(mesh.faces, before[1])


def test_clean_with_keep_zero_keeps_every_component():
    mesh, parts = _spheres((3, 1.0, (0, 0, 0)), (1, 0.1, (3, 0, 0)))
    assert len(clean_mesh(mesh, keep_components=0).faces) == sum(len(p.faces) for p in parts)


def test_min_component_fraction_drops_components_smaller_than_a_fraction_of_the_largest():
    # faces: 1280, 320 (25 % of the largest), 80 (6.25 %)
    mesh, (big, medium, tiny) = _spheres((3, 1.0, (0, 0, 0)), (2, 0.3, (3, 0, 0)), (1, 0.1, (-3, 0, 0)))
    cleaned = clean_mesh(mesh, keep_components=0, min_component_fraction=0.2)
    assert len(cleaned.faces) == len(big.faces) + len(medium.faces)
    assert cleaned.bounds[0, 0] == pytest.approx(-1.0)  # the tiny sphere at x = -3 is gone
    assert len(clean_mesh(mesh, keep_components=0, min_component_fraction=0.05).faces) == len(mesh.faces)


def test_clean_merges_duplicate_vertices_and_drops_degenerate_faces():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    n = len(sphere.vertices)
    a, b, _ = sphere.faces[0]
    # vertex n duplicates vertex 0; vertex n + 1 is the midpoint of edge a-b
    vertices = np.vstack([sphere.vertices, sphere.vertices[:1], 0.5 * (sphere.vertices[a] + sphere.vertices[b])])
    faces = sphere.faces.copy()
    users = np.nonzero((faces == 0).any(axis=1))[0][:2]
    faces[users] = np.where(faces[users] == 0, n, faces[users])  # two faces use the duplicate
    degenerate = [[a, a, b], [a, b, a], [a, n + 1, b]]  # repeated indices; zero-area sliver on a line
    broken = trimesh.Trimesh(vertices=vertices, faces=np.vstack([faces, degenerate]), process=False)
    assert not broken.is_watertight
    cleaned = clean_mesh(broken)
    assert len(cleaned.faces) == len(sphere.faces) and len(cleaned.vertices) == n
    assert cleaned.is_watertight
    assert cleaned.volume == pytest.approx(sphere.volume)


def test_min_face_area_removes_small_faces_only():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    sliver = trimesh.Trimesh(vertices=[[5, 0, 0], [5.001, 0, 0], [5, 0.001, 0]], faces=[[0, 1, 2]])
    mesh = trimesh.util.concatenate([sphere, sliver])
    smallest_sphere_face = sphere.area_faces.min()
    cleaned = clean_mesh(mesh, keep_components=0, min_face_area=0.5 * smallest_sphere_face)
    assert len(cleaned.faces) == len(sphere.faces)
    assert cleaned.bounds[1, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"^min_face_area: "):
        clean_mesh(mesh, min_face_area=1e3)


@pytest.mark.parametrize("kwargs,name", [({"keep_components": -1}, "keep_components"),
                                         ({"min_component_fraction": 1.5}, "min_component_fraction"),
                                         ({"min_face_area": -1.0}, "min_face_area")])
def test_clean_rejects_bad_arguments_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        clean_mesh(trimesh.creation.icosphere(subdivisions=1), **kwargs)


# ---------------------------------------------------------------------------------------------- simplify


def test_simplify_reaches_the_target_face_count_and_stays_on_the_sphere():
    dense = trimesh.creation.icosphere(subdivisions=5)  # 20480 faces, radius 1
    simple = simplify_mesh(dense, 2000)
    assert 1800 <= len(simple.faces) <= 2200
    r = np.linalg.norm(simple.vertices, axis=1)
    assert np.abs(r - 1.0).max() < 0.01
    assert simple.volume == pytest.approx(dense.volume, rel=0.02)


def test_simplify_is_a_copy_when_already_below_target():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    same = simplify_mesh(sphere, 10_000)
    assert same is not sphere
    np.testing.assert_array_equal(same.faces, sphere.faces)
    np.testing.assert_array_equal(same.vertices, sphere.vertices)


def test_simplify_rejects_a_target_below_four_naming_target_faces():
    with pytest.raises(ValueError, match=r"^target_faces: "):
        simplify_mesh(trimesh.creation.icosphere(subdivisions=2), 2)


# ------------------------------------------------------------------------------------------------ colours


def test_vertex_colors_equal_color_fn_at_vertices_to_uint8_rounding(sphere64):
    baked = bake_vertex_colors(sphere64, smooth_color, chunk=1000)
    expected = np.round(color_np(smooth_color, sphere64.vertices) * 255)
    colors = baked.visual.vertex_colors
    assert colors.dtype == np.uint8 and colors.shape == (len(sphere64.vertices), 4)
    assert np.abs(colors[:, :3].astype(float) - expected).max() <= 1
    assert (colors[:, 3] == 255).all()
    np.testing.assert_array_equal(baked.faces, sphere64.faces)


def test_vertex_colors_are_clipped_to_the_unit_range(sphere64):
    baked = bake_vertex_colors(sphere64, lambda p: torch.stack([p[:, 0] * 100, -p[:, 0] ** 2 - 1, p[:, 1]], -1))
    colors = baked.visual.vertex_colors
    assert set(np.unique(colors[:, 0])) <= {0, 255} and (colors[:, 1] == 0).all()


def test_uv_texture_reproduces_color_fn_inside_triangles(textured_sphere):
    # Sample at points strictly inside faces: the texel neighbourhood is then (almost) all covered texels.
    mesh = textured_sphere
    bary = np.array([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.2, 0.2]])
    uv = np.einsum("bk,fkd->fbd", bary, mesh.visual.uv[mesh.faces]).reshape(-1, 2)
    xyz = np.einsum("bk,fkd->fbd", bary, mesh.vertices[mesh.faces]).reshape(-1, 3)
    error = np.abs(sample_texture_gltf(mesh.visual.material.baseColorTexture, uv) - color_np(smooth_color, xyz))
    assert error.mean() < 0.01
    assert np.quantile(error, 0.99) < 0.05


def stripes(points: torch.Tensor) -> torch.Tensor:
    """A fast-varying colour field (period ~0.2, about 25 texels of a 256 texture on the r = 0.5 sphere)."""
    return 0.5 + 0.5 * torch.sin(30.0 * points)


def test_uv_texture_is_texel_accurate_for_a_fast_varying_field(textured_sphere):
    # Texel centres at (i + 0.5) / size: a half-texel misregistration alone would give a mean error of ~0.03.
    mesh = bake_uv_texture(textured_sphere, stripes, texture_size=256)
    bary = np.array([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.2, 0.2]])
    uv = np.einsum("bk,fkd->fbd", bary, mesh.visual.uv[mesh.faces]).reshape(-1, 2)
    xyz = np.einsum("bk,fkd->fbd", bary, mesh.vertices[mesh.faces]).reshape(-1, 3)
    error = np.abs(sample_texture_gltf(mesh.visual.material.baseColorTexture, uv) - color_np(stripes, xyz))
    assert error.mean() < 0.006


def test_uv_texture_has_no_background_at_chart_borders(textured_sphere):
    # At vertices (chart corners) bilinear filtering reaches outside the chart: dilation must have filled it.
    mesh = textured_sphere
    error = np.abs(sample_texture_gltf(mesh.visual.material.baseColorTexture, mesh.visual.uv)
                   - color_np(smooth_color, mesh.vertices))
    assert error.mean() < 0.03
    assert error.max() < 0.25


def test_uv_texture_keeps_the_surface_and_only_splits_vertices_at_seams(textured_sphere):
    merged = trimesh.Trimesh(vertices=textured_sphere.vertices, faces=textured_sphere.faces, process=True)
    assert merged.is_watertight
    assert merged.volume == pytest.approx(sphere_volume(0.5), rel=0.03)
    uv = textured_sphere.visual.uv
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    assert textured_sphere.visual.material.baseColorTexture.size == (256, 256)


def test_uv_texture_does_not_depend_on_the_chunk_size(sphere64):
    small = simplify_mesh(sphere64, 800)
    whole = bake_uv_texture(small, smooth_color, texture_size=64)
    chunked = bake_uv_texture(small, smooth_color, texture_size=64, chunk=997)  # many partial chunks
    np.testing.assert_array_equal(np.asarray(chunked.visual.material.baseColorTexture),
                                  np.asarray(whole.visual.material.baseColorTexture))
    np.testing.assert_array_equal(chunked.visual.uv, whole.visual.uv)


def test_uv_texture_rejects_bad_sizes_by_name(sphere64):
    with pytest.raises(ValueError, match=r"^texture_size: "):
        bake_uv_texture(sphere64, smooth_color, texture_size=8)
    with pytest.raises(ValueError, match=r"^padding: "):
        bake_uv_texture(sphere64, smooth_color, texture_size=64, padding=-1)


# -------------------------------------------------------------------------------------------------- files


def test_glb_round_trip_keeps_geometry_uv_and_texture(textured_sphere, tmp_path):
    path = tmp_path / "model.glb"
    assert write_mesh(textured_sphere, path, "glb") == [path]
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.vertices) == len(textured_sphere.vertices)
    assert len(loaded.faces) == len(textured_sphere.faces)
    np.testing.assert_allclose(loaded.vertices, textured_sphere.vertices, atol=1e-6)
    np.testing.assert_allclose(loaded.visual.uv, textured_sphere.visual.uv, atol=1e-6)
    # The reloaded texture, sampled at the reloaded uv, gives color_fn at the vertices.
    sampled = sample_texture_gltf(loaded.visual.material.baseColorTexture, loaded.visual.uv)
    assert np.abs(sampled - color_np(smooth_color, loaded.vertices)).mean() < 0.03


def test_watertight_sphere_stays_watertight_after_glb_round_trip(tmp_path):
    mesh = extract_mesh(sphere_density(), CUBE, resolution=48, threshold=10.0)
    assert mesh.is_watertight
    path = tmp_path / "sphere.glb"
    write_mesh(bake_uv_texture(mesh, smooth_color, texture_size=128), path, "glb")
    loaded = trimesh.load(path, force="mesh")
    # UV seams split vertices (process=True only merges equal position AND uv); merge by position alone.
    by_position = trimesh.Trimesh(vertices=loaded.vertices, faces=loaded.faces, process=True)
    assert by_position.is_watertight
    assert len(by_position.vertices) == len(mesh.vertices)
    assert by_position.volume == pytest.approx(mesh.volume, rel=1e-5)


def test_glb_keeps_vertex_colors(sphere64, tmp_path):
    baked = bake_vertex_colors(sphere64, smooth_color)
    write_mesh(baked, tmp_path / "v.glb", "glb")
    loaded = trimesh.load(tmp_path / "v.glb", force="mesh", process=False)
    np.testing.assert_array_equal(loaded.visual.vertex_colors, baked.visual.vertex_colors)


def test_obj_writes_obj_mtl_png_named_after_the_stem_and_reloads_with_colours(textured_sphere, tmp_path):
    second = bake_uv_texture(textured_sphere, other_color, texture_size=128)
    files_a = write_mesh(textured_sphere, tmp_path / "a.obj", "obj")
    files_b = write_mesh(second, tmp_path / "b.obj", "obj")
    assert [f.name for f in files_a] == ["a.obj", "a.mtl", "a.png"]
    assert [f.name for f in files_b] == ["b.obj", "b.mtl", "b.png"]
    assert all(f.is_file() for f in files_a + files_b)
    for path, fn, size in ((files_a[0], smooth_color, 256), (files_b[0], other_color, 128)):
        loaded = trimesh.load(path, force="mesh")
        assert loaded.visual.kind == "texture"
        assert loaded.visual.material.image.size == (size, size)
        sampled = sample_texture_gltf(loaded.visual.material.image, loaded.visual.uv)
        assert np.abs(sampled - color_np(fn, loaded.vertices)).mean() < 0.03


def test_ply_of_a_textured_mesh_holds_vertex_colours(textured_sphere, tmp_path):
    path = tmp_path / "c.ply"
    assert write_mesh(textured_sphere, path, "ply") == [path]
    loaded = trimesh.load(path, force="mesh")
    assert loaded.visual.kind == "vertex"
    colors = loaded.visual.vertex_colors[:, :3] / 255.0
    assert np.abs(colors - color_np(smooth_color, loaded.vertices)).mean() < 0.03
    assert loaded.is_watertight  # PLY has no uv, so the seam vertices merge back by position


def test_unknown_format_raises_naming_file_format(sphere64, tmp_path):
    with pytest.raises(ValueError, match=r"^file_format: "):
        write_mesh(sphere64, tmp_path / "x.stl", "stl")


def test_suffix_that_disagrees_with_the_format_raises_naming_path(sphere64, tmp_path):
    with pytest.raises(ValueError, match=r"^path: "):
        write_mesh(sphere64, tmp_path / "x.obj", "glb")
