"""Make-Your-3D's tuners on the tiny models, loaded through the real loaders (in-process ComfyUI).

What must hold (issue #14):
- only the intended parameters change: the identity tuner trains every ``to_k_ip``/``to_v_ip`` and nothing else
  (UNet, image projection, input adapter bit-identical); the subject-prior LoRA covers exactly the multi-view
  self-attention projections and the MVDream weights stay bit-identical;
- zero steps give the untuned model's predictions;
- the loss falls, and a planted subject (fixed target views) is reproduced more closely after tuning than before
  (denoising error on the targets at fixed noise and timesteps);
- round trips: the written adapter (through Load IP-Adapter) and the written LoRA (through core
  LoraLoaderModelOnly) predict what the in-memory tuned models predict;
- bad inputs are refused before training with a message naming the input.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from harness.inprocess import predict_x0 as predict, run_node

PROMPT = "a toy"
SIZE = 64  # 8 x 8 latents
LEVELS = (150, 400, 650, 900)  # timesteps of the planted-subject error


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sd15(comfy_inprocess, tiny_models):
    import nodes

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.sd15_2d_checkpoint)[:3]
    return model, clip, vae


@pytest.fixture(scope="module")
def clip_vision(comfy_inprocess, tiny_models):
    import nodes

    with torch.inference_mode():
        return nodes.CLIPVisionLoader().load_clip(tiny_models.clip_vision)[0]


@pytest.fixture(scope="module")
def adapter(comfy_inprocess, tiny_models):
    from compose3d.nodes.ip_adapter import IPAdapterLoader

    return run_node(IPAdapterLoader, ipadapter_name=tiny_models.ip_adapter).result[0]


@pytest.fixture(scope="module")
def mvdream(comfy_inprocess, tiny_models):
    from compose3d.nodes.mvdream import MVDreamLoader

    return run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_sd15_checkpoint).result


@pytest.fixture(scope="module")
def subject():
    """The planted subject: 4 views of the test object (MVDream's rig) and their cameras."""
    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.toy_object import ToyObjectViews

    cameras = orbit_cameras(4, elevation=15.0, distance=2.5)
    views = run_node(ToyObjectViews, cameras=cameras, width=SIZE, height=SIZE, background="white").result[0]
    return views, cameras


def with_report(model):
    from compose3d.nodes.types import TUNING_REPORT_KEY

    reports = []
    clone = model.clone()
    clone.model_options[TUNING_REPORT_KEY] = reports.append
    return clone, reports


def identity(sd15, clip_vision, adapter, views, **kw):
    from compose3d.nodes.make_your_3d import IdentityTuner

    model, clip, vae = sd15
    model, reports = with_report(model)
    args = dict(model=model, ipadapter=adapter, clip_vision=clip_vision, vae=vae, clip=clip, subject=views[:1],
                views=views, prompt=PROMPT, view_prompts="front view\nside view\nback view\nside view", steps=4,
                learning_rate=1e-3, batch_size=2, augmentations=1, weight=1.0, seed=1,
                filename_prefix="test_identity")
    args.update(kw)
    out = run_node(IdentityTuner, **args).result
    return out, reports[-1]


def subject_prior(mvdream, views, cameras, **kw):
    from compose3d.nodes.make_your_3d import SubjectPriorTuner

    model, clip, vae = mvdream
    model, reports = with_report(model)
    args = dict(model=model, vae=vae, clip=clip, images=views, cameras=cameras, prompt=PROMPT, steps=4,
                learning_rate=1e-3, rank=4, alpha=4.0, views_per_step=4, normal_weight=0.5, seed=2,
                filename_prefix="test_subject")
    args.update(kw)
    out = run_node(SubjectPriorTuner, **args).result
    return out, reports[-1]


def text_context(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0].clone()


def fixed_noise(x0, model, seed=0):
    """Noisy versions of the (N, C, h, w) latents at each of LEVELS: (x_t, sigmas, x0), batch N * len(LEVELS)."""
    g = torch.Generator().manual_seed(seed)
    x0 = x0.repeat(len(LEVELS), 1, 1, 1)
    t = torch.tensor(LEVELS).repeat_interleave(x0.shape[0] // len(LEVELS)).float()
    sigmas = model.model.model_sampling.sigma(t)
    noise = torch.randn(x0.shape, generator=g)
    return x0 + noise * sigmas.view(-1, 1, 1, 1), sigmas, x0


def latents_of(model, vae, images):
    with torch.inference_mode():
        return model.model.process_latent_in(vae.encode(images[..., :3])).float().clone()


def same_weights(module, reference: dict) -> bool:
    state = module.state_dict()
    return set(state) == set(reference) and all(torch.equal(state[k].float(), reference[k].float())
                                                for k in reference)


# ---------------------------------------------------------------------------------------- identity tuning

def test_identity_tuning_trains_only_the_image_cross_attention(sd15, clip_vision, adapter, subject, tiny_models):
    from compose3d.nodes.ip_adapter import IPAdapterLoader

    views = subject[0][:2]
    before = {k: v.clone() for k, v in adapter.layout_state_dict().items()}
    file_sd = load_file(str(tiny_models.path("checkpoints", tiny_models.sd15_2d_checkpoint)))
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in file_sd.items()
               if k.startswith("model.diffusion_model.")}
    (personalised, tuned, name), report = identity(sd15, clip_vision, adapter, views, steps=3)

    assert report.steps == 3 and len(report.losses) == 3 and all(torch.isfinite(torch.tensor(report.losses)))
    assert report.trained_parameters == 14 * 320 * 768  # 7 layers x (to_k_ip + to_v_ip)
    after = tuned.layout_state_dict()
    for key in before:
        changed = not torch.equal(after[key], before[key])
        assert changed == (".to_k_ip." in key or ".to_v_ip." in key), key  # every projection moved, nothing else
    assert all(torch.equal(adapter.layout_state_dict()[k], before[k]) for k in before)  # the input adapter
    assert same_weights(sd15[0].model.diffusion_model, unet_sd)  # the UNet, text cross-attention included
    assert not any(p.requires_grad for p in tuned.parameters())
    assert name.startswith("test_identity_") and name.endswith(".safetensors")
    # the written file is the tuned adapter, in the released layout, listed by Load IP-Adapter
    reloaded = run_node(IPAdapterLoader, ipadapter_name=name).result[0]
    assert all(torch.equal(reloaded.layout_state_dict()[k], after[k]) for k in after)


def test_identity_zero_steps_is_the_untuned_model_and_the_written_adapter_round_trips(sd15, clip_vision, adapter,
                                                                                       subject):
    import nodes as core

    from compose3d.nodes.ip_adapter import ApplyIPAdapter, IPAdapterLoader

    views = subject[0][:2]
    with torch.inference_mode():
        embeds = core.CLIPVisionEncode().encode(clip_vision, views[:1], "center")[0]
    model, clip, vae = sd15
    x0 = latents_of(model, vae, views)
    x, sigmas, _ = fixed_noise(x0, model)
    context = text_context(clip, PROMPT)

    (untouched, _, _), report = identity(sd15, clip_vision, adapter, views, steps=0)
    assert report.steps == 0 and report.losses == []
    applied = run_node(ApplyIPAdapter, model=model, ipadapter=adapter, clip_vision_output=embeds,
                       weight=1.0).result[0]
    assert torch.equal(predict(untouched, x, sigmas, context), predict(applied, x, sigmas, context))

    (personalised, _, name), _ = identity(sd15, clip_vision, adapter, views, steps=2)
    reloaded = run_node(IPAdapterLoader, ipadapter_name=name).result[0]
    again = run_node(ApplyIPAdapter, model=model, ipadapter=reloaded, clip_vision_output=embeds,
                     weight=1.0).result[0]
    want = predict(personalised, x, sigmas, context)
    assert torch.allclose(predict(again, x, sigmas, context), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(predict(applied, x, sigmas, context), want, atol=1e-4)  # tuning changed it


def test_identity_tuning_reproduces_the_planted_subject(sd15, clip_vision, adapter, subject):
    """The loss falls and the personalised model denoises the subject's views (with their view prompts and the
    subject as image prompt) closer to the views than the untuned adapter does."""
    import nodes as core

    from compose3d.nodes.ip_adapter import ApplyIPAdapter

    views = subject[0]
    model, clip, vae = sd15
    (personalised, _, _), report = identity(sd15, clip_vision, adapter, views, steps=20, learning_rate=3e-3,
                                            batch_size=4, augmentations=2)
    with torch.inference_mode():
        embeds = core.CLIPVisionEncode().encode(clip_vision, views[:1], "center")[0]
    untuned = run_node(ApplyIPAdapter, model=model, ipadapter=adapter, clip_vision_output=embeds,
                       weight=1.0).result[0]
    x0 = latents_of(model, vae, views)
    x, sigmas, target = fixed_noise(x0, model, seed=5)
    directions = ["front view", "side view", "back view", "side view"]
    context = torch.cat([text_context(clip, f"{PROMPT}, {d}") for d in directions] * len(LEVELS))

    def error(m):
        return float(((predict(m, x, sigmas, context) - target) ** 2).mean())

    losses = report.losses
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    before, after = error(untuned), error(personalised)
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------------ subject-prior tuning

def test_subject_prior_lora_covers_exactly_the_multi_view_self_attention(mvdream, subject, tiny_models):
    import folder_paths

    from compose3d.nodes.attention_patch import unet_transformer_blocks

    views, cameras = subject
    file_sd = load_file(str(tiny_models.path("checkpoints", tiny_models.mvdream_sd15_checkpoint)))
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in file_sd.items()
               if k.startswith("model.diffusion_model.")}
    (patched, name), report = subject_prior(mvdream, views, cameras, steps=3)

    lora = load_file(folder_paths.get_full_path_or_raise("loras", name))
    blocks = unet_transformer_blocks(mvdream[0].model.diffusion_model)
    assert len(blocks) == 7
    assert report.trained_parameters == sum(v.numel() for k, v in lora.items() if not k.endswith(".alpha"))
    modules = {k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k[:-len(".alpha")] for k in lora}
    assert len(modules) == 7 * 4 and all(m.split(".")[-2:] in (["attn1", "to_q"], ["attn1", "to_k"],
                                                               ["attn1", "to_v"], ["to_out", "0"]) for m in modules)
    assert all(".attn1." in m for m in modules)
    for m in modules:
        assert lora[f"{m}.lora_up.weight"].shape[1] == 4 and lora[f"{m}.lora_down.weight"].shape[0] == 4
        assert float(lora[f"{m}.alpha"]) == 4.0
        assert lora[f"{m}.lora_down.weight"].abs().sum() > 0  # trained (it starts at zero)
    assert same_weights(mvdream[0].model.diffusion_model, unet_sd)  # MVDream itself is untouched
    assert report.steps == 3 and all(torch.isfinite(torch.tensor(report.losses)))


def mv_inputs(mvdream, views, cameras, seed=0):
    from compose3d.nodes.types import CAMERA_KEY

    model, clip, vae = mvdream
    x0 = latents_of(model, vae, views)
    x, sigmas, target = fixed_noise(x0, model, seed=seed)
    # one object of 4 views per noise level: one timestep per object, as MVDream denoises
    extra = {CAMERA_KEY: cameras.mvdream.float()}
    return x, sigmas, target, text_context(clip, PROMPT), extra


def test_subject_prior_zero_steps_and_the_lora_round_trip_through_core(mvdream, subject):
    import nodes as core

    views, cameras = subject
    x, sigmas, _, context, extra = mv_inputs(mvdream, views, cameras)
    plain = predict(mvdream[0], x, sigmas, context, extra)

    (unchanged, _), report = subject_prior(mvdream, views, cameras, steps=0)
    assert report.steps == 0
    assert torch.equal(predict(unchanged, x, sigmas, context, extra), plain)

    (tuned, name), _ = subject_prior(mvdream, views, cameras, steps=3)
    mine = predict(tuned, x, sigmas, context, extra)
    assert not torch.allclose(mine, plain, atol=1e-4)
    with torch.inference_mode():
        loaded = core.LoraLoaderModelOnly().load_lora_model_only(mvdream[0], name, 1.0)[0]
    assert torch.allclose(predict(loaded, x, sigmas, context, extra), mine, atol=1e-5, rtol=1e-4)
    assert torch.equal(predict(mvdream[0], x, sigmas, context, extra), plain)  # the input MODEL is unchanged


def test_subject_prior_tuning_reproduces_the_planted_subject(mvdream, subject):
    views, cameras = subject
    (tuned, _), report = subject_prior(mvdream, views, cameras, steps=20, learning_rate=3e-3, rank=8, alpha=8.0,
                                       normals=views.flip(2), normal_weight=0.3)
    x, sigmas, target, context, extra = mv_inputs(mvdream, views, cameras, seed=6)

    def error(m):
        return float(((predict(m, x, sigmas, context, extra) - target) ** 2).mean())

    losses = report.losses
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    before, after = error(mvdream[0]), error(tuned)
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_refused_before_training(sd15, clip_vision, adapter, mvdream, subject, tiny_models):
    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.mvdream import MVDreamLoader
    from compose3d.nodes.validation import InputError

    views, cameras = subject
    with pytest.raises(InputError, match=r"^views: .*shape \(0, 64, 64, 3\)"):
        identity(sd15, clip_vision, adapter, views[:0], subject=views[:1])
    with pytest.raises(InputError, match=r"^images: .*shape \(0, 64, 64, 3\)"):
        subject_prior(mvdream, views[:0], cameras)
    with pytest.raises(InputError, match=r"^cameras: 6 cameras for 4 images"):
        subject_prior(mvdream, views, orbit_cameras(6))
    with pytest.raises(InputError, match=r"^normals: 2 normal maps for 4 images"):
        subject_prior(mvdream, views, cameras, normals=views[:2])
    with pytest.raises(InputError, match=r"^images: the images must all have one size, got images 64x64, "
                                         r"normals 32x32"):
        subject_prior(mvdream, views, cameras, normals=views[:, :32, :32])
    with pytest.raises(InputError, match=r"^model: the subject-prior tuner trains MVDream.*this MODEL is BaseModel"):
        subject_prior((sd15[0], mvdream[1], mvdream[2]), views, cameras)
    with pytest.raises(InputError, match=r"^images: 60x60 images do not fit the VAE"):
        subject_prior(mvdream, views[:, :60, :60], cameras)
    # an adapter that does not fit: the SD2.1-layout tiny MVDream has a 64-wide text context
    mv21 = run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result
    with pytest.raises(InputError, match=r"^ipadapter: the adapter has 7 image cross-attention layers but the "
                                         r"model has 10"):
        identity((mv21[0], sd15[1], sd15[2]), clip_vision, adapter, views)


def test_the_loader_node_refuses_a_damaged_adapter_naming_the_keys(comfy_inprocess, tiny_models):
    import folder_paths
    from safetensors.torch import save_file

    from compose3d.nodes.ip_adapter import IPAdapterLoader
    from compose3d.nodes.validation import InputError

    sd = load_file(str(tiny_models.path("ipadapter", tiny_models.ip_adapter)))
    folder = tiny_models.root / "ipadapter"
    missing = dict(sd)
    missing.pop("ip_adapter.13.to_k_ip.weight")
    save_file(missing, str(folder / "test_missing.safetensors"))
    wrong = dict(sd)
    wrong["image_proj.norm.weight"] = torch.zeros(1024)
    save_file(wrong, str(folder / "test_wrong_shape.safetensors"))
    try:
        assert "test_missing.safetensors" in folder_paths.get_filename_list("ipadapter")
        with pytest.raises(InputError, match=r"^ipadapter_name: test_missing.safetensors: not a complete IP-Adapter "
                                             r"file: missing key\(s\) ip_adapter\.13\.to_k_ip\.weight$"):
            run_node(IPAdapterLoader, ipadapter_name="test_missing.safetensors")
        with pytest.raises(InputError, match=r"^ipadapter_name: test_wrong_shape.safetensors: mismatched "
                                             r"shape\(s\): image_proj\.norm\.weight \(1024,\) / "
                                             r"image_proj\.norm\.bias \(768,\)"):
            run_node(IPAdapterLoader, ipadapter_name="test_wrong_shape.safetensors")
    finally:  # the models folder is shared with the server tests
        for name in ("test_missing.safetensors", "test_wrong_shape.safetensors"):
            (folder / name).unlink()
