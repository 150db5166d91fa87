"""Write the two mixed-score example workflows (UI format) and their thumbnails into example_workflows/.

- Mixed-score 4 views.json: MVDream (sd-v2.1-base-4view) and a 2D model (SD2.1-base, which shares its
  text encoder family) -> Lambda Schedule (lambda 0.3 at t = 1000 rising to 0.9 at t = 0) -> Mixed-Score Guider
  -> core SamplerCustomAdvanced (DDIM, 50 steps) -> 4 views, and View Consistency Score on them.
- Text to 3D - mixed score without distillation.json: the distillation-free text-to-3D path: Mixed-Score DDIM Sampler (one
  node) -> 4 views -> NeRF From Views -> Export Mesh -> Preview3D, and a turntable.

Thumbnails are real outputs made here without model weights: the Lambda Schedule node's own curve next to views
sampled by the mixed-score guider from two "perfect" models (the toy object's exact denoiser as the multi-view
model, the same with its azimuth mirrored as the 2D model: each alone is sharp, the mixture shows how lambda
moves between them), and for the 3D path a turntable of a NeRF fitted to those views.

    python scripts/make_mixed_workflows.py [--no-thumbnail]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.ui_workflow import Workflow, schema_widgets  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
MV_PROMPT = "a DSLR photo of a corgi wearing a red hat, 3d asset"
PROMPT_2D = "a DSLR photo of a corgi wearing a red hat, white background, highly detailed fur"
NEGATIVE = "ugly, blurry, pixelated obscure, unnatural colors, poor lighting, dull, unclear"
MV_CHECKPOINT = "sd-v2.1-base-4view.safetensors"
CHECKPOINT_2D = "v2-1_512-ema-pruned.safetensors"
LOADER_OUTPUTS = [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]
GUIDER_INPUTS = [("mv_model", "MODEL"), ("model_2d", "MODEL"), ("mv_positive", "CONDITIONING"),
                 ("mv_negative", "CONDITIONING"), ("positive_2d", "CONDITIONING"), ("negative_2d", "CONDITIONING"),
                 ("lambda_schedule", "C3D_LAMBDA_SCHEDULE")]


def _nodes():
    from harness.inprocess import init_comfy

    init_comfy()
    from compose3d.nodes import mixed_score
    from compose3d.nodes.view_consistency import ViewConsistencyScore

    return mixed_score, ViewConsistencyScore


def models_and_prompts(w: Workflow) -> dict:
    """Both loaders, the four conditionings (the multi-view ones with 4 orbit cameras) and the lambda schedule."""
    mixed_score, _ = _nodes()
    mv = w.node("Compose3D_MVDreamLoader", (40, 80), (320, 100), [MV_CHECKPOINT], outputs=LOADER_OUTPUTS,
                title="Multi-view model (MVDream)")
    two = w.node("CheckpointLoaderSimple", (40, 230), (320, 100), [CHECKPOINT_2D], outputs=LOADER_OUTPUTS,
                 title="2D model (SD2.1-base)")
    cams = w.node("Compose3D_OrbitCameras", (40, 380), (320, 200), [4, 15, 0, 360, 2.5, 40],
                  outputs=[("cameras", "C3D_CAMERAS")], title="4 views (MVDream's rig)")
    conds = {}
    y = 80
    for key, loader, text in (("mv_positive", mv, MV_PROMPT), ("mv_negative", mv, NEGATIVE),
                              ("positive_2d", two, PROMPT_2D), ("negative_2d", two, NEGATIVE)):
        title = key.replace("_", " ").replace("mv ", "multi-view ").replace(" 2d", " (2D)")
        encoded = w.node("CLIPTextEncode", (400, y), (320, 120), [text], [("clip", "CLIP", (loader, 1), False)],
                         [("CONDITIONING", "CONDITIONING")], title=title.capitalize())
        if key.startswith("mv_"):
            encoded = w.node("Compose3D_MVDreamConditioning", (400, y + 150), (320, 50), [],
                             [("conditioning", "CONDITIONING", (encoded, 0), False),
                              ("cameras", "C3D_CAMERAS", (cams, 0), False)], [("conditioning", "CONDITIONING")])
            y += 80
        conds[key] = (encoded, 0)
        y += 160
    schedule = w.node("Compose3D_LambdaSchedule", (40, 630), (320, 160),
                      schema_widgets(mixed_score.LambdaScheduleNode),
                      outputs=[("lambda_schedule", "C3D_LAMBDA_SCHEDULE"), ("preview", "IMAGE")])
    w.node("PreviewImage", (40, 830), (320, 240), [], [("images", "IMAGE", (schedule, 1), False)],
           title="lambda(t)")
    return {"mv_model": (mv, 0), "model_2d": (two, 0), "vae": (mv, 2), "cameras": (cams, 0),
            "lambda_schedule": (schedule, 0), **conds}


def views_4() -> None:
    mixed_score, consistency = _nodes()
    w = Workflow()
    src = models_and_prompts(w)
    guider = w.node("Compose3D_MixedScoreGuider", (760, 80), (320, 300),
                    schema_widgets(mixed_score.MixedScoreGuiderNode),
                    [(n, t, src[n], False) for n, t in GUIDER_INPUTS], [("GUIDER", "GUIDER")])
    noise = w.node("RandomNoise", (760, 420), (320, 90), [0, "fixed"], outputs=[("NOISE", "NOISE")])
    select = w.node("KSamplerSelect", (760, 550), (320, 60), ["ddim"], outputs=[("SAMPLER", "SAMPLER")])
    sched = w.node("BasicScheduler", (760, 650), (320, 110), ["ddim_uniform", 50, 1.0],
                   [("model", "MODEL", src["mv_model"], False)], [("SIGMAS", "SIGMAS")])
    latent = w.node("EmptyLatentImage", (760, 800), (320, 110), [256, 256, 4], outputs=[("LATENT", "LATENT")],
                    title="4 views, 256 px")
    sample = w.node("SamplerCustomAdvanced", (1120, 80), (300, 330), [],
                    [("noise", "NOISE", (noise, 0), False), ("guider", "GUIDER", (guider, 0), False),
                     ("sampler", "SAMPLER", (select, 0), False), ("sigmas", "SIGMAS", (sched, 0), False),
                     ("latent_image", "LATENT", (latent, 0), False)],
                    [("output", "LATENT"), ("denoised_output", "LATENT")])
    decode = w.node("VAEDecode", (1120, 450), (300, 50), [],
                    [("samples", "LATENT", (sample, 0), False), ("vae", "VAE", src["vae"], False)],
                    [("IMAGE", "IMAGE")])
    w.node("SaveImage", (1120, 540), (420, 300), ["compose3d/mixed_score"], [("images", "IMAGE", (decode, 0), False)])
    score = w.node("Compose3D_ViewConsistency", (1580, 80), (320, 300), schema_widgets(consistency),
                   [("images", "IMAGE", (decode, 0), False), ("cameras", "C3D_CAMERAS", src["cameras"], False),
                    ("masks", "MASK", None, False)],
                   [("score", "FLOAT"), ("per_view", "STRING"), ("error_images", "IMAGE")])
    w.node("PreviewAny", (1580, 420), (320, 200), [], [("source", "*", (score, 1), False)],
           title="Per-view error")
    w.node("PreviewImage", (1580, 660), (420, 300), [], [("images", "IMAGE", (score, 2), False)],
           title="view | NeRF render | error")
    w.node("Note", (40, 1110), (320, 300), ["Mixed-score sampling (distillation-free multi-view): at every step "
           "MVDream and a 2D model denoise the same 4 views, eps = lambda(t) eps_mv + (1 - lambda(t)) eps_2d. "
           "MVDream keeps the views consistent, the 2D model brings texture; lambda starts small at high noise and "
           "rises as t falls. View Consistency Score fits a NeRF to the views and reports how well one 3D object "
           "explains them (lower is more consistent): compare lambda schedules by it. Needs sd-v2.1-base-4view and "
           "v2-1_512-ema-pruned (SD2.1-base) in models/checkpoints."])
    w.save(FOLDER, "Mixed-score 4 views.json")


def text_to_3d() -> None:
    mixed_score, _ = _nodes()
    from make_sds_workflows import mesh_and_turntable
    from compose3d.nodes.nerf import NeRFFromViews

    w = Workflow()
    src = models_and_prompts(w)
    latent = w.node("EmptyLatentImage", (760, 80), (320, 110), [256, 256, 4], outputs=[("LATENT", "LATENT")],
                    title="4 views, 256 px")
    sampler = w.node("Compose3D_MixedScoreSampler", (760, 230), (320, 380),
                     schema_widgets(mixed_score.MixedScoreSampler),
                     [(n, t, src[n], False) for n, t in GUIDER_INPUTS] + [("latent_image", "LATENT", (latent, 0),
                                                                          False)],
                     [("LATENT", "LATENT")])
    decode = w.node("VAEDecode", (760, 650), (320, 50), [],
                    [("samples", "LATENT", (sampler, 0), False), ("vae", "VAE", src["vae"], False)],
                    [("IMAGE", "IMAGE")])
    w.node("PreviewImage", (760, 740), (320, 300), [], [("images", "IMAGE", (decode, 0), False)], title="4 views")
    nerf = w.node("Compose3D_NeRFFromViews", (1120, 80), (320, 330), schema_widgets(NeRFFromViews),
                  [("images", "IMAGE", (decode, 0), False), ("cameras", "C3D_CAMERAS", src["cameras"], False),
                   ("masks", "MASK", None, False), ("nerf", "C3D_NERF", None, False)], [("nerf", "C3D_NERF")])
    mesh_and_turntable(w, (nerf, 0), 1480, "mixed_score_3d")
    w.node("Note", (40, 1110), (320, 280), ["Text to 3D without distillation: the Mixed-Score DDIM Sampler makes 4 "
           "consistent, detailed views in one sampling run (MVDream for consistency, the 2D model for texture), and "
           "NeRF From Views reconstructs them with the same cameras; the NeRF is exported as a textured .glb "
           "(Preview3D) and a turntable. Minutes instead of an SDS run. Needs sd-v2.1-base-4view and "
           "v2-1_512-ema-pruned (SD2.1-base) in models/checkpoints."])
    w.save(FOLDER, "Text to 3D - mixed score without distillation.json")


if __name__ == "__main__":
    views_4()
    text_to_3d()
    if "--no-thumbnail" not in sys.argv:
        from mixed_score_thumbnails import make_thumbnails

        make_thumbnails(FOLDER)
