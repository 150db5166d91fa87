"""The mixed-score guider on the tiny MVDream and a tiny SD1.5 2D model, through ComfyUI's own sampling code.

The oracles are the two models sampled on their own by core's CFGGuider (lambda 1 and 0 must be exactly that)
and the seed's formula written out here from the models' own predictions at one (x, sigma):
eps_mix = lambda eps_mv + (1 - lambda) eps_2d + w (eps_mv - eps_single), where eps_single is computed by running
MVDream on each view as an object of its own (a one-camera conditioning), not by the guider's switch.
"""
from __future__ import annotations

import math

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths

from compose3d.kernels.cameras import orbit_cameras
from compose3d.kernels.score_mixing import LambdaSchedule
from compose3d.nodes.mixed_score import (LambdaScheduleNode, MixedScoreGuider, MixedScoreGuiderNode,
                                         MixedScoreSampler, MixSettings, make_guider)
from compose3d.nodes.mvdream import MVDreamConditioning
from compose3d.nodes.mvdream_model import load_mvdream
from compose3d.nodes.validation import InputError
from harness.inprocess import run_node

VIEWS = 4
LATENT = (VIEWS, 4, 8, 8)  # 64 px views: the tiny MVDream needs sides divisible by 8 latents


@pytest.fixture(scope="module")
def models(comfy_inprocess, tiny_models):
    import comfy.sd

    mv, mv_clip, _ = load_mvdream(folder_paths.get_full_path_or_raise("checkpoints", tiny_models.mvdream_checkpoint))
    model_2d, clip_2d, _, _ = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd15_2d_checkpoint),
        embedding_directory=None)
    cameras = orbit_cameras(VIEWS, 15.0, 0.0, 360.0, 2.5, 40.0)

    def encode(clip, text):
        with torch.inference_mode():
            return [[clip.encode_from_tokens(clip.tokenize(text)), {}]]

    def with_cameras(cond, rig):
        return run_node(MVDreamConditioning, conditioning=cond, cameras=rig).result[0]

    return {
        "mv": mv, "model_2d": model_2d, "cameras": cameras,
        "mv_positive": with_cameras(encode(mv_clip, "a red cube, 3d asset"), cameras),
        "mv_negative": with_cameras(encode(mv_clip, ""), cameras),
        "positive_2d": encode(clip_2d, "a red cube"),
        "negative_2d": encode(clip_2d, ""),
        "encode_mv": lambda text, rig: with_cameras(encode(mv_clip, text), rig),
    }


def guider_for(models, schedule: LambdaSchedule, consistency: float = 0.0, model_2d=None,
               cfg_mv: float = 7.5, cfg_2d: float = 5.0) -> MixedScoreGuider:
    return make_guider(models["mv"], model_2d or models["model_2d"], models["mv_positive"], models["mv_negative"],
                       models["positive_2d"], models["negative_2d"], MixSettings(schedule, cfg_mv, cfg_2d,
                                                                                  consistency))


def plain_guider(model, positive, negative, cfg):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def ddim(guider, steps: int = 4, seed: int = 3, batch: int = VIEWS) -> torch.Tensor:
    latent = torch.zeros(batch, *LATENT[1:])
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                             "ddim_uniform", steps)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, seed=seed)


