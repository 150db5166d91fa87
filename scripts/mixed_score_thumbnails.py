"""Thumbnails of the mixed-score example workflows, made from real outputs without model weights.

Two "perfect" models stand in for MVDream and the 2D model: the exact denoiser of the pack's toy object
(``harness.perfect_prior``: it knows one object and predicts its noise exactly from every camera) as the
multi-view model, and the same object with a striped texture as the 2D model. The guider, the schedule node, the
DDIM sampler and NeRF From Views are the pack's own, as in the workflows.

- Mixed-score 4 views.jpg: the Lambda Schedule node's curve, and the 4 views sampled with lambda 1
  (multi-view only), with the template's schedule, and with lambda 0 (2D only).
- Text to 3D - mixed score without distillation.jpg: the mixed views, and a NeRF fitted to them by NeRF From Views rendered
  from 4 new directions.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch


def _striped(points: torch.Tensor, plain) -> torch.Tensor:
    """The 2D model's texture: the toy's colours with bold horizontal stripes."""
    bands = (torch.sin(points[:, 1] * 28.0) > 0).float()[:, None]
    return plain(points) * (0.35 + 0.65 * bands) + torch.tensor([0.0, 0.25, 0.45]) * (1 - bands)


@contextlib.contextmanager
def _texture(fn):
    import compose3d.kernels.toy_object as toy

    plain = toy.surface_color
    toy.surface_color = lambda p: fn(p, plain).clamp(0, 1)
    try:
        yield
    finally:
        toy.surface_color = plain


def _models(folder: Path):
    from harness.perfect_prior import PerfectPriorUNet, load_perfect_prior, write_perfect_prior_checkpoint

    path = write_perfect_prior_checkpoint(folder / "checkpoints" / "perfect.safetensors")
    mv, vae = load_perfect_prior(path, distance=2.5, fov_deg=40.0)
    two, _ = load_perfect_prior(path, distance=2.5, fov_deg=40.0)

    class StripedPrior(PerfectPriorUNet):
        def target_latents(self, camera, height, width):
            with _texture(_striped):
                return super().target_latents(camera, height, width)

    base = two.model
    base.diffusion_model = StripedPrior(base, vae, 2.5, 40.0)
    return mv, two, vae


def _sample(mv, two, vae, schedule, cameras, size: int, steps: int = 30) -> torch.Tensor:
    from compose3d.nodes.mixed_score import MixedScoreSampler
    from compose3d.nodes.mvdream import MVDreamConditioning
    from harness.inprocess import run_node

    context = [[torch.zeros(1, 77, 64), {}]]
    cond = run_node(MVDreamConditioning, conditioning=context, cameras=cameras).result[0]
    latent = {"samples": torch.zeros(len(cameras), 4, size // 8, size // 8)}
    (out,) = run_node(MixedScoreSampler, mv_model=mv, model_2d=two, mv_positive=cond, mv_negative=cond,
                      positive_2d=cond, negative_2d=cond, lambda_schedule=schedule, cfg_mv=1.0, cfg_2d=1.0,
                      consistency=0.0, latent_image=latent, seed=0, steps=steps).result
    with torch.inference_mode():
        return vae.decode(out["samples"]).clamp(0, 1)  # (V, H, W, 3)


def _row(images: torch.Tensor) -> torch.Tensor:
    return torch.cat(list(images), dim=1)


def make_thumbnails(folder: Path) -> None:
    from harness.inprocess import init_comfy, run_node, use_folders

    init_comfy()
    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.kernels.score_mixing import LambdaSchedule
    from compose3d.nodes.common import to_pil
    from compose3d.nodes.mixed_score import DEFAULT_END, DEFAULT_START, LambdaScheduleNode
    from compose3d.nodes.nerf import NeRFFromViews, RenderNeRF

    work = Path(tempfile.mkdtemp(prefix="mixed_thumbs_"))
    use_folders(work / "models", work / "output", work / "temp", work / "input")
    mv, two, vae = _models(work / "models")
    cameras = orbit_cameras(4, 15.0, 0.0, 360.0, 2.5, 40.0)
    size = 128
    schedule, curve = run_node(LambdaScheduleNode, kind="linear", start=DEFAULT_START, end=DEFAULT_END,
                               points="").result
    rows = [_row(_sample(mv, two, vae, s, cameras, size))
            for s in (LambdaSchedule("constant", 1.0), schedule, LambdaSchedule("constant", 0.0))]
    views = torch.cat(rows, dim=0)  # (3 size, 4 size, 3)
    plot = torch.nn.functional.interpolate(curve.permute(0, 3, 1, 2), size=(views.shape[0], int(
        curve.shape[2] * views.shape[0] / curve.shape[1])), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
    to_pil(torch.cat([plot, views], dim=1)).save(folder / "Mixed-score 4 views.jpg", quality=88)

    mixed = _sample(mv, two, vae, schedule, cameras, size)
    (nerf,) = run_node(NeRFFromViews, images=mixed, cameras=cameras, steps=600, rays_per_step=4096,
                       samples_per_ray=64, learning_rate=0.01, background="white", seed=0).result
    new = orbit_cameras(4, 25.0, 45.0, 360.0, 2.5, 40.0)
    rgb = run_node(RenderNeRF, nerf=nerf, cameras=new, width=size, height=size, samples_per_ray=0).result[0]
    to_pil(torch.cat([_row(mixed), _row(rgb)], dim=0)).save(folder / "Text to 3D - mixed score without distillation.jpg",
                                                            quality=88)
