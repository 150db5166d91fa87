"""The SDS optimiser node in-process on the tiny MVDream: the SDS gradient against its formulas with a fixed-eps
model, the annealed timesteps and camera ranges at sampled steps, checkpoints, and every bad input's error.

Oracles: the fixed-eps model's known predictions (cond and uncond differ), the DDPM schedule of SD2 written out
here (alpha_bar from the scaled-linear betas), and MVDream-threestudio's loss formulas written out here.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

import compose3d.kernels.distill as distill
import compose3d.nodes.sds as sds_node
from compose3d.kernels.background import LearnedBackground
from compose3d.kernels.cameras import orbit_cameras
from compose3d.nodes.mvdream import MVDreamLoader
from compose3d.nodes.sds import SDSOptimizer
from compose3d.nodes.validation import InputError
from harness.inprocess import run_node

#: Small settings for the CPU (64 px -> 8x8 latents, the smallest the tiny UNet's three downsamplings take).
SMALL = dict(seed=3, steps=4, guidance_scale=7.5, loss="x0_reconstruction", std_rescale=0.5, t_start=0.98,
             t_min_end=0.02, t_max_end=0.5, anneal_fraction=0.8, low_resolution=64, low_batch=4,
             high_resolution=64, high_batch=4, high_from=1.0, elevation_min=0.0, elevation_max=30.0, fov_min=15.0,
             fov_max=60.0, distance_min=0.8, distance_max=1.0, learning_rate=0.01, orientation_weight=0.0,
             sparsity_weight=0.0, opaque_weight=0.0, background="learned", samples_per_ray=16,
             checkpoint_every=0, checkpoint_prefix="sds_test/run", resume_from="", reference_fit=0.2,
             reference_weight_start=1000.0, reference_weight_end=100.0, warm_start_max_t=0.5,
             start_at_step=0, end_at_step=100000, prompt="", parts="", cross_strength=0.6, self_strength=1.2,
             modulation_start=0.4314, modulation_end=1.0)


def encode(clip, text: str):
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


def sd2_alphas_cumprod() -> torch.Tensor:
    """SD1/SD2's DDPM schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class FixedEps(torch.nn.Module):
    """A diffusion model whose eps prediction is a fixed pattern: ``E_cond`` for cond rows, ``E_uncond`` for uncond
    rows (ComfyUI batches them together and says which chunk is which in ``cond_or_uncond``)."""

    dtype = torch.float32

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        order = transformer_options["cond_or_uncond"]
        rows = x.shape[0] // len(order)
        out = [fixed_eps(x.shape[1:], cond=kind == 0).to(x).expand(rows, *x.shape[1:]) for kind in order]
        return torch.cat(out)


def fixed_eps(shape, cond: bool) -> torch.Tensor:
    n = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    return 0.6 * torch.sin(0.37 * n) + 0.2 if cond else -0.4 * torch.cos(0.11 * n)


@pytest.fixture(scope="module")
def mvdream(comfy_inprocess, tiny_models):
    model, clip, vae = run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result
    return model, clip, vae, encode(clip, "a wooden chair, 3d asset"), encode(clip, "")


@pytest.fixture(scope="module")
def fixed_model(comfy_inprocess, tiny_models):
    model, clip, vae = run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result
    model.model.diffusion_model = FixedEps()
    return model, vae, encode(clip, "a chair"), encode(clip, "")


class Recorder:
    """Wraps the real functions of one run to record what they saw: the latents and their gradient, the noise,
    sigma, t and the cameras of every step."""

    def __init__(self, monkeypatch):
        self.latents, self.grads, self.noised, self.t, self.cameras = [], [], [], [], []
        real_encode, real_noised = sds_node.encode_with_grad, distill.noised
        real_t, real_cameras = distill.sample_timestep, distill.sample_cameras

        def encode_with_grad(*args, **kwargs):
            z = real_encode(*args, **kwargs)
            self.latents.append(z.detach().clone())
            z.register_hook(lambda g: self.grads.append(g.detach().clone()))
            return z

        def noised(latents, noise, sigma):
            self.noised.append((noise.clone(), sigma))
            return real_noised(latents, noise, sigma)

        def sample_timestep(bounds, generator):
            t = real_t(bounds, generator)
            self.t.append((bounds, t))
            return t

        def sample_cameras(batch, ranges, generator):
            cams = real_cameras(batch, ranges, generator)
            self.cameras.append(cams)
            return cams

        monkeypatch.setattr(sds_node, "encode_with_grad", encode_with_grad)
        monkeypatch.setattr(distill, "noised", noised)
        monkeypatch.setattr(distill, "sample_timestep", sample_timestep)
        monkeypatch.setattr(distill, "sample_cameras", sample_cameras)