def probe(guider, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The guider's denoised prediction at (x, sigma), evaluated inside a real sampling run (models loaded, conds
    processed) by a sampler that calls the model once."""
    seen = {}

    def function(model, _x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * torch.ones(x.shape[0])
        seen["x0"] = model(x.clone(), s, **(extra_args or {})).clone()
        return _x

    sampler = comfy.samplers.KSAMPLER(function)
    latent = torch.zeros_like(x)
    with torch.inference_mode():
        guider.sample(torch.zeros_like(x), latent, sampler, torch.tensor([sigma, 0.0]), seed=0)
    return seen["x0"]


def sigma_at(models, t: int) -> float:
    return float(models["mv"].get_model_object("model_sampling").sigmas[t])


def noisy_x(sigma: float, batch: int = VIEWS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randn(batch, *LATENT[1:], generator=gen) * math.sqrt(1 + sigma * sigma)


# ------------------------------------------------------------------------------------------ exact reductions

def test_lambda_one_is_plain_mvdream_sampling_bit_for_bit(models):
    mixed = ddim(guider_for(models, LambdaSchedule("constant", 1.0)))
    plain = ddim(plain_guider(models["mv"], models["mv_positive"], models["mv_negative"], 7.5))
    assert torch.equal(mixed, plain)
    other = ddim(guider_for(models, LambdaSchedule("constant", 0.999)))
    assert not torch.equal(other, plain)  # the comparison can fail


def test_lambda_zero_is_plain_2d_sampling_of_each_view_bit_for_bit(models):
    mixed = ddim(guider_for(models, LambdaSchedule("constant", 0.0)))
    plain = ddim(plain_guider(models["model_2d"], models["positive_2d"], models["negative_2d"], 5.0))
    assert torch.equal(mixed, plain)
    # the 2D model sees each view as its own image: view 0 sampled alone is view 0 of the batch
    alone = ddim(plain_guider(models["model_2d"], models["positive_2d"], models["negative_2d"], 5.0), batch=1)
    assert torch.allclose(alone[0], plain[0], atol=1e-5 * float(plain.abs().max()))


# ----------------------------------------------------------------------------------------------- the formula

def _eps(x, x0, sigma):
    return (x.double() - x0.double()) / sigma


@pytest.mark.parametrize("prediction_2d", ["eps", "v_prediction"])
def test_a_mixed_prediction_is_the_seeds_formula(models, prediction_2d):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model_2d = models["model_2d"]
    if prediction_2d == "v_prediction":  # same schedule, other parameterisation: mixes in eps space
        model_2d = ModelSamplingDiscrete().patch(model_2d, "v_prediction", False)[0]
    schedule = LambdaSchedule("linear", 0.3, 0.9)
    t = 600
    lam = 0.9 + (0.3 - 0.9) * t / 1000
    sigma = sigma_at(models, t)
    x = noisy_x(sigma)
    mixed = probe(guider_for(models, schedule, model_2d=model_2d), x, sigma)
    x0_mv = probe(plain_guider(models["mv"], models["mv_positive"], models["mv_negative"], 7.5), x, sigma)
    x0_2d = probe(plain_guider(model_2d, models["positive_2d"], models["negative_2d"], 5.0), x, sigma)
    expected = lam * _eps(x, x0_mv, sigma) + (1 - lam) * _eps(x, x0_2d, sigma)
    got = _eps(x, mixed, sigma)
    assert torch.allclose(got, expected, atol=2e-4 * float(expected.abs().max()))
    # both terms matter: the mixture is far from either model alone
    assert (got - _eps(x, x0_mv, sigma)).abs().max() > 0.05 * expected.abs().max()
    assert (got - _eps(x, x0_2d, sigma)).abs().max() > 0.05 * expected.abs().max()
    # one DDIM step (eta 0) from this x: x_next = x + (sigma_next - sigma) eps_mix
    sigma_next = sigma_at(models, 400)
    x_next = x.double() + (sigma_next - sigma) * expected
    step = x.double() + (sigma_next - sigma) * got
    assert torch.allclose(step, x_next, atol=1e-4 * float(x_next.abs().max()))


def test_the_consistency_term_is_joint_minus_single_view_prediction(models):
    t, lam, weight = 500, 0.6, 0.5
    sigma = sigma_at(models, t)
    x = noisy_x(sigma)
    mixed = probe(guider_for(models, LambdaSchedule("constant", lam), consistency=weight), x, sigma)
    x0_mv = probe(plain_guider(models["mv"], models["mv_positive"], models["mv_negative"], 7.5), x, sigma)
    x0_2d = probe(plain_guider(models["model_2d"], models["positive_2d"], models["negative_2d"], 5.0), x, sigma)
    singles = []
    for i in range(VIEWS):  # each view as an object of its own: one camera, no other views to attend to
        rig = models["cameras"][i:i + 1]
        guider = plain_guider(models["mv"], models["encode_mv"]("a red cube, 3d asset", rig),
                              models["encode_mv"]("", rig), 7.5)
        singles.append(probe(guider, x[i:i + 1], sigma))
    x0_single = torch.cat(singles)
    eps_mv, eps_single = _eps(x, x0_mv, sigma), _eps(x, x0_single, sigma)
    assert (eps_mv - eps_single).abs().max() > 1e-2  # cross-view attention changes the prediction
    expected = lam * eps_mv + (1 - lam) * _eps(x, x0_2d, sigma) + weight * (eps_mv - eps_single)
    got = _eps(x, mixed, sigma)
    assert torch.allclose(got, expected, atol=2e-4 * float(expected.abs().max()))
    without = _eps(x, probe(guider_for(models, LambdaSchedule("constant", lam)), x, sigma), sigma)
    assert not torch.allclose(without, expected, atol=2e-4 * float(expected.abs().max()))


def test_the_schedule_is_read_at_each_steps_timestep(models):
    schedule = LambdaSchedule("piecewise", points=((0.0, 1.0), (500.0, 0.5), (1000.0, 0.0)))
    guider = guider_for(models, schedule)
    ddim(guider, steps=5)
    ts = [t for t, _ in guider.lambdas]
    assert ts == [801.0, 601.0, 401.0, 201.0, 1.0]  # ddim_uniform, 5 steps of 1000
    assert [lam for _, lam in guider.lambdas] == pytest.approx([1 - t / 1000 for t in ts])


# ----------------------------------------------------------------------------------------- model management

def test_both_models_load_in_one_call_and_the_2d_model_is_cleaned_up(models, monkeypatch):
    calls = []
    real = comfy.model_management.load_models_gpu

    def recording(models_, *args, **kwargs):
        calls.append(list(models_))
        return real(models_, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    guider = guider_for(models, LambdaSchedule("constant", 0.5))
    ddim(guider, steps=2)
    assert len(calls) == 1
    loaded = calls[0]
    assert loaded[0] is guider.model_patcher and models["model_2d"] in loaded
    assert getattr(models["model_2d"].model, "current_patcher", None) is None  # pre_run ... cleanup
    # the MODELs given to the guider are unchanged (the guider patches a clone)
    assert models["mv"].get_additional_models() == []


# -------------------------------------------------------------------------------------------------- nodes

def test_the_one_node_sampler_is_the_guider_with_ddim(models):
    schedule = run_node(LambdaScheduleNode, kind="linear", start=0.3, end=0.9, points="").result[0]
    latent = {"samples": torch.zeros(*LATENT)}
    inputs = dict(mv_model=models["mv"], model_2d=models["model_2d"], mv_positive=models["mv_positive"],
                  mv_negative=models["mv_negative"], positive_2d=models["positive_2d"],
                  negative_2d=models["negative_2d"], lambda_schedule=schedule, cfg_mv=7.5, cfg_2d=5.0,
                  consistency=0.0)
    (out,) = run_node(MixedScoreSampler, **inputs, latent_image=latent, seed=3, steps=4).result
    (guider,) = run_node(MixedScoreGuiderNode, **inputs).result
    assert torch.equal(out["samples"], ddim(guider, steps=4, seed=3))


def test_bad_pairs_schedules_and_batches_are_refused_with_clear_errors(models, tiny_models):
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    sd3, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd3_checkpoint), output_clip=False)
    with pytest.raises(InputError, match=r"^model_2d: its latent space \(SD3, 16 channels"):
        guider_for(models, LambdaSchedule(), model_2d=sd3)
    zsnr = ModelSamplingDiscrete().patch(models["model_2d"], "eps", True)[0]
    with pytest.raises(InputError, match=r"^model_2d: its noise schedule"):
        guider_for(models, LambdaSchedule(), model_2d=zsnr)
    with pytest.raises(InputError, match=r"^mv_positive: no cameras"):
        make_guider(models["mv"], models["model_2d"], [[models["mv_positive"][0][0], {}]], models["mv_negative"],
                    models["positive_2d"], models["negative_2d"], MixSettings(LambdaSchedule()))
    with pytest.raises(InputError, match=r"^positive_2d: a conditioning 64 wide, but the 2D model reads 768"):
        make_guider(models["mv"], models["model_2d"], models["mv_positive"], models["mv_negative"],
                    [[models["mv_positive"][0][0], {}]], models["negative_2d"], MixSettings(LambdaSchedule()))
    guider = guider_for(models, LambdaSchedule())
    with pytest.raises(InputError, match=r"^latent_image: a batch of 6 latents is not a multiple of the 4 cameras"):
        ddim(guider, batch=6)
    schedule = LambdaSchedule()
    latent = {"samples": torch.zeros(5, 4, 8, 8)}
    with pytest.raises(InputError, match=r"^latent_image: a batch of 5 latents"):
        run_node(MixedScoreSampler, mv_model=models["mv"], model_2d=models["model_2d"],
                 mv_positive=models["mv_positive"], mv_negative=models["mv_negative"],
                 positive_2d=models["positive_2d"], negative_2d=models["negative_2d"], lambda_schedule=schedule,
                 cfg_mv=7.5, cfg_2d=5.0, consistency=0.0, latent_image=latent, seed=0, steps=2)
    with pytest.raises(InputError, match=r"^consistency: the consistency term needs an MVDream mv_model"):
        make_guider(models["model_2d"], models["model_2d"], models["mv_positive"], models["mv_negative"],
                    models["positive_2d"], models["negative_2d"], MixSettings(LambdaSchedule(), consistency=1.0))


def test_the_schedule_node_builds_the_schedule_and_refuses_bad_points(comfy_inprocess):
    schedule, preview = run_node(LambdaScheduleNode, kind="piecewise", start=0.0, end=0.0,
                                 points="0: 1.0, 400: 0.6, 1000: 0.2").result
    assert schedule(200) == pytest.approx(0.8) and schedule(700) == pytest.approx(0.4)
    assert preview.shape == (1, 288, 512, 3)
    with pytest.raises(ValueError, match=r"^points: the timesteps must increase"):
        run_node(LambdaScheduleNode, kind="piecewise", start=0.3, end=0.9, points="500: 0.5, 100: 0.2")
    with pytest.raises(ValueError, match=r"^points: at t 100: lambda must be in \[0, 1\]"):
        run_node(LambdaScheduleNode, kind="piecewise", start=0.3, end=0.9, points="100: 1.2")
    with pytest.raises(InputError, match=r"^start: expected a number in \[0, 1\]"):
        run_node(LambdaScheduleNode, kind="linear", start=1.5, end=0.9, points="")
    # points are read only by the piecewise kind
    assert run_node(LambdaScheduleNode, kind="cosine", start=0.3, end=0.9, points="junk").result[0](0) == 0.9
