"""Reconstruction, mesh export and 3D preview inside a real ComfyUI server, driven over HTTP and the websocket."""
from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pytest
import trimesh

from comfy_execution.graph_utils import GraphBuilder
from harness.interrupt import assert_server_still_serves, interrupt_at_first_progress

pytestmark = pytest.mark.server

NERF_STEPS = 60
#: Surface density for the exports: low, so that a NeRF trained for only 60 steps has a clear surface.
THRESHOLD = 1.0


def orbit(g: GraphBuilder, views: int, elevation: float, azimuth_start: float = 0.0):
    return g.node("Compose3D_OrbitCameras", views=views, elevation=elevation, azimuth_start=azimuth_start,
                  azimuth_span=360.0, distance=2.5, fov=40.0)


def add_views(g: GraphBuilder, cameras, size: int):
    return g.node("Compose3D_TestObjectViews", cameras=cameras.out(0), width=size, height=size, background="white")


def add_nerf(g: GraphBuilder, views, cameras, steps: int, seed: int):
    return g.node("Compose3D_NeRFFromViews", images=views.out(0), cameras=cameras.out(0), masks=views.out(1),
                  steps=steps, rays_per_step=1024, samples_per_ray=64, learning_rate=0.01, background="white",
                  seed=seed)


def add_export(g: GraphBuilder, nerf, prefix: str, format: str = "glb"):
    return g.node("Compose3D_ExportMesh", nerf=nerf.out(0), filename_prefix=prefix, format=format, resolution=48,
                  threshold=THRESHOLD, keep_components=1, max_faces=2000, colors="texture", texture_size=128)


@pytest.fixture(scope="module")
def reconstruction(comfy_server):
    """One prompt: 8 cameras -> test object views (24 px) -> NeRF (60 steps) -> ExportMesh (glb) -> Preview3D,
    and ExportMesh's MESH -> core SaveGLB."""
    g = GraphBuilder(prefix="")
    cameras = g.node("Compose3D_CombineCameras", first=orbit(g, 4, 15.0).out(0),
                     second=orbit(g, 4, 45.0, azimuth_start=45.0).out(0))
    views = add_views(g, cameras, 24)
    nerf = add_nerf(g, views, cameras, NERF_STEPS, seed=11)
    export = add_export(g, nerf, "c3d_http/toy")
    preview = g.node("Preview3D", model_file=export.out(0))
    save = g.node("SaveGLB", mesh=export.out(1), filename_prefix="c3d_http_core/saved")
    result = comfy_server.run(g.finalize(), timeout=240)
    ids = {"nerf": nerf.id, "export": export.id, "preview": preview.id, "save": save.id}
    return result, ids


def test_export_mesh_path_feeds_preview3d_and_the_file_downloads_through_view(comfy_server, reconstruction):
    result, ids = reconstruction
    assert result.status == "success", result.error
    shown = result.outputs[ids["export"]]["3d"]
    assert shown == [{"filename": "toy_00001_.glb", "subfolder": "c3d_http", "type": "output"}]
    model_file = result.outputs[ids["preview"]]["result"][0]
    assert model_file == "c3d_http/toy_00001_.glb"
    on_disk = comfy_server.base / "output" / model_file
    assert on_disk.is_file()
    query = urlencode({"filename": "toy_00001_.glb", "subfolder": "c3d_http", "type": "output"})
    downloaded = comfy_server.get_bytes(f"/view?{query}")
    assert downloaded == on_disk.read_bytes()
    assert downloaded[:4] == b"glTF"
    mesh = trimesh.load(on_disk, force="mesh", process=False)
    assert 1000 <= len(mesh.faces) <= 2000  # simplified to about max_faces