def run_sds(model, vae, positive, negative, **overrides):
    return run_node(SDSOptimizer, model=model, vae=vae, positive=positive, negative=negative,
                    **{**SMALL, **overrides}).result


def check_sigma(sigma: float, t: int) -> float:
    """alpha_bar_t of SD2's schedule, after checking that the run's sigma is that schedule's sigma at t."""
    abar = float(sd2_alphas_cumprod()[t])
    assert sigma == pytest.approx(((1 - abar) / abar) ** 0.5, rel=1e-4)
    return abar


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_classic_sds_gradient_at_the_latents_is_weighted_eps_difference(fixed_model, monkeypatch, guidance):
    model, vae, positive, negative = fixed_model
    rec = Recorder(monkeypatch)
    run_sds(model, vae, positive, negative, loss="classic", steps=2, guidance_scale=guidance)
    assert len(rec.grads) == 2
    for z, grad, (noise, sigma), (_, t) in zip(rec.latents, rec.grads, rec.noised, rec.t):
        abar = check_sigma(sigma, t)
        e_c, e_u = fixed_eps(z.shape[1:], True), fixed_eps(z.shape[1:], False)
        eps_hat = e_u + guidance * (e_c - e_u)
        expected = (1 - abar) * (eps_hat - noise)  # w(t) (eps_hat - eps), w = 1 - alpha_bar
        assert torch.allclose(grad * z.shape[0], expected, atol=2e-4 * float(expected.abs().max()))


