"""The one-node mixed-score DDIM sampler against diffusers' ``DDIMScheduler`` stepping the same fixed-eps models.

Both MODELs (the tiny MVDream and the tiny SD1.5) have their UNet call replaced by a fixed, known noise
prediction of the DDPM-normalised latent ``x_t`` and the timestep (``set_model_unet_function_wrapper``), so the
sampler's whole trajectory is determined by the DDIM update, the timesteps and the lambda schedule. diffusers
steps ``eps = lambda(t) eps_mv(x_t, t) + (1 - lambda(t)) eps_2d(x_t, t)`` with lambda written out here.

Conventions matched: ComfyUI's ``ddim_uniform`` timesteps (1, 1 + 1000/N, ...) are diffusers' "leading" spacing
with ``steps_offset=1``; ComfyUI's last step goes to sigma 0 (alpha_bar 1), which is diffusers'
``set_alpha_to_one=True``; ComfyUI's latent ``x`` is ``x_t * sqrt(1 + sigma^2)``.
"""
from __future__ import annotations

import math

import pytest
import torch

import folder_paths

from compose3d.kernels.cameras import orbit_cameras
from compose3d.kernels.score_mixing import LambdaSchedule
from compose3d.nodes.mixed_score import MixedScoreSampler
from compose3d.nodes.mvdream import MVDreamConditioning
from compose3d.nodes.mvdream_model import load_mvdream
from harness.inprocess import run_node
from oracles import import_hiding_pack_root

(diffusers,) = import_hiding_pack_root("diffusers")

STEPS = 10
SHAPE = (4, 4, 8, 8)


def eps_mv(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed multi-view "model": a contraction towards a pattern, varying with t."""
    pattern = torch.linspace(-1, 1, xt[0].numel(), dtype=xt.dtype).reshape(xt.shape[1:])
    return 0.6 * xt + 0.3 * torch.sin(t.reshape(-1, 1, 1, 1) / 150.0) * pattern


def eps_2d(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed 2D "model", different from the multi-view one."""
    return 0.9 * xt - 0.2 * (t.reshape(-1, 1, 1, 1) / 1000.0) * xt.flip(-1)


def fixed(model, eps_fn):
    """A clone of ``model`` whose UNet call returns ComfyUI's denoised x0 for the noise prediction ``eps_fn``."""
    patched = model.clone()
    sampling = model.get_model_object("model_sampling")

    def unet(apply_model, args):
        x, sigma = args["input"], args["timestep"]
        s = sigma.reshape(-1, 1, 1, 1).to(torch.float64)
        xt = x.to(torch.float64) / torch.sqrt(1 + s * s)
        t = sampling.timestep(sigma).to(torch.float64)
        return (x.to(torch.float64) - s * eps_fn(xt, t)).to(x.dtype)

    patched.set_model_unet_function_wrapper(unet)
    return patched


@pytest.mark.parametrize("schedule", [LambdaSchedule("linear", 0.3, 0.9), LambdaSchedule("constant", 1.0),
                                      LambdaSchedule("constant", 0.0)], ids=["linear", "mv only", "2d only"])
def test_the_trajectory_matches_diffusers_ddim(comfy_inprocess, tiny_models, schedule):
    import comfy.sample
    import comfy.sd

    mv, mv_clip, _ = load_mvdream(folder_paths.get_full_path_or_raise("checkpoints", tiny_models.mvdream_checkpoint))
    model_2d, clip_2d, _, _ = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd15_2d_checkpoint))
    with torch.inference_mode():
        mv_cond = [[mv_clip.encode_from_tokens(mv_clip.tokenize("a cube")), {}]]
        cond_2d = [[clip_2d.encode_from_tokens(clip_2d.tokenize("a cube")), {}]]
    mv_cond = run_node(MVDreamConditioning, conditioning=mv_cond,
                       cameras=orbit_cameras(4, 15.0, 0.0, 360.0, 2.5, 40.0)).result[0]
    (out,) = run_node(MixedScoreSampler, mv_model=fixed(mv, eps_mv), model_2d=fixed(model_2d, eps_2d),
                      mv_positive=mv_cond, mv_negative=mv_cond, positive_2d=cond_2d, negative_2d=cond_2d,
                      lambda_schedule=schedule, cfg_mv=7.5, cfg_2d=5.0, consistency=0.0,
                      latent_image={"samples": torch.zeros(SHAPE)}, seed=5, steps=STEPS).result

    # the same start as ComfyUI: seeded noise scaled by the first sigma (not max_denoise: ddim_uniform's first
    # timestep, 1 + 1000 (N-1)/N, is below the schedule's last), as the DDPM-normalised x_t
    sampling = mv.get_model_object("model_sampling")
    noise = comfy.sample.prepare_noise(torch.zeros(SHAPE), 5).to(torch.float64)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                                        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    scheduler.set_timesteps(STEPS)
    first = int(scheduler.timesteps[0])
    sigma0 = float(sampling.sigmas[first])
    assert first == 1 + 1000 // STEPS * (STEPS - 1)
    latents = noise * sigma0 / math.sqrt(1 + sigma0 * sigma0)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    for t in scheduler.timesteps:
        tt = torch.full((SHAPE[0],), float(t), dtype=torch.float64)
        lam = schedule(float(t))
        eps = lam * eps_mv(latents, tt) + (1 - lam) * eps_2d(latents, tt)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    # ComfyUI's last sigma is 0, so its sample is the final x0, in latent units after process_latent_out
    got = out["samples"].to(torch.float64) * mv.model.latent_format.scale_factor
    assert torch.allclose(got, latents, atol=1e-4 * float(latents.abs().max())), \
        float((got - latents).abs().max())
