"""Mixed-score sampling inside a real ComfyUI server: both example workflows over HTTP on the tiny MVDream and the
tiny SD1.5 (with its CLIP-L) in place of sd-v2.1-base-4view and SD2.1-base, and Cancel during sampling.

The tiny models have random weights, so these tests check the wiring, the outputs and the error paths.
"""
from __future__ import annotations

import json

import pytest

from harness.interrupt import interrupt_at_first_progress
from harness.paths import PACK_ROOT
from harness.workflow import ui_to_api
from test_server_sds import by_type, shrink_mesh_and_turntable

pytestmark = pytest.mark.server

TEMPLATES = PACK_ROOT / "example_workflows"


def tiny_template(server, tiny_models, name: str) -> tuple[dict, dict]:
    """The template as an API prompt, with the tiny models in place of the real ones and 64 px views."""
    prompt = ui_to_api(json.loads((TEMPLATES / name).read_text()), server.get_json("/object_info"))
    nodes = by_type(prompt)
    (mv,) = nodes["Compose3D_MVDreamLoader"]
    assert prompt[mv]["inputs"]["ckpt_name"] == "sd-v2.1-base-4view.safetensors"
    prompt[mv]["inputs"]["ckpt_name"] = tiny_models.mvdream_checkpoint
    (two,) = nodes["CheckpointLoaderSimple"]
    assert prompt[two]["inputs"]["ckpt_name"] == "v2-1_512-ema-pruned.safetensors"
    prompt[two]["inputs"]["ckpt_name"] = tiny_models.sd15_2d_checkpoint
    (schedule,) = nodes["Compose3D_LambdaSchedule"]
    # the paper's shape: lambda small at high t, rising as t falls
    assert prompt[schedule]["inputs"]["kind"] == "linear"
    assert prompt[schedule]["inputs"]["start"] < prompt[schedule]["inputs"]["end"]
    (latent,) = nodes["EmptyLatentImage"]
    assert prompt[latent]["inputs"] == {"width": 256, "height": 256, "batch_size": 4}
    prompt[latent]["inputs"].update(width=64, height=64)
    return prompt, nodes


def test_mixed_score_4views_workflow_samples_and_scores_the_views(comfy_server, tiny_models):
    prompt, nodes = tiny_template(comfy_server, tiny_models, "Mixed-score 4 views.json")
    (guider,) = nodes["Compose3D_MixedScoreGuider"]
    assert prompt[nodes["SamplerCustomAdvanced"][0]]["inputs"]["guider"] == [guider, 0]
    (sampler,) = nodes["KSamplerSelect"]
    (scheduler,) = nodes["BasicScheduler"]
    assert prompt[sampler]["inputs"]["sampler_name"] == "ddim"
    assert prompt[scheduler]["inputs"]["scheduler"] == "ddim_uniform" and prompt[scheduler]["inputs"]["steps"] == 50
    prompt[scheduler]["inputs"]["steps"] = 3
    (score,) = nodes["Compose3D_ViewConsistency"]
    prompt[score]["inputs"].update(steps=5, rays_per_step=256, samples_per_ray=16)
    (save,) = nodes["SaveImage"]
    prompt[save]["inputs"]["filename_prefix"] = "c3d_mixed/views"
    result = comfy_server.run(prompt, timeout=300)
    assert result.status == "success", result.error
    assert len(result.outputs[save]["images"]) == 4
    progress = result.progress(nodes["SamplerCustomAdvanced"][0])
    assert progress and progress[-1]["value"] == 3
    previews = {node for node in nodes["PreviewImage"] if node in result.outputs}
    assert len(previews) == 2  # the lambda curve and the consistency error images
    (per_view,) = nodes["PreviewAny"]
    text = json.dumps(result.outputs[per_view])
    assert "view" in text


def test_mixed_score_text_to_3d_workflow_writes_a_mesh(comfy_server, tiny_models):
    import trimesh

    prompt, nodes = tiny_template(comfy_server, tiny_models, "Text to 3D - mixed score without distillation.json")
    (sampler,) = nodes["Compose3D_MixedScoreSampler"]
    assert prompt[sampler]["inputs"]["steps"] == 50
    prompt[sampler]["inputs"]["steps"] = 3
    (nerf,) = nodes["Compose3D_NeRFFromViews"]
    assert prompt[nerf]["inputs"]["cameras"] == prompt[nodes["Compose3D_MVDreamConditioning"][0]]["inputs"]["cameras"]
    prompt[nerf]["inputs"].update(steps=30, rays_per_step=1024, samples_per_ray=16)
    # random-weight views train a diffuse cloud (density about 1.8 to 2.4 after 30 steps): cut it in the middle
    shrink_mesh_and_turntable(prompt, nodes, "c3d_mixed3d", threshold=2.1)
    result = comfy_server.run(prompt, timeout=300)
    assert result.status == "success", (result.error or {}).get("exception_message")
    meshes = list((comfy_server.base / "output" / "c3d_mixed3d").glob("mesh*.glb"))
    assert len(meshes) == 1
    assert len(trimesh.load(meshes[0], force="mesh").faces) > 0
    progress = result.progress(sampler)
    assert progress and progress[-1]["value"] == 3 and {p["max"] for p in progress} == {3}


def test_cancel_stops_mixed_sampling_promptly_and_the_server_keeps_serving(comfy_server, tiny_models):
    prompt, nodes = tiny_template(comfy_server, tiny_models, "Text to 3D - mixed score without distillation.json")
    (sampler,) = nodes["Compose3D_MixedScoreSampler"]
    prompt[sampler]["inputs"]["steps"] = 200  # a long run: far more than finishes before the Cancel
    (latent,) = nodes["EmptyLatentImage"]
    prompt[latent]["inputs"].update(width=128, height=128)
    run = interrupt_at_first_progress(comfy_server, prompt, sampler)
    assert run.result.status == "interrupted"
    assert run.stopped_after is not None and run.stopped_after < 5.0, f"stopped {run.stopped_after} s after"
    assert run.progress_after <= 2
    (stopped,) = [m["data"] for m in run.result.messages if m["type"] == "execution_interrupted"]
    assert stopped["node_id"] == sampler
    # the server still samples: the same graph without its 3D half, 2 steps
    dropped = {"Compose3D_NeRFFromViews", "Compose3D_ExportMesh", "Preview3D", "Compose3D_RenderNeRF",
               "SaveAnimatedWEBP", "Compose3D_OrbitCameras"}
    keep = {k: v for k, v in prompt.items() if v["class_type"] not in dropped or k == cameras_of(prompt, nodes)}
    keep[sampler]["inputs"]["steps"] = 2
    result = comfy_server.run(keep, timeout=120)
    assert result.status == "success", result.error
    assert result.progress(sampler)[-1]["value"] == 2


def cameras_of(prompt: dict, nodes: dict) -> str:
    """The orbit rig that conditions the multi-view model."""
    return prompt[nodes["Compose3D_MVDreamConditioning"][0]]["inputs"]["cameras"][0]
