"""Write the three SDS example workflows (UI format) into example_workflows/.

- Text to 3D - SDS.json: MVDream loader -> prompts -> SDS Optimizer -> Export Mesh -> Preview3D, and a
  turntable (Orbit Cameras -> Render NeRF -> animated WEBP).
- Text to 3D - Grounded-Dreamer.json: the refocus template's 4 views (compositional prompt, refocused DDIM) -> SDS
  Optimizer with those views and their cameras as references (Grounded-Dreamer's hybrid) -> mesh -> Preview3D.
- Text to 3D - DreamBeast parts.json: DreamBeast's whole pipeline: plain SDS to step 1000 of 7000 -> 80 views of that NeRF
  (SDS Cameras) -> SD3 Attention Capture -> Part-Affinity NeRF -> SDS from step 1000 with part modulation from
  3020 -> mesh -> Preview3D and a turntable; its thumbnail is the modulated run's progress preview (render | parts)
  on the test object.

The SDS Optimizer's widget values are its schema's defaults (MVDream's settings) with fixed seeds.

    python scripts/make_sds_workflows.py [--no-thumbnail]   (the DreamBeast thumbnail trains for ~4 min on a CPU)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.ui_workflow import Workflow, schema_widgets  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
PROMPT = "a DSLR photo of a corgi wearing a red hat, 3d asset"
NEGATIVE = "ugly, blurry, pixelated obscure, unnatural colors, poor lighting, dull, unclear"


def sds_widgets(**changes) -> list:
    """The SDS Optimizer's widget values in schema order: defaults, with changes, and 'fixed' after the seed."""
    from harness.inprocess import init_comfy

    init_comfy()
    from compose3d.nodes.sds import SDSOptimizer

    return schema_widgets(SDSOptimizer, **changes)


