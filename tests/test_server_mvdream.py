"""MVDream and the refocus sampler inside a real ComfyUI server, driven over HTTP and the websocket.

The model is the session's tiny MVDream checkpoint (random weights in the released sd-v2.1-base-4view layout),
loaded by Compose3D_MVDreamLoader and sampled by ComfyUI's core samplers; so these tests check the wiring, the
shapes and the error paths, not picture quality.
"""
from __future__ import annotations

import io
import json
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from comfy_execution.graph_utils import GraphBuilder
from harness.interrupt import interrupt_at_first_progress
from harness.paths import PACK_ROOT
from harness.workflow import ui_to_api

pytestmark = pytest.mark.server

PROMPT = "a corgi wearing a red hat sitting next to a blue teapot, 3d asset"
NEGATIVE = "ugly, blurry"
EXAMPLE = PACK_ROOT / "example_workflows" / "MVDream 4 views with refocus.json"


def mvdream_conditionings(g: GraphBuilder, checkpoint: str, views: int = 4):
    """Loader -> positive/negative CLIPTextEncode -> MVDream Conditioning with an orbit of ``views`` cameras."""
    loader = g.node("Compose3D_MVDreamLoader", ckpt_name=checkpoint)
    cameras = g.node("Compose3D_OrbitCameras", views=views, elevation=15.0, azimuth_start=0.0, azimuth_span=360.0,
                     distance=2.0, fov=40.0)
    conds = []
    for text in (PROMPT, NEGATIVE):
        encoded = g.node("CLIPTextEncode", text=text, clip=loader.out(1))
        conds.append(g.node("Compose3D_MVDreamConditioning", conditioning=encoded.out(0), cameras=cameras.out(0)))
    return loader, conds[0], conds[1]


def ksampler_prompt(checkpoint: str, *, batch: int, steps: int, seed: int, prefix: str, size: int = 256):
    """The plain MVDream graph with core KSampler (DDIM); returns (prompt, ids)."""
    g = GraphBuilder(prefix="")
    loader, positive, negative = mvdream_conditionings(g, checkpoint)
    latent = g.node("EmptyLatentImage", width=size, height=size, batch_size=batch)
    sampler = g.node("KSampler", model=loader.out(0), seed=seed, steps=steps, cfg=7.5, sampler_name="ddim",
                     scheduler="ddim_uniform", positive=positive.out(0), negative=negative.out(0),
                     latent_image=latent.out(0), denoise=1.0)
    decode = g.node("VAEDecode", samples=sampler.out(0), vae=loader.out(2))
    save = g.node("SaveImage", images=decode.out(0), filename_prefix=prefix)
    return g.finalize(), {"sampler": sampler.id, "save": save.id}


def saved_images(server, result, save_id: str) -> list[Image.Image]:
    """The images a SaveImage node reported, downloaded through /view (and checked against the file on disk)."""
    images = []
    for entry in result.outputs[save_id]["images"]:
        assert entry["type"] == "output"
        data = server.get_bytes("/view?" + urlencode(entry))
        assert data == (server.base / "output" / entry["subfolder"] / entry["filename"]).read_bytes()
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return images


def assert_mvdream_still_samples(server, checkpoint: str, seed: int) -> None:
    """One DDIM step on 4 views of 128 px (a quick check: at 256 px the multi-view self-attention spans
    4 x 32 x 32 latent pixels, which is slow on a CPU)."""
    prompt, ids = ksampler_prompt(checkpoint, batch=4, steps=1, seed=seed, prefix=f"c3d_mv_after/s{seed}",
                                  size=128)
    result = server.run(prompt, timeout=120)
    assert result.status == "success", result.error
    assert len(result.outputs[ids["save"]]["images"]) == 4
    assert server.alive()


def test_mvdream_with_core_ksampler_over_http_saves_one_256px_image_per_camera(comfy_server, tiny_models):
    prompt, ids = ksampler_prompt(tiny_models.mvdream_checkpoint, batch=4, steps=3, seed=1, prefix="c3d_mv/ks")
    result = comfy_server.run(prompt, timeout=120)
    assert result.status == "success", result.error
    images = saved_images(comfy_server, result, ids["save"])
    assert len(images) == 4
    assert {im.size for im in images} == {(256, 256)}
    assert [e["subfolder"] for e in result.outputs[ids["save"]]["images"]] == ["c3d_mv"] * 4
    pixels = [np.asarray(im, dtype=np.float32) for im in images]
    assert all(p.std() > 0 for p in pixels), "a view came out as a flat image"
    assert all(np.abs(pixels[0] - p).max() > 0 for p in pixels[1:]), "views are identical"
    assert [p["value"] for p in result.progress(ids["sampler"])][-1:] == [3]


