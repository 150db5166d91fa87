"""Write the Make-Your-3D example workflow (UI format) into example_workflows/Make-Your-3D - subject photo to 3D.json.

One subject photo -> that subject in 3D, the paper's co-evolution in ComfyUI nodes:

1. Multi-views: MVDream sd-v1.5-4view with the photo as image prompt (Load IP-Adapter + core CLIP Vision Encode ->
   Apply IP-Adapter; SD1.5 adapters fit MVDream sd-v1.5) samples 4 views on MVDream's rig.
2. Identity-aware tuning: Identity Tuner teaches SD1.5's image prompt the subject from those views.
3. Personalised outputs: the personalised SD1.5 redraws the views with the text-driven modification (img2img).
4. Subject-prior tuning: Subject-Prior Tuner trains a LoRA on MVDream's multi-view self-attention on them.
5. SDS Optimizer with the tuned MVDream and the modification prompt -> Export Mesh -> Preview3D, and a turntable.

    python scripts/make_make_your_3d_workflow.py [--no-thumbnail]

The thumbnail (scripts/make_your_3d_thumbnail.py) is made from real tuning runs on the test models.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.ui_workflow import Workflow, schema_widgets  # noqa: E402
from make_sds_workflows import LOADER_OUTPUTS, NEGATIVE, SDS_INPUTS, SDS_OUTPUTS, mesh_and_turntable, \
    sds_widgets  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
NAME = "Make-Your-3D - subject photo to 3D.json"
SUBJECT_IMAGE = "subject.png"
MV_CHECKPOINT = "sd-v1.5-4view.safetensors"
CHECKPOINT_2D = "v1-5-pruned-emaonly.safetensors"
ADAPTER = "ip-adapter_sd15.safetensors"
IMAGE_ENCODER = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
SUBJECT_PROMPT = "a photo of the subject, white background"
MODIFIED_PROMPT = "the subject wearing a red hat, white background"
MV_PROMPT = "the subject wearing a red hat, 3d asset"


def build() -> None:
    from harness.inprocess import init_comfy

    init_comfy()
    from compose3d.nodes.ip_adapter import ApplyIPAdapter
    from compose3d.nodes.make_your_3d import IdentityTuner, SubjectPriorTuner

    w = Workflow()
    # 1. the subject photo -> 4 views from MVDream with the photo as image prompt
    photo = w.node("LoadImage", (40, 80), (320, 330), [SUBJECT_IMAGE, "image"],
                   outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Subject photo")
    vision = w.node("CLIPVisionLoader", (40, 460), (320, 60), [IMAGE_ENCODER], outputs=[("CLIP_VISION", "CLIP_VISION")],
                    title="Image encoder (ViT-H, IP-Adapter SD1.5's)")
    encoded = w.node("CLIPVisionEncode", (40, 560), (320, 80), ["center"],
                     [("clip_vision", "CLIP_VISION", (vision, 0), False), ("image", "IMAGE", (photo, 0), False)],
                     [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")])
    adapter = w.node("Compose3D_IPAdapterLoader", (40, 680), (320, 60), [ADAPTER],
                     outputs=[("IPADAPTER", "C3D_IP_ADAPTER")])
    mv = w.node("Compose3D_MVDreamLoader", (40, 780), (320, 100), [MV_CHECKPOINT], outputs=LOADER_OUTPUTS,
                title="MVDream sd-v1.5-4view")
    mv_image = w.node("Compose3D_ApplyIPAdapter", (400, 80), (320, 130), schema_widgets(ApplyIPAdapter),
                      [("model", "MODEL", (mv, 0), False), ("ipadapter", "C3D_IP_ADAPTER", (adapter, 0), False),
                       ("clip_vision_output", "CLIP_VISION_OUTPUT", (encoded, 0), False)], [("MODEL", "MODEL")],
                      title="MVDream + image prompt")
    cams = w.node("Compose3D_OrbitCameras", (400, 250), (320, 200), [4, 15, 0, 360, 2.5, 40],
                  outputs=[("cameras", "C3D_CAMERAS")], title="4 views (MVDream's rig)")
    conds = []
    for i, (text, title) in enumerate(((SUBJECT_PROMPT, "Multi-view prompt"), (NEGATIVE, "Negative"))):
        enc = w.node("CLIPTextEncode", (400, 490 + 260 * i), (320, 120), [text], [("clip", "CLIP", (mv, 1), False)],
                     [("CONDITIONING", "CONDITIONING")], title=title)
        conds.append(w.node("Compose3D_MVDreamConditioning", (400, 650 + 260 * i), (320, 50), [],
                            [("conditioning", "CONDITIONING", (enc, 0), False),
                             ("cameras", "C3D_CAMERAS", (cams, 0), False)], [("conditioning", "CONDITIONING")]))
    latent = w.node("EmptyLatentImage", (760, 80), (320, 110), [256, 256, 4], outputs=[("LATENT", "LATENT")],
                    title="4 views, 256 px")
    sample = w.node("KSampler", (760, 230), (320, 270), [0, "fixed", 50, 7.5, "ddim", "ddim_uniform", 1.0],
                    [("model", "MODEL", (mv_image, 0), False), ("positive", "CONDITIONING", (conds[0], 0), False),
                     ("negative", "CONDITIONING", (conds[1], 0), False),
                     ("latent_image", "LATENT", (latent, 0), False)], [("LATENT", "LATENT")],
                    title="Subject multi-views")
    views = w.node("VAEDecode", (760, 540), (320, 50), [],
                   [("samples", "LATENT", (sample, 0), False), ("vae", "VAE", (mv, 2), False)], [("IMAGE", "IMAGE")])
    w.node("PreviewImage", (760, 630), (320, 300), [], [("images", "IMAGE", (views, 0), False)],
           title="Multi-views of the subject")

    # 2. identity-aware tuning of SD1.5's image prompt on the views
    sd = w.node("CheckpointLoaderSimple", (1120, 80), (320, 100), [CHECKPOINT_2D], outputs=LOADER_OUTPUTS,
                title="2D model (SD1.5)")
    identity = w.node("Compose3D_IdentityTuner", (1120, 230), (340, 520), schema_widgets(IdentityTuner, prompt=SUBJECT_PROMPT),
                      [("model", "MODEL", (sd, 0), False), ("ipadapter", "C3D_IP_ADAPTER", (adapter, 0), False),
                       ("clip_vision", "CLIP_VISION", (vision, 0), False), ("vae", "VAE", (sd, 2), False),
                       ("clip", "CLIP", (sd, 1), False), ("subject", "IMAGE", (photo, 0), False),
                       ("views", "IMAGE", (views, 0), False)],
                      [("MODEL", "MODEL"), ("IPADAPTER", "C3D_IP_ADAPTER"), ("adapter_file", "STRING")])

    # 3. personalised outputs: the views redrawn by the personalised model with the text-driven modification
    modified = w.node("CLIPTextEncode", (1500, 80), (320, 120), [MODIFIED_PROMPT], [("clip", "CLIP", (sd, 1), False)],
                      [("CONDITIONING", "CONDITIONING")], title="Text-driven modification")
    negative_2d = w.node("CLIPTextEncode", (1500, 240), (320, 120), [NEGATIVE], [("clip", "CLIP", (sd, 1), False)],
                         [("CONDITIONING", "CONDITIONING")], title="Negative (2D)")
    to_latent = w.node("VAEEncode", (1500, 400), (320, 50), [],
                       [("pixels", "IMAGE", (views, 0), False), ("vae", "VAE", (sd, 2), False)],
                       [("LATENT", "LATENT")])
    redraw = w.node("KSampler", (1500, 490), (320, 270), [1, "fixed", 30, 7.0, "ddim", "ddim_uniform", 0.6],
                    [("model", "MODEL", (identity, 0), False), ("positive", "CONDITIONING", (modified, 0), False),
                     ("negative", "CONDITIONING", (negative_2d, 0), False),
                     ("latent_image", "LATENT", (to_latent, 0), False)], [("LATENT", "LATENT")],
                    title="Personalised outputs (img2img)")
    outputs = w.node("VAEDecode", (1500, 800), (320, 50), [],
                     [("samples", "LATENT", (redraw, 0), False), ("vae", "VAE", (sd, 2), False)],
                     [("IMAGE", "IMAGE")])
    w.node("PreviewImage", (1500, 890), (320, 300), [], [("images", "IMAGE", (outputs, 0), False)],
           title="Personalised outputs")

    # 4. subject-prior tuning of MVDream on them, 5. SDS with the tuned MVDream -> mesh
    prior = w.node("Compose3D_SubjectPriorTuner", (1860, 80), (340, 680), schema_widgets(SubjectPriorTuner, prompt=MV_PROMPT),
                   [("model", "MODEL", (mv, 0), False), ("vae", "VAE", (mv, 2), False), ("clip", "CLIP", (mv, 1), False),
                    ("images", "IMAGE", (outputs, 0), False), ("cameras", "C3D_CAMERAS", (cams, 0), False),
                    ("normals", "IMAGE", None, False)],
                   [("MODEL", "MODEL"), ("lora_name", "STRING")])
    pos = w.node("CLIPTextEncode", (1860, 800), (320, 120), [MV_PROMPT], [("clip", "CLIP", (mv, 1), False)],
                 [("CONDITIONING", "CONDITIONING")], title="3D prompt")
    neg = w.node("CLIPTextEncode", (1860, 960), (320, 120), [NEGATIVE], [("clip", "CLIP", (mv, 1), False)],
                 [("CONDITIONING", "CONDITIONING")], title="Negative (3D)")
    sources = {"model": (prior, 0), "vae": (mv, 2), "positive": (pos, 0), "negative": (neg, 0)}
    sds = w.node("Compose3D_SDSOptimizer", (2240, 80), (360, 1150), sds_widgets(),
                 [(n, t, sources.get(n), False) for n, t in SDS_INPUTS], SDS_OUTPUTS)
    w.node("PreviewImage", (2240, 1270), (360, 320), [], [("images", "IMAGE", (sds, 1), False)], title="SDS preview")
    mesh_and_turntable(w, (sds, 0), 2640, "make_your_3d")
    w.node("Note", (40, 930), (320, 330), ["Make-Your-3D: one subject photo -> that subject in 3D. MVDream "
           "(sd-v1.5-4view) with the photo as image prompt makes 4 views; Identity Tuner teaches SD1.5's image "
           "prompt the subject from them (only the adapter's image cross-attention trains); the personalised model "
           "redraws the views with the text-driven change; Subject-Prior Tuner trains a LoRA on MVDream's multi-view "
           "self-attention on those (saved in output/loras); SDS with the tuned MVDream gives the mesh. Needs "
           "sd-v1.5-4view, v1-5-pruned-emaonly, ip-adapter_sd15 (models/ipadapter), the ViT-H image encoder "
           "(models/clip_vision) and the photo in ComfyUI's input folder as subject.png."])
    w.save(FOLDER, NAME)


if __name__ == "__main__":
    build()
    if "--no-thumbnail" not in sys.argv:
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "make_your_3d_thumbnail.py")],
                       check=True)
