"""Training glue on real ComfyUI objects (nodes/training.py): VAE encoding with gradients and backward passes
through weights loaded under inference mode, with the tiny MVDream (TAESD VAE) and a tiny KL VAE.

Oracles: core ``VAE.encode`` (the latents), the posterior's own definition (a KL sample), SD2's latent scale
0.18215, central finite differences (the gradients), and the plain call without the helpers (which must fail).
"""
from __future__ import annotations

import copy

import pytest
import torch

from compose3d.nodes.mvdream import MVDreamLoader
from compose3d.nodes.training import autograd_tensors, autograd_weights, encode_with_grad, refused_by_autograd
from harness.inprocess import run_node
from harness.tiny_models import fill_seeded

SD2_LATENT_SCALE = 0.18215
INFERENCE_ERROR = "Inference tensors cannot be saved for backward"


@pytest.fixture(scope="module")
def mvdream(comfy_inprocess, tiny_models):
    return run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result


@pytest.fixture(scope="module")
def kl_vae(comfy_inprocess):
    """A KL autoencoder (SD's VAE architecture, 32 channels wide) loaded the way loaders do: in inference mode."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                           "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                           "attn_resolutions": [], "dropout": 0.0}}
    with torch.device("meta"):
        shapes = AutoencoderKL(**config).state_dict()
    sd = fill_seeded({k: torch.empty(v.shape) for k, v in shapes.items()}, seed=77, dtype=torch.float32)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd, config={"params": config})


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, size, size, 3, generator=gen)


def core_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.encode(pixels).clone()


@pytest.mark.parametrize("which", ["taesd", "kl"])
def test_latents_equal_core_vae_encode(which, mvdream, kl_vae):
    vae = mvdream[2] if which == "taesd" else kl_vae
    x = images()
    expected = core_encode(vae, x)
    got = encode_with_grad(vae, x.requires_grad_(True))
    assert got.shape == expected.shape == (2, 4, 4, 4)
    assert got.requires_grad
    torch.testing.assert_close(got.detach().cpu(), expected, rtol=1e-5, atol=1e-6)


def test_latents_in_the_models_space_are_scaled_like_sd2(mvdream):
    model, _, vae = mvdream
    x = images(seed=1)
    got = encode_with_grad(vae, x, model=model)
    torch.testing.assert_close(got.detach().cpu(), core_encode(vae, x) * SD2_LATENT_SCALE, rtol=1e-5, atol=1e-7)


def test_an_image_size_off_the_latent_grid_is_cropped_like_core(mvdream):
    vae = mvdream[2]
    x = images(batch=1, size=37)
    got = encode_with_grad(vae, x)
    torch.testing.assert_close(got.detach().cpu(), core_encode(vae, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["taesd", "kl"])
def test_gradients_reach_the_pixels_and_match_finite_differences(which, mvdream, kl_vae):
    vae = mvdream[2] if which == "taesd" else kl_vae
    x = images(batch=1, seed=2)
    weights = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    leaf = x.clone().requires_grad_(True)
    (encode_with_grad(vae, leaf).cpu() * weights).sum().backward()
    grad = leaf.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0

    with torch.inference_mode():  # the oracle: central differences through a float64 copy of the encoder
        encoder = copy.deepcopy(vae.first_stage_model).double()

        def objective(pixels):
            return float((encoder.encode(pixels.double().movedim(-1, 1) * 2 - 1) * weights.double()).sum())

        h = 1e-6  # small: TAESD's ReLUs put kinks within 1e-4 of some pixels
        for pixel in [(0, 5, 7, 0), (0, 20, 11, 2), (0, 31, 0, 1)]:
            plus, minus = x.clone().double(), x.clone().double()
            plus[pixel] += h
            minus[pixel] -= h
            fd = (objective(plus) - objective(minus)) / (2 * h)
            assert float(grad[pixel]) == pytest.approx(fd, rel=1e-4, abs=1e-8), pixel


def test_encoding_inside_comfys_inference_mode_still_gives_gradients(mvdream):
    vae = mvdream[2]
    leaf = images(seed=4).requires_grad_(True)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        latents = encode_with_grad(vae, leaf)
    assert not latents.is_inference()
    latents.square().sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().max() > 0
    assert vae.first_stage_model.vae_scale.is_inference()  # the VAE's own tensors were put back


def test_a_kl_posterior_sample_is_mean_plus_std_times_the_generators_noise(kl_vae):
    x = images(seed=5)
    fsm = kl_vae.first_stage_model
    with torch.inference_mode():  # the posterior's parameters, by hand: encoder, quant_conv, chunk, clamp
        moments = fsm.quant_conv(fsm.encoder(x.movedim(-1, 1) * 2 - 1))
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9))
    expected = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
    got = encode_with_grad(kl_vae, x, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got.detach().cpu(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.detach().cpu(), mean)
    assert fsm.regularization._forward_hooks == {}  # the sampling hook is gone


def test_the_vae_alone_cannot_backpropagate_to_the_pixels(mvdream):
    """The broken variant: the VAE's weights, loaded in inference mode, refuse autograd without the helpers."""
    vae = mvdream[2]
    with torch.inference_mode(False), torch.enable_grad():
        x = images().movedim(-1, 1).requires_grad_(True)
        with pytest.raises(RuntimeError, match=INFERENCE_ERROR):
            vae.first_stage_model.encode(x * 2 - 1).sum().backward()
        with autograd_weights(vae.first_stage_model), autograd_tensors(vae.first_stage_model):
            vae.first_stage_model.encode(x * 2 - 1).sum().backward()
    assert x.grad.abs().max() > 0