def test_example_refocus_workflow_runs_with_the_tiny_model_and_previews_attention(comfy_server, tiny_models):
    workflow = json.loads(EXAMPLE.read_text())
    prompt = ui_to_api(workflow, comfy_server.get_json("/object_info"))
    by_type: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    (loader,), (text,), (refocus,), (sampler,), (scheduler,), (save,) = (
        by_type[k] for k in ("Compose3D_MVDreamLoader", "PrimitiveStringMultiline", "Compose3D_RefocusSampler",
                             "SamplerCustom", "BasicScheduler", "SaveImage"))
    # the workflow as shipped: one prompt text feeds the positive encoder and the refocus sampler
    assert prompt[loader]["inputs"]["ckpt_name"] == "sd-v2.1-base-4view.safetensors"
    assert prompt[text]["inputs"]["value"] == PROMPT
    assert prompt[refocus]["inputs"]["prompt"] == [text, 0]
    encoders_of_text = [i for i in by_type["CLIPTextEncode"] if prompt[i]["inputs"]["text"] == [text, 0]]
    assert len(encoders_of_text) == 1
    assert prompt[refocus]["inputs"]["subjects"] == "corgi, hat, teapot"
    assert prompt[scheduler]["inputs"] == {"model": [loader, 0], "scheduler": "ddim_uniform", "steps": 50,
                                           "denoise": 1.0}
    assert prompt[sampler]["inputs"]["cfg"] == 7.5 and prompt[sampler]["inputs"]["sampler"] == [refocus, 0]
    assert prompt[save]["inputs"]["filename_prefix"] == "compose3d/refocus"

    prompt[loader]["inputs"]["ckpt_name"] = tiny_models.mvdream_checkpoint
    # 4 steps, the first 2 refocused, one refinement try at step 0 (0.5 is out of reach for random weights)
    prompt[scheduler]["inputs"]["steps"] = 4
    prompt[refocus]["inputs"].update(refocus_steps=2, thresholds="0: 0.5", max_tries=1)
    log_before = comfy_server.log_text().count("refocus step 2/2: attention in the weakest view corgi")
    result = comfy_server.run(prompt, timeout=180)
    assert result.status == "success", result.error

    images = saved_images(comfy_server, result, save)
    assert len(images) == 4 and {im.size for im in images} == {(256, 256)}
    # refocusing ran (the sampler logs each refocused step with the subjects' attention) and showed its maps
    assert comfy_server.log_text().count("refocus step 2/2: attention in the weakest view corgi") == log_before + 1
    assert result.previews >= 2  # an attention preview after each refocused step at least
    progress = result.progress(sampler)
    assert progress and {p["max"] for p in progress} == {4}
    assert progress[-1]["value"] == 4


def test_a_latent_batch_that_is_not_a_multiple_of_the_views_is_an_error_naming_both(comfy_server, tiny_models):
    prompt, _ = ksampler_prompt(tiny_models.mvdream_checkpoint, batch=3, steps=2, seed=2, prefix="c3d_mv_bad/ks")
    result = comfy_server.run(prompt, timeout=120)
    assert result.status == "error"
    assert result.error["node_type"] == "KSampler"
    assert "latent batch of 3 is not a multiple of the 4 views" in result.error["exception_message"]
    assert not (comfy_server.base / "output" / "c3d_mv_bad").exists()
    assert_mvdream_still_samples(comfy_server, tiny_models.mvdream_checkpoint, seed=3)


def test_interrupting_refocused_sampling_stops_within_seconds_and_the_server_keeps_serving(comfy_server,
                                                                                            tiny_models):
    g = GraphBuilder(prefix="")
    loader, positive, negative = mvdream_conditionings(g, tiny_models.mvdream_checkpoint)
    # a threshold of 1.0 at step 0 is never met: the refinement alone would take max_tries gradient steps
    refocus = g.node("Compose3D_RefocusSampler", clip=loader.out(1), prompt=PROMPT, subjects="corgi, teapot",
                     sampler_name="ddim", refocus_steps=200, step_size=20.0, thresholds="0: 1.0", max_tries=1000,
                     smoothing_sigma=0.5)
    sigmas = g.node("BasicScheduler", model=loader.out(0), scheduler="ddim_uniform", steps=200, denoise=1.0)
    latent = g.node("EmptyLatentImage", width=128, height=128, batch_size=4)
    sampler = g.node("SamplerCustom", model=loader.out(0), add_noise=True, noise_seed=4, cfg=7.5,
                     positive=positive.out(0), negative=negative.out(0), sampler=refocus.out(0),
                     sigmas=sigmas.out(0), latent_image=latent.out(0))
    decode = g.node("VAEDecode", samples=sampler.out(0), vae=loader.out(2))
    g.node("SaveImage", images=decode.out(0), filename_prefix="c3d_mv_never/refocus")
    run = interrupt_at_first_progress(comfy_server, g.finalize(), sampler.id)
    result = run.result
    assert result.status == "interrupted"
    assert run.stopped_after is not None and run.stopped_after < 5.0, f"stopped {run.stopped_after} s after"
    assert run.progress_after <= 2
    (stopped,) = [m["data"] for m in result.messages if m["type"] == "execution_interrupted"]
    assert stopped["node_type"] == "SamplerCustom" and stopped["node_id"] == sampler.id
    assert not (comfy_server.base / "output" / "c3d_mv_never").exists()
    assert_mvdream_still_samples(comfy_server, tiny_models.mvdream_checkpoint, seed=5)


def test_loading_a_plain_sd_checkpoint_as_mvdream_is_an_error_naming_the_camera_weights(comfy_server, tiny_models):
    g = GraphBuilder(prefix="")
    loader = g.node("Compose3D_MVDreamLoader", ckpt_name=tiny_models.sd15_checkpoint)
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    decode = g.node("VAEDecode", samples=latent.out(0), vae=loader.out(2))
    g.node("PreviewImage", images=decode.out(0))
    result = comfy_server.run(g.finalize(), timeout=60)
    assert result.status == "error"
    assert result.error["node_type"] == "Compose3D_MVDreamLoader"
    message = result.error["exception_message"]
    assert message.startswith(f"{tiny_models.sd15_checkpoint}: no 'model.diffusion_model.camera_embed.*' weights")
    assert "not an MVDream checkpoint" in message
    assert_mvdream_still_samples(comfy_server, tiny_models.mvdream_checkpoint, seed=6)
