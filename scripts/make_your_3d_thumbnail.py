"""The Make-Your-3D template's thumbnail, from real runs of the pack's tuners.

No real weights are available here, so the thumbnail shows what the tuners do on the test models (random-weight
SD1.5-shaped UNets loaded through the real loaders) with a planted subject, the test object's 4 views: the
subject, and the training loss of Identity Tuner and Subject-Prior Tuner (30 steps each), with the denoising error
on the subject's views before and after tuning (the planted-subject check of tests/test_make_your_3d.py).

    python scripts/make_your_3d_thumbnail.py     (about 2 minutes on a CPU)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "example_workflows" / "Make-Your-3D - subject photo to 3D.jpg"
STEPS = 30
LEVELS = (150, 400, 650, 900)


def main() -> None:
    from harness.inprocess import init_comfy, predict_x0, run_node, use_folders
    from harness.tiny_models import build_tiny_models

    init_comfy()
    base = Path(tempfile.mkdtemp(prefix="c3d_my3d_thumb_"))
    tm = build_tiny_models(base / "models")
    use_folders(tm.root, base / "output", base / "temp", base / "input")

    import nodes as core

    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.ip_adapter import ApplyIPAdapter, IPAdapterLoader
    from compose3d.nodes.make_your_3d import IdentityTuner, SubjectPriorTuner
    from compose3d.nodes.mvdream import MVDreamLoader
    from compose3d.nodes.toy_object import ToyObjectViews
    from compose3d.nodes.types import CAMERA_KEY, TUNING_REPORT_KEY

    cameras = orbit_cameras(4, elevation=15.0, distance=2.5)
    views = run_node(ToyObjectViews, cameras=cameras, width=64, height=64, background="white").result[0]
    with torch.inference_mode():
        sd, clip, vae = core.CheckpointLoaderSimple().load_checkpoint(tm.sd15_2d_checkpoint)[:3]
        vision = core.CLIPVisionLoader().load_clip(tm.clip_vision)[0]
        embeds = core.CLIPVisionEncode().encode(vision, views[:1], "center")[0]
    adapter = run_node(IPAdapterLoader, ipadapter_name=tm.ip_adapter).result[0]
    mv, mv_clip, mv_vae = run_node(MVDreamLoader, ckpt_name=tm.mvdream_sd15_checkpoint).result

    def error(model, x0, context, extra=None):
        g = torch.Generator().manual_seed(5)
        x0 = x0.repeat(len(LEVELS), 1, 1, 1)
        sigmas = model.model.model_sampling.sigma(torch.tensor(LEVELS).repeat_interleave(4).float())
        x = x0 + torch.randn(x0.shape, generator=g) * sigmas.view(-1, 1, 1, 1)
        return float(((predict_x0(model, x, sigmas, context, extra) - x0) ** 2).mean())

    def text(c, t):
        with torch.inference_mode():
            return c.encode_from_tokens_scheduled(c.tokenize(t))[0][0]

    reports = []
    hooked = sd.clone()
    hooked.model_options[TUNING_REPORT_KEY] = reports.append
    personalised = run_node(IdentityTuner, model=hooked, ipadapter=adapter, clip_vision=vision, vae=vae, clip=clip,
                            subject=views[:1], views=views, prompt="a toy",
                            view_prompts="front view\nside view\nback view\nside view", steps=STEPS,
                            learning_rate=3e-3, batch_size=4, augmentations=2, weight=1.0, seed=1,
                            filename_prefix="thumb").result[0]
    untuned = run_node(ApplyIPAdapter, model=sd, ipadapter=adapter, clip_vision_output=embeds, weight=1.0).result[0]
    with torch.inference_mode():
        x0 = sd.model.process_latent_in(vae.encode(views)).float()
    context = torch.cat([text(clip, f"a toy, {d}") for d in ("front view", "side view", "back view", "side view")]
                        * len(LEVELS))
    identity_errors = (error(untuned, x0, context), error(personalised, x0, context))

    hooked = mv.clone()
    hooked.model_options[TUNING_REPORT_KEY] = reports.append
    tuned = run_node(SubjectPriorTuner, model=hooked, vae=mv_vae, clip=mv_clip, images=views, cameras=cameras,
                     prompt="a toy", steps=STEPS, learning_rate=3e-3, rank=8, alpha=8.0, views_per_step=4,
                     normal_weight=0.5, seed=2, filename_prefix="thumb").result[0]
    with torch.inference_mode():
        mv_x0 = mv.model.process_latent_in(mv_vae.encode(views)).float()
    extra = {CAMERA_KEY: cameras.mvdream.float()}
    prior_errors = (error(mv, mv_x0, text(mv_clip, "a toy"), extra),
                    error(tuned, mv_x0, text(mv_clip, "a toy"), extra))
    compose(views, reports[0].losses, reports[1].losses, identity_errors, prior_errors)


def compose(views, identity_losses, prior_losses, identity_errors, prior_errors) -> None:
    from compose3d.nodes.common import to_pil

    width, height = 640, 256
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), "Make-Your-3D: subject photo -> views -> identity tuning -> subject-prior LoRA -> SDS -> mesh",
              fill="black")
    canvas.paste(to_pil(views[0]).resize((112, 112)), (8, 28))
    draw.text((8, 142), "subject", fill="black")
    for i in range(4):
        canvas.paste(to_pil(views[i]).resize((56, 56)), (128 + 58 * (i % 2), 28 + 58 * (i // 2)))
    draw.text((128, 142), "its 4 views", fill="black")
    plot(draw, identity_losses, (260, 28, 620, 120), "Identity Tuner loss (image cross-attention only)",
         (40, 110, 200))
    plot(draw, prior_losses, (260, 140, 620, 232), "Subject-Prior Tuner loss (multi-view self-attn LoRA)",
         (200, 80, 40))
    draw.text((8, 170), "denoising error on the", fill="black")
    draw.text((8, 184), "subject's views, before -> after:", fill="black")
    draw.text((8, 202), f"2D  {identity_errors[0]:.1f} -> {identity_errors[1]:.1f}", fill=(40, 110, 200))
    draw.text((8, 218), f"MV  {prior_errors[0]:.1f} -> {prior_errors[1]:.1f}", fill=(200, 80, 40))
    draw.text((8, 238), "(test models with random weights)", fill=(110, 110, 110))
    canvas.save(OUT, quality=90)
    print(f"wrote {OUT}: identity {identity_errors}, subject prior {prior_errors}")


def plot(draw: ImageDraw.ImageDraw, values, box, title: str, color) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(180, 180, 180))
    draw.text((x0 + 4, y0 + 2), title, fill="black")
    top, bottom = y0 + 16, y1 - 4
    high, low = max(values), min(values)
    span = max(high - low, 1e-6)
    points = [(x0 + 4 + (x1 - x0 - 8) * i / max(len(values) - 1, 1), bottom - (bottom - top) * (v - low) / span)
              for i, v in enumerate(values)]
    draw.line(points, fill=color, width=2)
    draw.text((x1 - 160, y1 + 2), f"step 1: {values[0]:.2f}   step {len(values)}: {values[-1]:.2f}", fill=color)


if __name__ == "__main__":
    main()
