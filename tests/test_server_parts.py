"""DreamBeast part 1 inside a real ComfyUI server: the Part-Affinity example workflow over HTTP on the tiny SD3
(core CheckpointLoaderSimple), and Cancel during the SD3 capture and during the part field's training.

The tiny SD3 has random weights, so the workflow test checks wiring and outputs, not what SD3 would see.
"""
from __future__ import annotations

import io
import json
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from comfy_execution.graph_utils import GraphBuilder
from harness.interrupt import assert_server_still_serves, interrupt_after_start
from harness.paths import PACK_ROOT
from harness.workflow import ui_to_api
from compose3d.nodes.common import LEGEND_KEY

pytestmark = pytest.mark.server

TEMPLATE = PACK_ROOT / "example_workflows" / "Part maps - SD3 capture and Part-Affinity NeRF.json"
#: The template's long nodes at test sizes (the browser test runs it at these too).
TEST_SIZES = {"Compose3D_SD3AttentionCapture": {"blocks": "1", "resolution": 64, "map_size": 16, "steps": 12},
              "Compose3D_TestObjectViews": {"width": 32, "height": 32},
              "Compose3D_NeRFFromViews": {"steps": 40, "rays_per_step": 512, "samples_per_ray": 32},
              "Compose3D_PartAffinityNeRF": {"steps": 10, "rays_per_step": 256, "train_size": 16},
              "Compose3D_RenderPartMaps": {"size": 24}}


