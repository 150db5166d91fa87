"""The perfect-prior test MODEL (harness/perfect_prior.py), loaded and run through ComfyUI's own machinery.

Oracles, independent of the harness code: the planted VAE's encoding is written here as an 8x8 average pool
(``torch.nn.functional.avg_pool2d``) times the gain; camera rigs come from ``kernels.cameras.orbit_cameras``; the
optimal denoiser's ``x0`` is that encoding of the exact toy render at the rig's cameras, in SD's latent scale
(0.18215), whatever the noisy latent and sigma.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compose3d.kernels.cameras import OPENGL_TO_BLENDER, orbit_cameras
from compose3d.kernels.toy_object import render_toy_object
from compose3d.nodes.mvdream import MVDreamConditioning
from compose3d.nodes.mvdream_model import load_mvdream
from harness.inprocess import run_node
from harness.perfect_prior import (LATENT_GAIN, decode_mvdream_cameras, install_perfect_prior, load_perfect_prior,
                                   write_perfect_prior_checkpoint)

DISTANCE, FOV = 2.5, 40.0
SIZE = 64  # pixels; 8x8 latents
SD_SCALE = 0.18215  # SD1/SD2 latent scale factor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_perfect_prior_checkpoint(tmp_path_factory.mktemp("perfect_prior") / "perfect_prior.safetensors")


@pytest.fixture(scope="module")
def prior(checkpoint):
    """(MODEL, CLIP, VAE): the checkpoint through the pack's loader, the perfect prior installed."""
    model, clip, vae = load_mvdream(str(checkpoint))
    install_perfect_prior(model, vae, DISTANCE, FOV)
    return model, clip, vae


def planted_encoding(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 4, H/8, W/8): A * (8x8 box average - 0.5) of R, G, B and grey."""
    x = images.movedim(-1, 1)
    x = torch.cat([x, x.mean(1, keepdim=True)], dim=1)
    return LATENT_GAIN * (F.avg_pool2d(x, 8) - 0.5)


def toy_x0(cameras) -> torch.Tensor:
    """The optimal denoiser's answer: model-space latents of the exact renders at ``cameras``."""
    rgb, _, _ = render_toy_object(cameras, SIZE, SIZE)
    return SD_SCALE * planted_encoding(rgb)


def rig(azimuth_start: float = 45.0, views: int = 4):
    return orbit_cameras(views, 15.0, azimuth_start, 360.0, DISTANCE, FOV)


def conditioning(clip, cameras, text: str):
    import nodes

    with torch.inference_mode():
        encoded = nodes.CLIPTextEncode().encode(clip, text)[0]
    return run_node(MVDreamConditioning, conditioning=encoded, cameras=cameras).result[0]


def predict_x0(model, positive, negative, x: torch.Tensor, sigma: float) -> list[torch.Tensor]:
    """[x0_cond, x0_uncond] from ComfyUI's calc_cond_batch, the model loaded and the conds processed as
    ``CFGGuider.outer_sample`` does."""
    import comfy.sampler_helpers
    import comfy.samplers

    with torch.inference_mode():
        conds = {"positive": comfy.sampler_helpers.convert_cond(positive),
                 "negative": comfy.sampler_helpers.convert_cond(negative)}
        inner, conds, loaded = comfy.sampler_helpers.prepare_sampling(model, x.shape, conds, model.model_options)
        model.pre_run()
        try:
            conds = comfy.samplers.process_conds(inner, x, conds, model.load_device)
            timestep = torch.full((x.shape[0],), sigma)
            return comfy.samplers.calc_cond_batch(inner, [conds["positive"], conds["negative"]], x, timestep,
                                                  model.model_options)
        finally:
            model.cleanup()
            comfy.sampler_helpers.cleanup_models(conds, loaded)


def test_planted_vae_encodes_box_averages_and_decodes_them_back(prior):
    vae = prior[2]
    images = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        latents = vae.encode(images)
        torch.testing.assert_close(latents, planted_encoding(images), rtol=0, atol=1e-5)
        colours = torch.tensor([[0.1, 0.7, 0.95], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]).view(3, 1, 1, 3)
        constant = colours.expand(3, 32, 32, 3).contiguous()
        torch.testing.assert_close(vae.decode(vae.encode(constant)), constant, rtol=0, atol=1e-4)
        # a preview is the nearest-upsampled box average
        boxes = F.avg_pool2d(images.movedim(-1, 1), 8)
        upsampled = F.interpolate(boxes, scale_factor=8, mode="nearest").movedim(1, -1)
        torch.testing.assert_close(vae.decode(latents), upsampled, rtol=0, atol=1e-4)


