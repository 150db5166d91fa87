"""Make-Your-3D inside a real ComfyUI server: the example workflow over HTTP with the tiny models in place of
sd-v1.5-4view, SD1.5, ip-adapter_sd15 and the ViT-H image encoder, then the files it wrote loaded back by the
loaders users have: the tuned adapter by Load IP-Adapter, the LoRA by core LoraLoaderModelOnly.

The tiny models have random weights, so this checks the wiring, the files and the outputs; the mechanisms are
checked in test_make_your_3d.py and test_ip_adapter_oracle.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comfy_execution.graph_utils import GraphBuilder
from harness.paths import PACK_ROOT
from harness.workflow import ui_to_api
from test_server_sds import FAST_SDS, by_type, shrink_mesh_and_turntable

pytestmark = pytest.mark.server

TEMPLATE = PACK_ROOT / "example_workflows" / "Make-Your-3D - subject photo to 3D.json"


def subject_photo(server) -> None:
    """A 64 px photo of a red disc on white, as the template's subject.png in the server's input folder."""
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.full((64, 64, 3), 255, np.uint8)
    image[(yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2] = (200, 40, 40)
    Image.fromarray(image).save(server.base / "input" / "subject.png")


def tiny_prompt(server, tiny_models) -> tuple[dict, dict]:
    prompt = ui_to_api(json.loads(TEMPLATE.read_text()), server.get_json("/object_info"))
    nodes = by_type(prompt)
    replace = {("Compose3D_MVDreamLoader", "ckpt_name"): ("sd-v1.5-4view.safetensors",
                                                         tiny_models.mvdream_sd15_checkpoint),
               ("CheckpointLoaderSimple", "ckpt_name"): ("v1-5-pruned-emaonly.safetensors",
                                                         tiny_models.sd15_2d_checkpoint),
               ("Compose3D_IPAdapterLoader", "ipadapter_name"): ("ip-adapter_sd15.safetensors",
                                                                  tiny_models.ip_adapter),
               ("CLIPVisionLoader", "clip_name"): ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                                                   tiny_models.clip_vision)}
    for (kind, name), (shipped, tiny) in replace.items():
        (node,) = nodes[kind]
        assert prompt[node]["inputs"][name] == shipped
        prompt[node]["inputs"][name] = tiny
    (latent,) = nodes["EmptyLatentImage"]
    assert prompt[latent]["inputs"] == {"width": 256, "height": 256, "batch_size": 4}
    prompt[latent]["inputs"].update(width=64, height=64)
    for sampler in nodes["KSampler"]:
        prompt[sampler]["inputs"]["steps"] = 2
    (identity,) = nodes["Compose3D_IdentityTuner"]
    (prior,) = nodes["Compose3D_SubjectPriorTuner"]
    assert prompt[identity]["inputs"]["steps"] == 300 and prompt[prior]["inputs"]["steps"] == 300
    prompt[identity]["inputs"].update(steps=2, batch_size=2, augmentations=1, filename_prefix="c3d_my3d/identity")
    prompt[prior]["inputs"].update(steps=2, filename_prefix="c3d_my3d/subject")
    (sds,) = nodes["Compose3D_SDSOptimizer"]
    prompt[sds]["inputs"].update(FAST_SDS, checkpoint_prefix="c3d_my3d/sds")
    shrink_mesh_and_turntable(prompt, nodes, "c3d_my3d", threshold=1.0)
    return prompt, nodes


def test_make_your_3d_workflow_runs_and_its_files_load_back(comfy_server, tiny_models):
    import trimesh

    subject_photo(comfy_server)
    prompt, nodes = tiny_prompt(comfy_server, tiny_models)
    # the multi-views come from MVDream with the photo as image prompt, on the same cameras as the tuner's
    (mv_sampler, redraw) = sorted(nodes["KSampler"], key=lambda n: prompt[n]["inputs"]["denoise"], reverse=True)
    (apply,) = nodes["Compose3D_ApplyIPAdapter"]
    assert prompt[mv_sampler]["inputs"]["model"] == [apply, 0]
    (identity,) = nodes["Compose3D_IdentityTuner"]
    assert prompt[redraw]["inputs"]["model"] == [identity, 0]
    (prior,) = nodes["Compose3D_SubjectPriorTuner"]
    (sds,) = nodes["Compose3D_SDSOptimizer"]
    assert prompt[sds]["inputs"]["model"] == [prior, 0]

    result = comfy_server.run(prompt, timeout=600)
    assert result.status == "success", (result.error or {}).get("exception_message")
    output = comfy_server.base / "output"
    adapters = sorted((output / "ipadapter" / "c3d_my3d").glob("identity_*.safetensors"))
    loras = sorted((output / "loras" / "c3d_my3d").glob("subject_*.safetensors"))
    assert len(adapters) == 1 and len(loras) == 1
    meshes = list((output / "c3d_my3d").glob("mesh*.glb"))
    assert len(meshes) == 1 and len(trimesh.load(meshes[0], force="mesh").faces) > 0
    assert len(result.outputs[nodes["PreviewImage"][0]]["images"]) >= 1
    for tuner in (identity, prior):
        progress = result.progress(tuner)
        assert progress and progress[-1]["value"] == 2

    # the written files are in the loaders' lists and load back: the adapter by Load IP-Adapter (applied to SD1.5),
    # the LoRA by core LoraLoaderModelOnly on MVDream, each then sampled
    info = comfy_server.get_json("/object_info")
    adapter_name = "c3d_my3d/" + adapters[0].name
    lora_name = "c3d_my3d/" + loras[0].name
    assert adapter_name in info["Compose3D_IPAdapterLoader"]["input"]["required"]["ipadapter_name"][1]["options"]
    assert lora_name in info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
    g = GraphBuilder(prefix="")
    mv = g.node("Compose3D_MVDreamLoader", ckpt_name=tiny_models.mvdream_sd15_checkpoint)
    with_lora = g.node("LoraLoaderModelOnly", model=mv.out(0), lora_name=lora_name, strength_model=1.0)
    cams = g.node("Compose3D_OrbitCameras", views=4, elevation=15.0, azimuth_start=0.0, azimuth_span=360.0,
                  distance=2.5, fov=40.0)
    cond = g.node("Compose3D_MVDreamConditioning", cameras=cams.out(0),
                  conditioning=g.node("CLIPTextEncode", text="a toy", clip=mv.out(1)).out(0))
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=4)
    sampled = g.node("KSampler", model=with_lora.out(0), seed=0, steps=1, cfg=1.0, sampler_name="ddim",
                     scheduler="ddim_uniform", positive=cond.out(0), negative=cond.out(0),
                     latent_image=latent.out(0), denoise=1.0)
    g.node("PreviewAny", source=sampled.out(0))
    sd = g.node("CheckpointLoaderSimple", ckpt_name=tiny_models.sd15_2d_checkpoint)
    tuned = g.node("Compose3D_IPAdapterLoader", ipadapter_name=adapter_name)
    vision = g.node("CLIPVisionLoader", clip_name=tiny_models.clip_vision)
    photo = g.node("LoadImage", image="subject.png")
    embed = g.node("CLIPVisionEncode", clip_vision=vision.out(0), image=photo.out(0), crop="center")
    applied = g.node("Compose3D_ApplyIPAdapter", model=sd.out(0), ipadapter=tuned.out(0),
                     clip_vision_output=embed.out(0), weight=1.0)
    text = g.node("CLIPTextEncode", text="a toy", clip=sd.out(1)).out(0)
    latent_2d = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled_2d = g.node("KSampler", model=applied.out(0), seed=0, steps=1, cfg=1.0, sampler_name="ddim",
                        scheduler="ddim_uniform", positive=text, negative=text, latent_image=latent_2d.out(0),
                        denoise=1.0)
    g.node("PreviewAny", source=sampled_2d.out(0))
    again = comfy_server.run(g.finalize(), timeout=300)
    assert again.status == "success", (again.error or {}).get("exception_message")