def test_save_glb_accepts_export_meshs_mesh_and_writes_the_same_geometry(comfy_server, reconstruction):
    result, ids = reconstruction
    assert result.status == "success", result.error
    (saved,) = result.outputs[ids["save"]]["3d"]
    assert saved["subfolder"] == "c3d_http_core" and saved["filename"] == "saved_00001_.glb"
    core = trimesh.load(comfy_server.base / "output" / "c3d_http_core" / "saved_00001_.glb", force="mesh",
                        process=False)
    ours = trimesh.load(comfy_server.base / "output" / "c3d_http" / "toy_00001_.glb", force="mesh", process=False)
    assert len(core.faces) == len(ours.faces)
    # Ours is split at UV seams; SaveGLB gets the unsplit surface: the same positions, fewer vertices.
    merged = np.unique(np.round(ours.vertices, 5), axis=0)
    assert len(core.vertices) == len(merged) < len(ours.vertices)
    np.testing.assert_allclose(np.unique(np.round(core.vertices, 5), axis=0), merged, atol=1e-5)


def test_nerf_training_reports_progress_up_to_its_steps_with_previews(reconstruction):
    result, ids = reconstruction
    assert result.status == "success", result.error
    progress = result.progress(ids["nerf"])
    assert [p["value"] for p in progress] == list(range(1, NERF_STEPS + 1))
    assert {p["max"] for p in progress} == {NERF_STEPS}
    # a preview every max(25, steps // 20) = 25 steps and one at the last step: steps 25, 50 and 60
    assert result.previews == 3


def test_interrupt_stops_nerf_training_within_seconds_and_the_server_keeps_serving(comfy_server):
    g = GraphBuilder(prefix="")
    cameras = orbit(g, 4, 20.0)
    views = add_views(g, cameras, 16)
    nerf = add_nerf(g, views, cameras, 100000, seed=5)
    g.node("Compose3D_ExportMesh", nerf=nerf.out(0), filename_prefix="c3d_never/toy", format="glb",
           resolution=48, threshold=THRESHOLD, keep_components=1, max_faces=2000, colors="none",
           texture_size=128)
    run = interrupt_at_first_progress(comfy_server, g.finalize(), nerf.id)
    result = run.result
    assert result.status == "interrupted"
    assert run.stopped_after is not None and run.stopped_after < 2.0
    assert run.progress_after <= 5
    (stopped,) = [m["data"] for m in result.messages if m["type"] == "execution_interrupted"]
    assert stopped["node_type"] == "Compose3D_NeRFFromViews" and stopped["node_id"] == nerf.id
    assert not (comfy_server.base / "output" / "c3d_never").exists()
    assert_server_still_serves(comfy_server, views=5, elevation=33.0)


def test_camera_count_mismatch_over_http_is_an_error_naming_cameras(comfy_server):
    g = GraphBuilder(prefix="")
    views = add_views(g, orbit(g, 4, 20.0), 16)
    three = orbit(g, 3, 20.0)
    add_export(g, add_nerf(g, views, three, 10, seed=0), "c3d_mismatch/toy")  # an output, so it runs
    result = comfy_server.run(g.finalize(), timeout=60)
    assert result.status == "error"
    assert result.error["node_type"] == "Compose3D_NeRFFromViews"
    assert result.error["exception_message"].startswith("cameras: 3 cameras for 4 images")
    assert_server_still_serves(comfy_server, views=6, elevation=12.0)


def test_escaping_filename_prefix_over_http_is_an_error_and_writes_nothing(comfy_server):
    outside = comfy_server.base.parent
    before = set(outside.rglob("escape*"))
    g = GraphBuilder(prefix="")
    cameras = orbit(g, 4, 20.0)
    views = add_views(g, cameras, 16)
    nerf = add_nerf(g, views, cameras, 1, seed=0)
    add_export(g, nerf, "../../escape")
    result = comfy_server.run(g.finalize(), timeout=60)
    assert result.status == "error"
    assert result.error["node_type"] == "Compose3D_ExportMesh"
    assert result.error["exception_message"].startswith("filename_prefix: '../../escape' contains '..'")
    assert set(outside.rglob("escape*")) == before
    assert_server_still_serves(comfy_server, views=7, elevation=-10.0)
