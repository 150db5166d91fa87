"""The NeRF and mesh-export nodes called in-process the way ComfyUI's executor calls them.

One NeRF is trained per module on the built-in test object (whose exact renders and masks are the oracle);
the export tests read the written files back with trimesh.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from compose3d.kernels.mesh_extract import NoSurfaceError
from compose3d.kernels.nerf import NeRF
from compose3d.kernels.toy_object import BOXES, SPHERES, render_toy_object
from compose3d.nodes.cameras import CombineCameras, OrbitCameras
from compose3d.nodes.mesh import ExportMesh
from compose3d.nodes.nerf import NeRFFromViews, RenderNeRF
from compose3d.nodes.toy_object import ToyObjectViews
from harness.inprocess import run_node

TRAIN_SIZE = 32
TRAIN_STEPS = 150
#: Surface density for the exports: low, so that a NeRF trained for only 150 steps has a clear surface.
EXPORT_THRESHOLD = 2.0
EXPORT = dict(resolution=48, threshold=EXPORT_THRESHOLD, keep_components=1, max_faces=3000, colors="texture",
              texture_size=128)


def orbit(views: int, elevation: float, azimuth_start: float = 0.0, distance: float = 2.5):
    (cameras,) = run_node(OrbitCameras, views=views, elevation=elevation, azimuth_start=azimuth_start,
                          azimuth_span=360.0, distance=distance, fov=40.0).result
    return cameras


def views_of(cameras, size: int = TRAIN_SIZE):
    images, masks = run_node(ToyObjectViews, cameras=cameras, width=size, height=size,
                             background="white").result
    return images, masks


def fit(images, cameras, masks=None, nerf=None, steps: int = TRAIN_STEPS, **overrides):
    inputs = dict(images=images, cameras=cameras, masks=masks, nerf=nerf, steps=steps, rays_per_step=1024,
                  samples_per_ray=64, learning_rate=0.01, background="white", seed=0)
    inputs.update(overrides)
    (nerf,) = run_node(NeRFFromViews, **inputs).result
    return nerf


def render(nerf, cameras, width: int, height: int):
    return run_node(RenderNeRF, nerf=nerf, cameras=cameras, width=width, height=height, samples_per_ray=0).result


def export(nerf, filename_prefix: str, format: str = "glb", **overrides):
    return run_node(ExportMesh, nerf=nerf, filename_prefix=filename_prefix, format=format,
                    **{**EXPORT, **overrides})


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def rig(comfy_inprocess):
    """Twelve cameras in two rings (elevations 15 and 45 degrees), combined into one rig."""
    (cameras,) = run_node(CombineCameras, first=orbit(6, 15.0), second=orbit(6, 45.0, azimuth_start=30.0)).result
    return cameras


@pytest.fixture(scope="module")
def trained(rig):
    """A NeRF fitted to the test object's exact 32 px views and masks from ``rig``."""
    images, masks = views_of(rig)
    return fit(images, rig, masks)


@pytest.fixture(scope="module")
def small_views(comfy_inprocess):
    """Four cameras with the test object's 16 px images and masks (for the input checks)."""
    cameras = orbit(4, 20.0)
    images, masks = views_of(cameras, 16)
    return cameras, images, masks


# ------------------------------------------------------------------------------------ NeRFFromViews inputs


def test_nerf_from_views_rejects_a_camera_count_that_differs_from_the_image_count(small_views):
    _, images, masks = small_views
    three = orbit(3, 20.0)
    with pytest.raises(ValueError, match=r"^cameras: 3 cameras for 4 images"):
        fit(images, three, masks, steps=1)


def test_nerf_from_views_rejects_a_mask_count_that_differs_from_the_image_count(small_views):
    cameras, images, masks = small_views
    with pytest.raises(ValueError, match=r"^masks: 3 masks for 4 images"):
        fit(images, cameras, masks[:3], steps=1)


def test_nerf_from_views_rejects_masks_of_another_size_than_the_images(small_views):
    cameras, images, _ = small_views
    _, bigger = views_of(cameras, 24)
    with pytest.raises(ValueError, match=r"^masks: mask size 24x24 differs from the image size 16x16"):
        fit(images, cameras, bigger, steps=1)


def test_nerf_from_views_rejects_an_empty_mask_naming_its_view(small_views):
    cameras, images, masks = small_views
    assert bool((masks > 0.5).flatten(1).any(dim=1).all()), "every view of the test object shows it"
    holed = masks.clone()
    holed[2] = 0.0
    with pytest.raises(ValueError, match=r"^masks: view\(s\) \[2\] have an empty mask"):
        fit(images, cameras, holed, steps=1)


# ----------------------------------------------------------------------------------- training and render