def test_refused_by_autograd_agrees_with_autograd_on_every_kind_of_tensor_comfyui_makes():
    """Oracle: autograd itself (saving the tensor for backward raises or not), on the tensors ComfyUI's loading
    makes: created in inference mode, a Parameter wrapped in inference mode (``set_attr_param``), data swapped in
    inference mode (``Module.to``), views of inference tensors taken outside it, and ordinary tensors."""
    with torch.inference_mode():
        made = torch.randn(3)
        wrapped = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    ordinary = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    swapped = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    with torch.inference_mode():
        swapped.data = torch.randn(3)
        in_mode_param = torch.nn.Parameter(made, requires_grad=False)
        normal_view = ordinary.view(3)
    cases = {"created in inference mode": made, "Parameter of an inference tensor, in inference mode": in_mode_param,
             "data swapped in inference mode": swapped, "view of an inference tensor": made.view(3),
             "slice of an inference tensor": made[:2], "Parameter wrapped in inference mode": wrapped,
             "ordinary": ordinary, "view of an ordinary tensor taken in inference mode": normal_view,
             "ordinary clone of an inference tensor": made.clone()}
    seen = set()
    for label, t in cases.items():
        x = torch.randn(t.shape, requires_grad=True)
        try:
            (x * t).sum().backward()
            refused = False
        except RuntimeError as error:
            assert "nference" in str(error), (label, error)
            refused = True
        assert refused_by_autograd(t) == refused, label
        seen.add(refused)
    assert seen == {True, False}  # both answers occur


def unet_inputs(views: int = 4):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(views, 4, 8, 8, generator=gen)
    context = torch.randn(views, 77, 64, generator=gen)
    camera = torch.randn(views, 16, generator=gen)
    return x, torch.full((views,), 500.0), context, camera


def test_autograd_weights_lets_a_backward_pass_run_through_the_loaded_unet(mvdream):
    import comfy.model_management

    model = mvdream[0]
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    assert any(p.is_inference() for p in unet.parameters())  # loaded the way ComfyUI loads in a prompt
    x, t, context, camera = unet_inputs()
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match=INFERENCE_ERROR):  # the broken variant: no weight wrapper
            unet(leaf, t, context=context, camera=camera, num_views=4).square().sum().backward()
        leaf.grad = None
        functions = [(m.__dict__.get("weight_function"), m.__dict__.get("bias_function")) for m in unet.modules()]
        with autograd_weights(unet):
            out = unet(leaf, t, context=context, camera=camera, num_views=4)
        out.square().sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().max() > 0
    after = [(m.__dict__.get("weight_function"), m.__dict__.get("bias_function")) for m in unet.modules()]
    assert after == functions  # the identity wrappers are gone
    with torch.inference_mode():  # and the model still runs as before
        again = unet(x, t, context=context, camera=camera, num_views=4)
    torch.testing.assert_close(again, out.detach())