def test_x0_reconstruction_gradient_matches_mvdreams_formula(fixed_model, monkeypatch):
    model, vae, positive, negative = fixed_model
    rec = Recorder(monkeypatch)
    run_sds(model, vae, positive, negative, loss="x0_reconstruction", steps=2, guidance_scale=50.0,
            low_batch=8)
    for z, grad, (noise, sigma), (_, t) in zip(rec.latents, rec.grads, rec.noised, rec.t):
        check_sigma(sigma, t)
        b = z.shape[0]
        x = z + sigma * noise
        e_c, e_u = fixed_eps(z.shape[1:], True), fixed_eps(z.shape[1:], False)
        x0 = x - sigma * (e_u + 50.0 * (e_c - e_u))  # predict_start_from_noise with the guided eps
        x0_nocfg = x - sigma * e_c
        obj = lambda v: v.reshape(b // 4, 4, *v.shape[1:])  # noqa: E731  (objects of 4 views)
        factor = (obj(x0_nocfg).std([1, 2, 3, 4], keepdim=True) + 1e-8) / \
            (obj(x0).std([1, 2, 3, 4], keepdim=True) + 1e-8)
        target = 0.5 * (obj(x0) * factor).reshape(x0.shape) + 0.5 * x0
        assert torch.allclose(grad * b, z - target, atol=1e-4 * float((z - target).abs().max()))


def test_timesteps_and_cameras_follow_the_schedule_at_every_step(fixed_model, monkeypatch):
    model, vae, positive, negative = fixed_model
    rec = Recorder(monkeypatch)
    steps = 10
    run_sds(model, vae, positive, negative, steps=steps, elevation_min=5.0, elevation_max=10.0, fov_min=30.0,
            fov_max=40.0, distance_min=0.9, distance_max=0.95)
    assert len(rec.t) == steps
    for step, ((lo, hi), t) in enumerate(rec.t):
        u = min(step / 8, 1.0)  # annealed over 80% of 10 steps, as MVDream over 8,000 of 10,000
        assert (lo, hi) == (int(1000 * (0.98 - 0.96 * u)), int(1000 * (0.98 - 0.48 * u)))
        assert lo <= t <= hi
    for cams in rec.cameras:
        assert len(cams) == 4
        elev, fov = cams.elevation_deg, torch.rad2deg(cams.fov_y)
        assert bool(((elev >= 5) & (elev <= 10)).all()) and bool(((fov >= 30 - 1e-4) & (fov <= 40 + 1e-4)).all())
        scaled = cams.positions.norm(dim=-1) * torch.tan(cams.fov_y / 2)
        assert bool(((scaled >= 0.9 - 1e-4) & (scaled <= 0.95 + 1e-4)).all())


def test_outputs_report_and_checkpoints(mvdream, comfy_inprocess):
    model, _, vae, positive, negative = mvdream
    nerf, previews, report = run_sds(model, vae, positive, negative, steps=4, checkpoint_every=2,
                                     checkpoint_prefix="sds_test/outputs")
    assert nerf.steps_trained == 4
    assert previews.shape == (4, 128, 128, 3) and float(previews.min()) >= 0 and float(previews.max()) <= 1
    for phase in ("render", "encode", "unet", "backward", "optimizer"):
        assert phase in report
    assert "peak memory" in report and "checkpoint: sds_test/outputs_000004.safetensors" in report
    folder = comfy_inprocess / "output" / "sds_test"
    assert sorted(os.listdir(folder)) >= ["outputs_000002.safetensors", "outputs_000004.safetensors"]
    with safe_open(str(folder / "outputs_000004.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert torch.equal(f.get_tensor("field.encoding.table"), nerf.field.encoding.table.detach().cpu())
    assert any(k.startswith("background.") for k in keys) and "state.rng" in keys
    assert any(k.startswith("state.optimizer.") for k in keys) and "occupancy.occupied" in keys


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(mvdream, comfy_inprocess):
    model, _, vae, positive, negative = mvdream
    full, _, _ = run_sds(model, vae, positive, negative, steps=4, checkpoint_every=2,
                         checkpoint_prefix="sds_test/full")
    resumed, _, report = run_sds(model, vae, positive, negative, steps=4, checkpoint_every=2,
                                 checkpoint_prefix="sds_test/resumed", resume_from="sds_test/full_000002.safetensors")
    assert resumed.steps_trained == 4 and "sds_test/resumed_000004" in report
    for a, b in zip(full.field.state_dict().values(), resumed.field.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.background.state_dict().values(), resumed.background.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full.occupancy.occupied, resumed.occupancy.occupied)
    # the test can fail: a resume from the other checkpoint diverges in its first step... unless resumed right
    fresh, _, _ = run_sds(model, vae, positive, negative, steps=4, seed=4)
    assert not torch.equal(fresh.field.encoding.table, full.field.encoding.table)


def test_continuing_a_nerf_keeps_its_field_and_counts_steps(mvdream):
    model, _, vae, positive, negative = mvdream
    first, _, _ = run_sds(model, vae, positive, negative, steps=2)
    table = first.field.encoding.table.detach().clone()
    second, _, _ = run_sds(model, vae, positive, negative, steps=2, nerf=first)
    assert second.steps_trained == 4
    assert torch.equal(first.field.encoding.table, table)  # the input NeRF is not changed
    assert not torch.equal(second.field.encoding.table, table)


def test_continuing_a_nerf_takes_the_background_picked_now(mvdream):
    model, _, vae, positive, negative = mvdream
    white, _, _ = run_sds(model, vae, positive, negative, steps=1, background="white")
    black, _, _ = run_sds(model, vae, positive, negative, steps=1, background="black", nerf=white)
    assert black.background.rgb.tolist() == [0.0, 0.0, 0.0]
    assert white.background.rgb.tolist() == [1.0, 1.0, 1.0]
    learned, _, _ = run_sds(model, vae, positive, negative, steps=1, background="learned", nerf=black)
    assert isinstance(learned.background, LearnedBackground)
    # a learned background goes on from its trained weights (a step at the smallest learning rate barely moves
    # them), not from a fresh one (which one step at the default rate already left behind)
    kept, _, _ = run_sds(model, vae, positive, negative, steps=1, background="learned", nerf=learned,
                         learning_rate=1e-5)
    fresh = distill.make_background("learned", SMALL["seed"])

    def distance(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    assert distance(kept.background, learned.background) < 0.1 * distance(fresh, learned.background)


def test_hybrid_fits_reference_views_first(mvdream, monkeypatch):
    from harness.toy_scene import toy_views

    model, _, vae, positive, negative = mvdream
    cameras, images, masks = toy_views(32, views=4)
    rec = Recorder(monkeypatch)
    nerf, _, report = run_sds(model, vae, positive, negative, steps=5, background="white", reference_fit=0.4,
                              reference_images=images, reference_cameras=cameras, reference_masks=masks)
    assert len(rec.t) == 3  # steps 0, 1 fit the references alone; SDS enters at step 2
    assert all(hi <= 500 for (_, hi), _ in rec.t)  # the warm start caps t at 0.5
    assert "reference loss" in report and "sds loss" in report


# ------------------------------------------------------------------------------------------------ bad inputs

def test_bad_models_and_vaes_are_refused_before_optimising(mvdream, tiny_models):
    import comfy.sd
    import folder_paths

    model, _, vae, positive, negative = mvdream
    with torch.inference_mode():
        sd15, _, _, _ = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd15_checkpoint), output_clip=False)
        _, _, vae16, _ = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd3_checkpoint), output_clip=False)
    with pytest.raises(InputError, match=r"^model: the SDS optimiser needs an MVDream MODEL"):
        run_sds(sd15, vae, positive, negative)
    with pytest.raises(InputError, match=r"^vae: its latents have 16 channels but the model denoises 4-channel"):
        run_sds(model, vae16, positive, negative)
    with pytest.raises(InputError, match=r"^low_resolution: 60 px is not a multiple of the VAE's downscale factor 8"):
        run_sds(model, vae, positive, negative, low_resolution=60)
    with pytest.raises(InputError, match=r"^high_batch: 6 is not a multiple of 4"):
        run_sds(model, vae, positive, negative, high_batch=6)
    with pytest.raises(InputError, match=r"^fov_min: 50 is above fov_max 40"):
        run_sds(model, vae, positive, negative, fov_min=50.0, fov_max=40.0)
    with pytest.raises(InputError, match=r"^loss: 'score' is not one of the options"):
        run_sds(model, vae, positive, negative, loss="score")