def by_type(prompt: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        found.setdefault(node["class_type"], []).append(node_id)
    return found


def test_the_part_affinity_workflow_runs_over_http_on_the_tiny_sd3(comfy_server, tiny_models):
    prompt = ui_to_api(json.loads(TEMPLATE.read_text()), comfy_server.get_json("/object_info"))
    nodes = by_type(prompt)
    (loader,) = nodes["CheckpointLoaderSimple"]
    assert prompt[loader]["inputs"]["ckpt_name"] == "sd3_medium_incl_clips.safetensors"
    prompt[loader]["inputs"]["ckpt_name"] = tiny_models.sd3_checkpoint
    (capture,) = nodes["Compose3D_SD3AttentionCapture"]
    settings = prompt[capture]["inputs"]
    assert (settings["blocks"], settings["t_low"], settings["t_high"], settings["steps"], settings["resolution"],
            settings["normalization"]) == ("11", 100.0, 450.0, 50, 1024, "official")  # DreamBeast's
    for node_id, node in prompt.items():
        node["inputs"].update(TEST_SIZES.get(node["class_type"], {}))
    (render,) = nodes["Compose3D_RenderPartMaps"]

    result = comfy_server.run(prompt, timeout=600)
    assert result.status == "success", result.error
    shown = {node_id: out["images"] for node_id, out in result.outputs.items() if "images" in out}
    assert sorted(shown) == sorted([capture, render])  # each shows its own preview: heat maps, coloured parts
    assert len(shown[capture]) == 8 and len(shown[render]) == 4  # one image per view
    parts = ["head", "body", "base"]
    assert [p["name"] for p in result.outputs[capture][LEGEND_KEY][0]["parts"]] == parts
    assert result.outputs[capture][LEGEND_KEY][0]["layout"] == "columns"
    assert [p["name"] for p in result.outputs[render][LEGEND_KEY][0]["parts"]] == parts
    assert result.outputs[render][LEGEND_KEY][0]["layout"] == "colors"
    progress = result.progress(capture)
    assert progress and progress[-1]["value"] == progress[-1]["max"]  # the capture reported its steps


def test_a_part_preview_legend_names_the_colour_each_part_has_in_the_shown_image(comfy_server):
    """The oracle is the shown image itself: in exact part maps of the toy, a pixel covered by one part only has
    that part's colour, which the legend must give for it."""
    g = GraphBuilder(prefix="")
    ring = g.node("Compose3D_OrbitCameras", views=2, elevation=15.0, azimuth_start=0.0, azimuth_span=360.0,
                  distance=2.5, fov=40.0)
    maps = g.node("Compose3D_TestObjectPartMaps", cameras=ring.out(0), size=64)
    single = g.node("Compose3D_PartMapsToMasks", part_maps=maps.out(0), part="base", threshold=0.0)
    g.node("PreviewImage", images=g.node("MaskToImage", mask=single.out(0)).out(0))
    result = comfy_server.run(g.finalize(), timeout=120)
    assert result.status == "success", result.error
    shown = result.outputs[maps.id]
    legend = shown[LEGEND_KEY][0]
    assert legend["layout"] == "colors"
    assert [p["name"] for p in legend["parts"]] == ["head", "left side", "right side", "base"]
    image = np.asarray(Image.open(io.BytesIO(comfy_server.get_bytes("/view?" + urlencode(shown["images"][0])))))
    colours = {tuple(int(p["color"][i:i + 2], 16) for i in (1, 3, 5)): p["name"] for p in legend["parts"]}
    assert len(colours) == 4  # four distinct colours
    found = {}
    for colour, name in colours.items():
        close = np.abs(image[..., :3].astype(int) - np.array(colour)).max(axis=-1) <= 2
        found[name] = int(close.sum())
    assert all(count > 20 for count in found.values()), found  # every part shows, in its legend colour
    # the base's pixels in the preview are where the base's own mask is (the legend's colour means that part)
    base_colour = next(c for c, n in colours.items() if n == "base")
    base_mask = np.asarray(Image.open(io.BytesIO(comfy_server.get_bytes(
        "/view?" + urlencode(result.outputs[next(i for i in result.outputs if i != maps.id)]["images"][0])))))
    coloured_base = np.abs(image[..., :3].astype(int) - np.array(base_colour)).max(axis=-1) <= 2
    assert (base_mask[..., 0][coloured_base] > 128).all()


def test_cancel_during_the_capture_and_the_part_field_training_stops_promptly(comfy_server, tiny_models):
    for slow in ("capture", "field"):
        g = GraphBuilder(prefix="")
        ring = g.node("Compose3D_OrbitCameras", views=4, elevation=20.0, azimuth_start=0.0, azimuth_span=360.0,
                      distance=2.5, fov=40.0)
        loader = g.node("CheckpointLoaderSimple", ckpt_name=tiny_models.sd3_checkpoint)
        views = g.node("Compose3D_TestObjectViews", cameras=ring.out(0), width=32, height=32, background="white")
        if slow == "capture":  # 1000 steps in the window at 256 px: far longer than the delay
            node = g.node("Compose3D_SD3AttentionCapture", model=loader.out(0), clip=loader.out(1),
                          vae=loader.out(2), views=views.out(0), cameras=ring.out(0), prompt="a toy with a head",
                          parts="head", negative="", blocks="1", t_low=1.0, t_high=999.0, sdedit_timestep=500.0,
                          steps=1000, cfg=2.0, resolution=256, map_size=16, normalization="probability",
                          text_tokens="clip", view_words=True, seed=0)
        else:
            maps = g.node("Compose3D_TestObjectPartMaps", cameras=ring.out(0), size=32)
            nerf = g.node("Compose3D_NeRFFromViews", images=views.out(0), cameras=ring.out(0), masks=views.out(1),
                          steps=2, rays_per_step=256, samples_per_ray=16, learning_rate=0.01, background="white",
                          seed=0)
            node = g.node("Compose3D_PartAffinityNeRF", part_maps=maps.out(0), nerf=nerf.out(0), steps=100000,
                          rays_per_step=262144, train_size=32, learning_rate=0.01, normalize=True, seed=0)
        g.node("PreviewAny", source=node.out(0))
        run = interrupt_after_start(comfy_server, g.finalize(), node.id, 2.0, timeout=240)
        assert run.result.status == "interrupted", (slow, run.result.error)
        assert run.stopped_after is not None and run.stopped_after < 1.0, (slow, run.stopped_after)
        assert_server_still_serves(comfy_server, views=3, elevation=10.0)