def test_render_nerf_outputs_have_the_asked_size_and_unit_range(trained):
    cameras = orbit(3, 30.0, azimuth_start=15.0)  # views the NeRF was not trained on
    rgb, normal, opacity, depth = render(trained, cameras, width=40, height=24)
    assert tuple(rgb.shape) == (3, 24, 40, 3)
    assert tuple(normal.shape) == (3, 24, 40, 3)
    assert tuple(opacity.shape) == (3, 24, 40)
    assert tuple(depth.shape) == (3, 24, 40, 3)
    for name, image in (("rgb", rgb), ("normal", normal), ("opacity", opacity), ("depth", depth)):
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0, name


def test_trained_nerf_opacity_matches_the_test_objects_exact_silhouette(trained):
    cameras = orbit(3, 30.0, azimuth_start=15.0)
    _, _, opacity, _ = render(trained, cameras, width=40, height=24)
    _, exact_mask, _ = render_toy_object(cameras, 24, 40)
    inside, outside = exact_mask > 0.5, exact_mask < 0.5
    assert int(inside.sum()) > 100 and int(outside.sum()) > 100
    assert float(opacity[inside].mean()) > 0.8
    assert float(opacity[outside].mean()) < 0.2


def test_trained_nerf_colours_match_the_test_objects_exact_render(trained, rig):
    rgb, _, _, _ = render(trained, rig, width=TRAIN_SIZE, height=TRAIN_SIZE)
    exact_rgb, _, _ = render_toy_object(rig, TRAIN_SIZE, TRAIN_SIZE)
    mse = float(((rgb - exact_rgb) ** 2).mean())
    psnr = -10.0 * np.log10(mse)
    assert psnr > 20.0, f"PSNR {psnr:.1f} dB on the training views"


def test_continuing_training_leaves_the_input_nerf_untouched(trained, rig):
    images, masks = views_of(rig)
    probe = orbit(2, 25.0, azimuth_start=40.0)
    before = render(trained, probe, width=24, height=16)
    state_before = {k: v.clone() for k, v in trained.field.state_dict().items()}
    occupancy_before = trained.occupancy.occupied.clone()
    steps_before = trained.steps_trained

    continued = fit(images, rig, masks, nerf=trained, steps=8, seed=3)

    after = render(trained, probe, width=24, height=16)
    for name, a, b in zip(("rgb", "normal", "opacity", "depth"), before, after):
        assert torch.equal(a, b), f"the input NeRF's {name} render changed"
    for key, value in trained.field.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert torch.equal(trained.occupancy.occupied, occupancy_before)
    assert trained.steps_trained == steps_before == TRAIN_STEPS
    assert isinstance(continued, NeRF) and continued is not trained
    assert continued.steps_trained == steps_before + 8
    # the output really was trained further: its render differs from the input's
    changed = render(continued, probe, width=24, height=16)[0]
    assert not torch.equal(changed, before[0])


# ------------------------------------------------------------------------------------ ExportMesh outputs


def exact_sdf(points: np.ndarray) -> np.ndarray:
    """Signed distance to the test object (union of its spheres and boxes; exact outside)."""
    dists = [np.linalg.norm(points - np.array(c), axis=1) - r for c, r in SPHERES]
    for lo, hi in BOXES:
        centre, half = (np.array(lo) + np.array(hi)) / 2, (np.array(hi) - np.array(lo)) / 2
        q = np.abs(points - centre) - half
        dists.append(np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0))
    return np.min(dists, axis=0)


def test_export_mesh_writes_a_glb_under_the_prefix_with_comfy_counter_naming(trained, comfy_inprocess):
    output = comfy_inprocess / "output"
    out = export(trained, "c3d_glb/toy", "glb")
    path, mesh = out.result
    assert path == "c3d_glb/toy_00001_.glb"
    written = output / path
    assert written.is_file()
    assert out.ui == {"3d": [{"filename": "toy_00001_.glb", "subfolder": "c3d_glb", "type": "output"}]}
    loaded = trimesh.load(written, force="mesh", process=False)
    assert tuple(mesh.faces.shape) == (1, len(loaded.faces), 3)
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.int64
    # The glb's vertices are split at UV seams; the returned MESH is the same surface without the splits:
    # merging the file's vertices by position gives exactly the MESH's vertices.
    merged = np.unique(np.round(loaded.vertices, 5), axis=0)
    assert len(merged) == mesh.vertices.shape[1] < len(loaded.vertices)
    np.testing.assert_allclose(merged, np.unique(np.round(mesh.vertices[0].double().numpy(), 5), axis=0),
                               atol=1e-5)
    assert 2000 <= len(loaded.faces) <= 3000  # simplified to about max_faces
    assert loaded.visual.kind == "texture"
    assert loaded.visual.material.baseColorTexture.size == (128, 128)

    second_path, _ = export(trained, "c3d_glb/toy", "glb").result
    assert second_path == "c3d_glb/toy_00002_.glb"
    assert (output / second_path).is_file()
    assert written.is_file()  # the first file is kept