SDS_INPUTS = [("model", "MODEL"), ("vae", "VAE"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
              ("nerf", "C3D_NERF"), ("reference_images", "IMAGE"), ("reference_cameras", "C3D_CAMERAS"),
              ("reference_masks", "MASK"), ("part_field", "C3D_PART_FIELD"), ("clip", "CLIP")]
SDS_OUTPUTS = [("nerf", "C3D_NERF"), ("previews", "IMAGE"), ("report", "STRING")]
LOADER_OUTPUTS = [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]


def mesh_and_turntable(w: Workflow, nerf, x: int, prefix: str) -> None:
    mesh = w.node("Compose3D_ExportMesh", (x, 40), (320, 300),
                  [f"compose3d/{prefix}", "glb", 192, 10.0, 1, 100000, "texture", 1024],
                  [("nerf", "C3D_NERF", nerf, False)], [("path", "STRING"), ("mesh", "MESH")])
    w.node("Preview3D", (x + 360, 40), (420, 420), [""], [("model_file", "STRING", (mesh, 0), True)])
    ring = w.node("Compose3D_OrbitCameras", (x, 400), (300, 200), [24, 15, 0, 360, 2.5, 40],
                  outputs=[("cameras", "C3D_CAMERAS")])
    render = w.node("Compose3D_RenderNeRF", (x, 650), (300, 170), [256, 256, 0],
                    [("nerf", "C3D_NERF", nerf, False), ("cameras", "C3D_CAMERAS", (ring, 0), False)],
                    [("rgb", "IMAGE"), ("normal", "IMAGE"), ("opacity", "MASK"), ("depth", "IMAGE")])
    w.node("SaveAnimatedWEBP", (x + 360, 520), (420, 420), [f"compose3d/{prefix}_turntable", 12.0, False, 85,
                                                             "default"], [("images", "IMAGE", (render, 0), False)])


def text_to_3d() -> None:
    w = Workflow()
    loader = w.node("Compose3D_MVDreamLoader", (40, 80), (320, 100), ["sd-v2.1-base-4view.safetensors"],
                    outputs=LOADER_OUTPUTS)
    pos = w.node("CLIPTextEncode", (40, 230), (320, 130), [PROMPT], [("clip", "CLIP", (loader, 1), False)],
                 [("CONDITIONING", "CONDITIONING")], title="Positive")
    neg = w.node("CLIPTextEncode", (40, 400), (320, 130), [NEGATIVE], [("clip", "CLIP", (loader, 1), False)],
                 [("CONDITIONING", "CONDITIONING")], title="Negative")
    sources = {"model": (loader, 0), "vae": (loader, 2), "positive": (pos, 0), "negative": (neg, 0)}
    sds = w.node("Compose3D_SDSOptimizer", (400, 80), (360, 1150), sds_widgets(),
                 [(n, t, sources.get(n), False) for n, t in SDS_INPUTS], SDS_OUTPUTS)
    w.node("PreviewImage", (40, 580), (320, 320), [], [("images", "IMAGE", (sds, 1), False)])
    mesh_and_turntable(w, (sds, 0), 800, "sds")
    w.node("Note", (40, 950), (320, 260), ["Text to 3D with MVDream's multi-view score distillation. The SDS "
           "Optimizer's defaults are MVDream's (10,000 steps, guidance 50, 64 px x 8 views then 256 px x 4); "
           "its preview updates during the run and Cancel keeps a checkpoint (compose3d/sds_<step>.safetensors "
           "in the output folder) that 'resume_from' continues. The result is exported as a textured .glb "
           "(Preview3D) and a turntable. Needs sd-v2.1-base-4view in models/checkpoints and a GPU."])
    w.save(FOLDER, "Text to 3D - SDS.json")


def grounded_dreamer() -> None:
    w = Workflow()
    prompt = "a corgi wearing a red hat sitting next to a blue teapot, 3d asset"
    loader = w.node("Compose3D_MVDreamLoader", (40, 80), (320, 100), ["sd-v2.1-base-4view.safetensors"],
                    outputs=LOADER_OUTPUTS)
    text = w.node("PrimitiveStringMultiline", (40, 230), (320, 120), [prompt], outputs=[("STRING", "STRING")],
                  title="Prompt (shared)")
    pos = w.node("CLIPTextEncode", (400, 80), (300, 100), [prompt],
                 [("clip", "CLIP", (loader, 1), False), ("text", "STRING", (text, 0), True)],
                 [("CONDITIONING", "CONDITIONING")], title="Positive")
    neg = w.node("CLIPTextEncode", (400, 220), (300, 130), [NEGATIVE], [("clip", "CLIP", (loader, 1), False)],
                 [("CONDITIONING", "CONDITIONING")], title="Negative")
    cams = w.node("Compose3D_OrbitCameras", (40, 400), (320, 200), [4, 15, 0, 360, 2.5, 40],
                  outputs=[("cameras", "C3D_CAMERAS")])
    cpos = w.node("Compose3D_MVDreamConditioning", (400, 400), (300, 50), [],
                  [("conditioning", "CONDITIONING", (pos, 0), False), ("cameras", "C3D_CAMERAS", (cams, 0), False)],
                  [("conditioning", "CONDITIONING")])
    cneg = w.node("Compose3D_MVDreamConditioning", (400, 490), (300, 50), [],
                  [("conditioning", "CONDITIONING", (neg, 0), False), ("cameras", "C3D_CAMERAS", (cams, 0), False)],
                  [("conditioning", "CONDITIONING")])
    latent = w.node("EmptyLatentImage", (40, 650), (320, 110), [256, 256, 4], outputs=[("LATENT", "LATENT")])
    sched = w.node("BasicScheduler", (40, 800), (320, 110), ["ddim_uniform", 50, 1.0],
                   [("model", "MODEL", (loader, 0), False)], [("SIGMAS", "SIGMAS")])
    sampler = w.node("Compose3D_RefocusSampler", (400, 580), (320, 300),
                     [prompt, "corgi, hat, teapot", "ddim", 25, 20.0, "0: 0.05, 10: 0.5, 20: 0.8", 20, 0.5],
                     [("clip", "CLIP", (loader, 1), False), ("prompt", "STRING", (text, 0), True)],
                     [("SAMPLER", "SAMPLER")])
    custom = w.node("SamplerCustom", (760, 80), (300, 420), [True, 0, "fixed", 7.5],
                    [("model", "MODEL", (loader, 0), False), ("positive", "CONDITIONING", (cpos, 0), False),
                     ("negative", "CONDITIONING", (cneg, 0), False), ("sampler", "SAMPLER", (sampler, 0), False),
                     ("sigmas", "SIGMAS", (sched, 0), False), ("latent_image", "LATENT", (latent, 0), False)],
                    [("output", "LATENT"), ("denoised_output", "LATENT")])
    decode = w.node("VAEDecode", (760, 540), (300, 50), [],
                    [("samples", "LATENT", (custom, 0), False), ("vae", "VAE", (loader, 2), False)],
                    [("IMAGE", "IMAGE")])
    w.node("PreviewImage", (760, 630), (300, 300), [], [("images", "IMAGE", (decode, 0), False)])
    sources = {"model": (loader, 0), "vae": (loader, 2), "positive": (pos, 0), "negative": (neg, 0),
               "reference_images": (decode, 0), "reference_cameras": (cams, 0)}
    sds = w.node("Compose3D_SDSOptimizer", (1100, 80), (360, 1250),
                 sds_widgets(background="white", checkpoint_prefix="compose3d/grounded_dreamer"),
                 [(n, t, sources.get(n), False) for n, t in SDS_INPUTS], SDS_OUTPUTS)
    w.node("PreviewImage", (760, 980), (300, 300), [], [("images", "IMAGE", (sds, 1), False)])
    mesh_and_turntable(w, (sds, 0), 1500, "grounded_dreamer")
    w.node("Note", (40, 950), (320, 300), ["Grounded-Dreamer: the Refocus Sampler makes 4 views in which every "
           "subject ('corgi, hat, teapot') shows up; the SDS Optimizer first fits them (reference views with the "
           "Orbit Cameras that made them), then lets MVDream's SDS refine from a lower noise level (warm start, "
           "t at most 0.5) while the reference weight decays from 1000 to 100, so the composition is kept. "
           "Needs sd-v2.1-base-4view in models/checkpoints and a GPU."])
    w.save(FOLDER, "Text to 3D - Grounded-Dreamer.json")


DREAMBEAST_PROMPT = "a creature with an eagle head, a lion body and bat wings, 3d asset"
DREAMBEAST_PARTS = "eagle head, lion body, bat wings"
SD3_CHECKPOINT = "sd3_medium_incl_clips.safetensors"


def dreambeast() -> None:
    """DreamBeast as one graph: plain SDS to step 1000 of 7000 -> 80 views of that NeRF (20 SDS camera groups)
    -> SD3 Attention Capture -> Part-Affinity NeRF -> SDS from step 1000 with part modulation from 3020 -> mesh."""
    from harness.inprocess import init_comfy

    init_comfy()
    from compose3d.nodes.part_field import PartAffinityNeRF
    from compose3d.nodes.sd3_capture import SD3AttentionCapture

    w = Workflow()
    loader = w.node("Compose3D_MVDreamLoader", (40, 80), (320, 100), ["sd-v2.1-base-4view.safetensors"],
                    outputs=LOADER_OUTPUTS)
    text = w.node("PrimitiveStringMultiline", (40, 230), (320, 120), [DREAMBEAST_PROMPT],
                  outputs=[("STRING", "STRING")], title="Prompt (shared)")
    parts = w.node("PrimitiveString", (40, 400), (320, 60), [DREAMBEAST_PARTS], outputs=[("STRING", "STRING")],
                   title="Part phrases (shared)")
    pos = w.node("CLIPTextEncode", (40, 510), (320, 100), [DREAMBEAST_PROMPT],
                 [("clip", "CLIP", (loader, 1), False), ("text", "STRING", (text, 0), True)],
                 [("CONDITIONING", "CONDITIONING")], title="Positive")
    neg = w.node("CLIPTextEncode", (40, 660), (320, 130), [NEGATIVE], [("clip", "CLIP", (loader, 1), False)],
                 [("CONDITIONING", "CONDITIONING")], title="Negative")
    sources = {"model": (loader, 0), "vae": (loader, 2), "positive": (pos, 0), "negative": (neg, 0)}
    plain = w.node("Compose3D_SDSOptimizer", (400, 80), (360, 1500),
                   sds_widgets(steps=7000, end_at_step=1000, checkpoint_prefix="compose3d/dreambeast_plain"),
                   [(n, t, sources.get(n), False) for n, t in SDS_INPUTS], SDS_OUTPUTS,
                   title="SDS: plain, steps 0-1000 of 7000")
    cams = w.node("Compose3D_SDSCameras", (800, 80), (320, 300), [20, 4, 0.0, 30.0, 15.0, 60.0, 0.8, 1.0, 0,
                                                                  "fixed"],
                  outputs=[("cameras", "C3D_CAMERAS")], title="80 views (20 SDS steps x 4)")
    views = w.node("Compose3D_RenderNeRF", (800, 430), (320, 170), [512, 512, 0],
                   [("nerf", "C3D_NERF", (plain, 0), False), ("cameras", "C3D_CAMERAS", (cams, 0), False)],
                   [("rgb", "IMAGE"), ("normal", "IMAGE"), ("opacity", "MASK"), ("depth", "IMAGE")])
    w.node("PreviewImage", (800, 650), (320, 320), [], [("images", "IMAGE", (views, 0), False)],
           title="Views of the plain NeRF")
    sd3 = w.node("CheckpointLoaderSimple", (1160, 80), (320, 100), [SD3_CHECKPOINT],
                 outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], title="SD3 (part knowledge)")
    capture = w.node("Compose3D_SD3AttentionCapture", (1160, 230), (340, 640),
                     schema_widgets(SD3AttentionCapture, prompt=DREAMBEAST_PROMPT, parts=DREAMBEAST_PARTS),
                     [("model", "MODEL", (sd3, 0), False), ("clip", "CLIP", (sd3, 1), False),
                      ("vae", "VAE", (sd3, 2), False), ("views", "IMAGE", (views, 0), False),
                      ("cameras", "C3D_CAMERAS", (cams, 0), False), ("prompt", "STRING", (text, 0), True),
                      ("parts", "STRING", (parts, 0), True)],
                     [("part_maps", "C3D_PART_MAPS"), ("preview", "IMAGE")])
    # the capture shows its heat maps (with the parts' legend) on itself, in the room left below it
    field = w.node("Compose3D_PartAffinityNeRF", (1540, 80), (320, 500), schema_widgets(PartAffinityNeRF,
                                                                                        steps=2000),
                   [("part_maps", "C3D_PART_MAPS", (capture, 0), False), ("nerf", "C3D_NERF", (plain, 0), False)],
                   [("part_field", "C3D_PART_FIELD")])
    sources = {**sources, "nerf": (plain, 0), "part_field": (field, 0), "clip": (loader, 1)}
    modulated = w.node("Compose3D_SDSOptimizer", (1900, 80), (360, 1500),
                       sds_widgets(steps=7000, start_at_step=1000, prompt=DREAMBEAST_PROMPT, parts=DREAMBEAST_PARTS,
                                   checkpoint_prefix="compose3d/dreambeast"),
                       [(n, t, sources.get(n), False) for n, t in SDS_INPUTS]
                       + [("prompt", "STRING", (text, 0), True), ("parts", "STRING", (parts, 0), True)],
                       SDS_OUTPUTS, title="SDS: part-modulated, steps 1000-7000")
    w.node("PreviewImage", (1540, 640), (320, 320), [], [("images", "IMAGE", (modulated, 1), False)],
           title="Result")
    mesh_and_turntable(w, (modulated, 0), 2300, "dreambeast")
    w.node("Note", (40, 840), (320, 420), ["DreamBeast: plain MVDream SDS to step 1000 of 7000, then the NeRF is "
           "rendered from 80 SDS cameras; SD3 reads each view with the prompt and its attention to the part phrases "
           "becomes part maps (block 11, t 100-450); a Part-Affinity NeRF learns the parts on the NeRF's geometry; "
           "SDS continues from step 1000 with MVDream's attention modulated by part maps rendered at each step's "
           "cameras (cross 0.6, self 1.2, from step 3020). Its preview shows the parts next to the render. Needs "
           "sd-v2.1-base-4view and sd3_medium_incl_clips in models/checkpoints, and a GPU."])
    w.save(FOLDER, "Text to 3D - DreamBeast parts.json")


def dreambeast_thumbnail() -> None:
    """What the modulated SDS node's progress preview shows (its own preview functions), on the test object: the
    NeRF's render next to its part field (trained on the object's exact part maps), from two views."""
    import torch

    from make_part_workflows import toy_part_field

    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.common import to_pil
    from compose3d.nodes.nerf import preview_render
    from compose3d.nodes.sds import part_preview

    nerf, field = toy_part_field()
    cameras = orbit_cameras(2, 25.0, 40.0, azimuth_span=180.0, distance=2.5)
    rows = [torch.cat([preview_render(nerf, cameras[i], 192), part_preview(field, cameras[i], 192)], dim=1)
            for i in range(2)]
    to_pil(torch.cat(rows, dim=0)).save(FOLDER / "Text to 3D - DreamBeast parts.jpg", quality=90)


if __name__ == "__main__":
    text_to_3d()
    grounded_dreamer()
    dreambeast()
    if "--no-thumbnail" not in sys.argv:
        dreambeast_thumbnail()