def test_bad_reference_views_are_refused(mvdream):
    model, _, vae, positive, negative = mvdream
    cams = orbit_cameras(4)
    images = torch.rand(4, 32, 32, 3)
    with pytest.raises(InputError, match=r"^reference_cameras: missing; reference views need their cameras"):
        run_sds(model, vae, positive, negative, reference_images=images)
    with pytest.raises(InputError, match=r"^reference_images: missing"):
        run_sds(model, vae, positive, negative, reference_cameras=cams)
    with pytest.raises(InputError, match=r"^reference_cameras: 3 cameras for 4 images"):
        run_sds(model, vae, positive, negative, reference_images=images, reference_cameras=orbit_cameras(3))
    with pytest.raises(InputError, match=r"^reference_masks: 2 masks for 4 images"):
        run_sds(model, vae, positive, negative, reference_images=images, reference_cameras=cams,
                reference_masks=torch.ones(2, 32, 32), background="white")
    with pytest.raises(InputError, match=r"^background: with reference masks pick the solid colour"):
        run_sds(model, vae, positive, negative, reference_images=images, reference_cameras=cams,
                reference_masks=torch.ones(4, 32, 32))


def test_bad_resume_files_are_refused(mvdream, comfy_inprocess):
    model, _, vae, positive, negative = mvdream
    with pytest.raises(InputError, match=r"^resume_from: no checkpoint at 'sds_test/none.safetensors'"):
        run_sds(model, vae, positive, negative, resume_from="sds_test/none.safetensors")
    broken = comfy_inprocess / "output" / "sds_test" / "broken.safetensors"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(InputError, match=r"^resume_from: 'sds_test/broken.safetensors' is not a readable SDS"):
        run_sds(model, vae, positive, negative, resume_from="sds_test/broken.safetensors")
    run_sds(model, vae, positive, negative, steps=1, checkpoint_every=1, checkpoint_prefix="sds_test/other")
    with pytest.raises(InputError, match=r"^resume_from: 'sds_test/other_000001.safetensors' was saved by a run "
                                         r"with other settings \(guidance: saved 7.5, now 9.0"):
        run_sds(model, vae, positive, negative, steps=1, guidance_scale=9.0,
                resume_from="sds_test/other_000001.safetensors")
