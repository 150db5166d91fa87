"""The SDS optimiser inside a real ComfyUI server: both example workflows over HTTP on the tiny models, and a run
interrupted with Cancel then resumed from its checkpoint, which must end bit-identical to an uninterrupted run.

The tiny MVDream has random weights, so these tests check the wiring, files and resumability, not the asset.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trimesh
from safetensors import safe_open

from comfy_execution.graph_utils import GraphBuilder
from harness.interrupt import assert_server_still_serves
from harness.paths import PACK_ROOT
from harness.workflow import ui_to_api

pytestmark = pytest.mark.server

TEMPLATES = PACK_ROOT / "example_workflows"
#: The SDS Optimizer's settings for two CPU cores (8x8 latents, few samples).
FAST_SDS = dict(steps=4, low_resolution=64, low_batch=4, high_resolution=64, high_batch=4, samples_per_ray=16,
                checkpoint_every=2)


def by_type(prompt: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        found.setdefault(node["class_type"], []).append(node_id)
    return found


def shrink_common(prompt: dict, tiny_models, prefix: str) -> dict[str, list[str]]:
    nodes = by_type(prompt)
    (loader,) = nodes["Compose3D_MVDreamLoader"]
    assert prompt[loader]["inputs"]["ckpt_name"] == "sd-v2.1-base-4view.safetensors"
    prompt[loader]["inputs"]["ckpt_name"] = tiny_models.mvdream_checkpoint
    (sds,) = nodes["Compose3D_SDSOptimizer"]
    assert prompt[sds]["inputs"]["steps"] == 10000 and prompt[sds]["inputs"]["guidance_scale"] == 50.0
    prompt[sds]["inputs"].update(FAST_SDS, checkpoint_prefix=f"{prefix}/sds")
    shrink_mesh_and_turntable(prompt, nodes, prefix, threshold=1.0)
    return nodes


def shrink_mesh_and_turntable(prompt: dict, nodes: dict, prefix: str, threshold: float) -> None:
    """The template's Export Mesh and turntable at test sizes; the mesh goes to ``prefix``/mesh."""
    (mesh,) = nodes["Compose3D_ExportMesh"]
    prompt[mesh]["inputs"].update(filename_prefix=f"{prefix}/mesh", resolution=32, threshold=threshold,
                                  max_faces=2000, colors="vertex", texture_size=64)
    (render,) = nodes["Compose3D_RenderNeRF"]
    prompt[render]["inputs"].update(width=16, height=16, samples_per_ray=16)
    for ring in nodes["Compose3D_OrbitCameras"]:
        if prompt[ring]["inputs"]["views"] == 24:
            prompt[ring]["inputs"]["views"] = 4


def check_outputs(server, result, prefix: str) -> None:
    assert result.status == "success", result.error
    out = server.base / "output" / prefix
    meshes = list(out.glob("mesh*.glb"))
    assert len(meshes) == 1 and meshes[0].stat().st_size > 0
    mesh = trimesh.load(meshes[0], force="mesh")
    assert len(mesh.faces) > 0
    assert sorted(p.name for p in out.glob("sds_*.safetensors")) == ["sds_000002.safetensors",
                                                                      "sds_000004.safetensors"]


def test_text_to_3d_workflow_runs_and_writes_a_mesh(comfy_server, tiny_models):
    workflow = json.loads((TEMPLATES / "Text to 3D - SDS.json").read_text())
    prompt = ui_to_api(workflow, comfy_server.get_json("/object_info"))
    nodes = shrink_common(prompt, tiny_models, "c3d_sds_t23d")
    (sds,) = nodes["Compose3D_SDSOptimizer"]
    assert prompt[sds]["inputs"]["background"] == "learned" and "reference_images" not in prompt[sds]["inputs"]
    assert {"Preview3D", "SaveAnimatedWEBP"} <= set(nodes)
    result = comfy_server.run(prompt, timeout=300)
    check_outputs(comfy_server, result, "c3d_sds_t23d")
    progress = result.progress(sds)
    assert progress and progress[-1]["value"] == 4 and {p["max"] for p in progress} == {4}