def test_export_mesh_ply_counts_match_the_file_and_the_surface_fits_the_object(trained, comfy_inprocess):
    path, mesh = export(trained, "c3d_ply/toy", "ply").result
    assert path == "c3d_ply/toy_00001_.ply"
    loaded = trimesh.load(comfy_inprocess / "output" / path, force="mesh", process=False)
    assert tuple(mesh.vertices.shape) == (1, len(loaded.vertices), 3)
    assert tuple(mesh.faces.shape) == (1, len(loaded.faces), 3)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces[0].numpy())
    # ply cannot hold a texture: the texture becomes vertex colours
    assert loaded.visual.kind == "vertex"
    assert loaded.visual.vertex_colors.shape == (len(loaded.vertices), 4)
    # geometry: most vertices lie within a couple of grid cells (2/47 wide) of the exact surface
    distance = np.abs(exact_sdf(loaded.vertices))
    assert float(np.median(distance)) < 0.08, float(np.median(distance))


def test_export_mesh_obj_writes_obj_mtl_and_png_next_to_each_other(trained, comfy_inprocess):
    path, mesh = export(trained, "c3d_obj/toy", "obj").result
    assert path == "c3d_obj/toy_00001_.obj"
    folder = comfy_inprocess / "output" / "c3d_obj"
    assert sorted(p.name for p in folder.iterdir()) == ["toy_00001_.mtl", "toy_00001_.obj", "toy_00001_.png"]
    obj_text = (folder / "toy_00001_.obj").read_text()
    mtl_text = (folder / "toy_00001_.mtl").read_text()
    assert re.search(r"^mtllib toy_00001_\.mtl$", obj_text, re.M)
    assert re.search(r"^map_Kd toy_00001_\.png$", mtl_text, re.M)
    assert Image.open(folder / "toy_00001_.png").size == (128, 128)
    loaded = trimesh.load(folder / "toy_00001_.obj", force="mesh", process=False)
    assert len(loaded.faces) == mesh.faces.shape[1]
    assert loaded.visual.kind == "texture"


# -------------------------------------------------------------------------------------- ExportMesh inputs


@pytest.mark.parametrize("prefix,reason", [
    ("../escape", "contains '..'"),
    ("a/../../b", "contains '..'"),
    ("/tmp/x", "is an absolute path"),
    ("C:\\x", "is an absolute path"),
    ("\\escape", "is an absolute path"),
    ("", "empty"),
    ("   ", "empty"),
    ("mesh\nname", "contains control characters (U+000A)"),
    ("mesh\x00", "contains control characters (U+0000)"),
    ("a\tb\x1b", "contains control characters (U+0009, U+001B)"),
    ("mesh?*", "contains * ?, which file names may not hold on every system"),
], ids=["parent", "nested-parent", "posix-absolute", "windows-absolute", "windows-root", "empty", "blank",
        "newline", "nul", "tab-escape", "reserved"])
def test_export_mesh_refuses_a_prefix_leaving_the_output_folder_and_writes_nothing(
        trained, comfy_inprocess, prefix, reason):
    watched = comfy_inprocess.parent  # the output folder, its parent and their siblings
    before = files_under(watched)
    tmp_x_before = set(Path("/tmp").glob("x_*"))
    with pytest.raises(ValueError, match=r"^filename_prefix: ") as raised:
        export(trained, prefix, "ply", colors="none")
    assert reason in str(raised.value)
    assert files_under(watched) == before
    assert set(Path("/tmp").glob("x_*")) == tmp_x_before


def test_export_mesh_threshold_above_the_densest_point_names_threshold(trained, comfy_inprocess):
    # Independent look at the field: its visible density on the same 48^3 grid ExportMesh samples.
    axis = torch.linspace(-1.0, 1.0, 48)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    with torch.no_grad():
        densest = float(trained.visible_density(points).max())
    assert 0.0 < densest < 10000.0
    before = files_under(comfy_inprocess / "output")
    with pytest.raises(NoSurfaceError, match=r"^threshold: 10000 is not crossed anywhere") as raised:
        export(trained, "c3d_none/toy", "glb", threshold=10000.0)  # the input's maximum
    assert isinstance(raised.value, ValueError)
    top = float(re.search(r"ranges from \S+ to ([0-9.e+-]+)\)", str(raised.value)).group(1))
    assert top == pytest.approx(densest, rel=1e-4)
    assert files_under(comfy_inprocess / "output") == before


def test_continued_training_uses_the_new_learning_rate_samples_and_background(trained, rig):
    images, masks = views_of(rig)
    more = fit(images, rig, masks, nerf=trained, steps=2, rays_per_step=256, samples_per_ray=40,
               learning_rate=0.05, background="black")
    groups = more.training["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.005])
    assert more.render.samples_per_ray == 40
    assert more.background.rgb.tolist() == [0.0, 0.0, 0.0]
    assert trained.background.rgb.tolist() == [1.0, 1.0, 1.0]  # the input is untouched