@pytest.mark.parametrize("elevation", [-30.0, 0.0, 15.0, 60.0])
def test_camera_vectors_decode_to_the_rigs_cameras(elevation):
    cams = orbit_cameras(5, elevation, 10.0, 360.0, DISTANCE, FOV)
    official = decode_mvdream_cameras(cams.mvdream, DISTANCE, FOV)
    torch.testing.assert_close(official.c2w, cams.c2w, rtol=0, atol=1e-5)
    torch.testing.assert_close(official.intrinsics, cams.intrinsics)
    mirrored = decode_mvdream_cameras(cams.mvdream, DISTANCE, FOV, "mirrored_azimuth")
    torch.testing.assert_close(mirrored.c2w, orbit_cameras(5, elevation, -10.0, -360.0, DISTANCE, FOV).c2w,
                               rtol=0, atol=1e-5)
    unflipped = decode_mvdream_cameras(cams.mvdream, DISTANCE, FOV, "no_flip")
    flip = OPENGL_TO_BLENDER[:3, :3].float()
    torch.testing.assert_close(unflipped.positions, cams.positions @ flip.T, rtol=0, atol=1e-5)
    assert (unflipped.positions - cams.positions).norm(dim=-1).min() > 0.1  # sqrt(2 (y^2 + z^2)) apart


@pytest.mark.parametrize("step", [100, 900])
def test_denoised_prediction_is_the_toy_objects_encoding(prior, step):
    model, clip, _ = prior
    cams = rig()
    positive = conditioning(clip, cams, "a toy figure")
    negative = conditioning(clip, cams, "")
    sigma = float(model.model.model_sampling.sigmas[step])
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 4, SIZE // 8, SIZE // 8, generator=g) * (1.0 + sigma)  # any noisy latent
    expected = toy_x0(cams)
    cond, uncond = predict_x0(model, positive, negative, x, sigma)
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-4 * (1.0 + sigma))
    torch.testing.assert_close(uncond, expected, rtol=0, atol=1e-4 * (1.0 + sigma))
    assert expected.std() > 0.05  # the object is seen, not a blank latent


def test_core_sampler_lands_on_the_toy_object(prior):
    import comfy.sample

    model, clip, vae = prior
    cams = rig(0.0)
    positive = conditioning(clip, cams, "a toy figure")
    negative = conditioning(clip, cams, "")
    latent = torch.zeros(4, 4, SIZE // 8, SIZE // 8)
    with torch.inference_mode():
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), 2, 5.0, "euler", "ddim_uniform",
                                      positive, negative, latent, seed=3, disable_pbar=True)
        images = vae.decode(samples)
    torch.testing.assert_close(samples, toy_x0(cams) / SD_SCALE, rtol=0, atol=1e-4)
    rgb, _, _ = render_toy_object(cams, SIZE, SIZE)
    preview = F.interpolate(F.avg_pool2d(rgb.movedim(-1, 1), 8), scale_factor=8).movedim(1, -1)
    torch.testing.assert_close(images, preview, rtol=0, atol=1e-3)


def test_mirrored_azimuth_prior_sees_the_object_from_the_other_side(checkpoint, prior):
    clip = prior[1]
    model, _ = load_perfect_prior(checkpoint, DISTANCE, FOV, convention="mirrored_azimuth")
    cams = rig(45.0)  # azimuths 45, 135, 225, 315
    positive = conditioning(clip, cams, "a toy figure")
    negative = conditioning(clip, cams, "")
    sigma = float(model.model.model_sampling.sigmas[500])
    x = torch.randn(4, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    cond, _ = predict_x0(model, positive, negative, x, sigma)
    assert (cond[0] - toy_x0(cams[0])[0]).abs().max() > 0.05  # the camera at azimuth 45 gets a wrong target
    torch.testing.assert_close(cond, toy_x0(rig(-45.0, 4)[[0, 3, 2, 1]]), rtol=0, atol=1e-3)  # ... from -45


def test_without_cameras_the_prior_refuses(prior):
    unet = prior[0].model.diffusion_model
    with pytest.raises(ValueError, match="no camera input"):
        unet(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), context=torch.zeros(1, 77, 64))