def test_grounded_dreamer_workflow_fits_the_refocused_views_then_distils(comfy_server, tiny_models):
    workflow = json.loads((TEMPLATES / "Text to 3D - Grounded-Dreamer.json").read_text())
    prompt = ui_to_api(workflow, comfy_server.get_json("/object_info"))
    nodes = shrink_common(prompt, tiny_models, "c3d_sds_gd")
    (sds,) = nodes["Compose3D_SDSOptimizer"]
    (decode,) = nodes["VAEDecode"]
    (refocus,) = nodes["Compose3D_RefocusSampler"]
    assert prompt[sds]["inputs"]["reference_images"] == [decode, 0]
    assert prompt[sds]["inputs"]["background"] == "white"
    rig = prompt[sds]["inputs"]["reference_cameras"][0]
    assert prompt[rig]["inputs"]["views"] == 4  # the rig that conditioned the 4 views
    (scheduler,) = nodes["BasicScheduler"]
    prompt[scheduler]["inputs"]["steps"] = 3
    prompt[refocus]["inputs"].update(refocus_steps=1, thresholds="", max_tries=1)
    (latent,) = nodes["EmptyLatentImage"]
    prompt[latent]["inputs"].update(width=64, height=64)
    prompt[sds]["inputs"]["reference_fit"] = 0.5
    result = comfy_server.run(prompt, timeout=300)
    check_outputs(comfy_server, result, "c3d_sds_gd")
    text = json.dumps(result.outputs)
    assert "reference loss" in comfy_server.log_text() or "reference" in text


#: The toy's part names, as phrases of the prompt of the modulated run.
TOY_PROMPT = "a toy with a head, a left side, a right side and a base, 3d asset"


def test_dreambeast_workflow_runs_end_to_end_on_the_tiny_sd3_and_mvdream(comfy_server, tiny_models):
    workflow = json.loads((TEMPLATES / "Text to 3D - DreamBeast parts.json").read_text())
    prompt = ui_to_api(workflow, comfy_server.get_json("/object_info"))
    nodes = by_type(prompt)
    (loader,) = nodes["Compose3D_MVDreamLoader"]
    prompt[loader]["inputs"]["ckpt_name"] = tiny_models.mvdream_checkpoint
    (sd3,) = nodes["CheckpointLoaderSimple"]
    assert prompt[sd3]["inputs"]["ckpt_name"] == "sd3_medium_incl_clips.safetensors"
    prompt[sd3]["inputs"]["ckpt_name"] = tiny_models.sd3_checkpoint
    plain, modulated = sorted(nodes["Compose3D_SDSOptimizer"], key=lambda n: prompt[n]["inputs"]["start_at_step"])
    # the official schedule: plain to 1000 of 7000, then modulated from 3020 (0.4314 of the steps) to the end
    assert (prompt[plain]["inputs"]["steps"], prompt[plain]["inputs"]["end_at_step"]) == (7000, 1000)
    m = prompt[modulated]["inputs"]
    assert (m["steps"], m["start_at_step"], m["cross_strength"], m["self_strength"]) == (7000, 1000, 0.6, 1.2)
    assert round(m["modulation_start"] * 7000) == 3020 and m["modulation_end"] == 1.0
    assert m["nerf"][0] == plain and m["part_field"][0] in nodes["Compose3D_PartAffinityNeRF"]
    text = m["prompt"][0]
    assert prompt[text]["class_type"] == "PrimitiveStringMultiline"  # one prompt for MVDream, SD3 and the tokens
    for sds, prefix in ((plain, "plain"), (modulated, "modulated")):
        prompt[sds]["inputs"].update({k: v for k, v in FAST_SDS.items() if k != "steps"}, steps=8,
                                     checkpoint_every=0, checkpoint_prefix=f"c3d_dreambeast/{prefix}")
    prompt[plain]["inputs"]["end_at_step"] = 2
    prompt[modulated]["inputs"]["start_at_step"] = 2  # modulated from step round(0.4314 * 8) = 3: 5 steps
    (cams,) = nodes["Compose3D_SDSCameras"]
    assert prompt[cams]["inputs"]["groups"] == 20
    prompt[cams]["inputs"]["groups"] = 2
    for render in nodes["Compose3D_RenderNeRF"]:
        prompt[render]["inputs"].update(width=32, height=32, samples_per_ray=16)
    (capture,) = nodes["Compose3D_SD3AttentionCapture"]
    prompt[capture]["inputs"].update(blocks="1", resolution=64, map_size=16, steps=12)
    (field,) = nodes["Compose3D_PartAffinityNeRF"]
    assert prompt[field]["inputs"]["steps"] == 2000
    prompt[field]["inputs"].update(steps=10, rays_per_step=256, train_size=16)
    (mesh,) = nodes["Compose3D_ExportMesh"]
    prompt[mesh]["inputs"].update(filename_prefix="c3d_dreambeast/mesh", resolution=32, threshold=1.0,
                                  max_faces=2000, colors="vertex", texture_size=64)
    for ring in nodes["Compose3D_OrbitCameras"]:
        prompt[ring]["inputs"]["views"] = 4
    assert {"Preview3D", "SaveAnimatedWEBP"} <= set(nodes)

    result = comfy_server.run(prompt, timeout=600)
    assert result.status == "success", result.error
    meshes = list((comfy_server.base / "output" / "c3d_dreambeast").glob("mesh*.glb"))
    assert len(meshes) == 1 and len(trimesh.load(meshes[0], force="mesh").faces) > 0
    assert "part modulation: 5 steps" in comfy_server.log_text()
    progress = result.progress(modulated)
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 6  # steps 2-8


def sds_prompt(tiny_models, prefix: str, resume_from: str = "", steps: int = 8) -> tuple[dict, str]:
    """A part-modulated SDS run (DreamBeast; the window covers steps 2-8) with a part field trained on the test
    object's exact part maps."""
    g = GraphBuilder(prefix="")
    loader = g.node("Compose3D_MVDreamLoader", ckpt_name=tiny_models.mvdream_checkpoint)
    ring = g.node("Compose3D_OrbitCameras", views=4, elevation=20.0, azimuth_start=0.0, azimuth_span=360.0,
                  distance=2.5, fov=40.0)
    views = g.node("Compose3D_TestObjectViews", cameras=ring.out(0), width=32, height=32, background="white")
    nerf = g.node("Compose3D_NeRFFromViews", images=views.out(0), cameras=ring.out(0), masks=views.out(1), steps=2,
                  rays_per_step=256, samples_per_ray=16, learning_rate=0.01, background="white", seed=0)
    maps = g.node("Compose3D_TestObjectPartMaps", cameras=ring.out(0), size=16)
    field = g.node("Compose3D_PartAffinityNeRF", part_maps=maps.out(0), nerf=nerf.out(0), steps=2,
                   rays_per_step=256, train_size=16, learning_rate=0.01, normalize=True, seed=0)
    pos = g.node("CLIPTextEncode", text=TOY_PROMPT, clip=loader.out(1))
    neg = g.node("CLIPTextEncode", text="", clip=loader.out(1))
    from compose3d.nodes.sds import SDSOptimizer

    values = {s.id: s.default for s in SDSOptimizer.define_schema().inputs if getattr(s, "default", None) is not None}
    values.update(FAST_SDS, steps=steps, checkpoint_every=100, checkpoint_prefix=f"c3d_sds_resume/{prefix}",
                  resume_from=resume_from, seed=5, prompt=TOY_PROMPT, parts="head, left side, right side, base",
                  modulation_start=0.25)
    sds = g.node("Compose3D_SDSOptimizer", model=loader.out(0), vae=loader.out(2), positive=pos.out(0),
                 negative=neg.out(0), part_field=field.out(0), clip=loader.out(1), **values)
    g.node("PreviewAny", source=sds.out(2))
    return g.finalize(), sds.id


def read_state(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_interrupted_modulated_run_resumes_to_the_same_field_as_an_uninterrupted_one(comfy_server, tiny_models):
    folder = comfy_server.base / "output" / "c3d_sds_resume"
    prompt, _ = sds_prompt(tiny_models, "full")
    assert comfy_server.run(prompt, timeout=300).status == "success"
    assert "part modulation: 6 steps" in comfy_server.log_text()

    prompt, sds = sds_prompt(tiny_models, "cut")
    seen = {"sent": False}

    def on_message(msg, server):
        data = msg.get("data", {})
        if msg["type"] == "progress" and data.get("node") == sds and data.get("value", 0) >= 3 and not seen["sent"]:
            seen["sent"] = True
            server.interrupt()

    result = comfy_server.run(prompt, timeout=300, on_message=on_message)
    assert result.status == "interrupted"
    assert_server_still_serves(comfy_server, views=3, elevation=10.0)
    cut = sorted(folder.glob("cut_*.safetensors"))
    assert len(cut) == 1, cut
    stopped_at = int(cut[0].stem.split("_")[-1])
    assert 3 <= stopped_at < 8

    prompt, _ = sds_prompt(tiny_models, "cut", resume_from=f"c3d_sds_resume/{cut[0].name}")
    result = comfy_server.run(prompt, timeout=300)
    assert result.status == "success", result.error
    full, resumed = read_state(folder / "full_000008.safetensors"), read_state(folder / "cut_000008.safetensors")
    kept = [k for k in full if k.split(".")[0] in ("field", "background", "occupancy")]
    assert kept and set(kept) <= set(resumed)
    for key in kept:
        assert torch.equal(full[key], resumed[key]), key
    assert not torch.equal(full["field.encoding.table"], read_state(cut[0])["field.encoding.table"])

    prompt, _ = sds_prompt(tiny_models, "missing", resume_from="c3d_sds_resume/nothing_here.safetensors")
    result = comfy_server.run(prompt, timeout=120)
    assert result.status == "error"
    assert result.error["exception_message"].startswith("resume_from: no checkpoint at")
