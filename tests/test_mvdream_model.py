"""MVDream's additions to ComfyUI's UNet, checked against ComfyUI's plain UNet and a hand-written joint attention.

The tiny checkpoint (released key layout) is loaded through the loader node; the oracle for "ordinary" behaviour
is ComfyUI's own ``UNetModel`` built from the same config and given the same weights.
"""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels.cameras import orbit_cameras
from compose3d.nodes.mvdream import MVDreamLoader
from harness.inprocess import run_node

VIEWS = 4


@pytest.fixture(scope="module")
def mvdream(comfy_inprocess, tiny_models):
    model, clip, vae = run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result
    return model, clip, vae


@pytest.fixture(scope="module")
def plain_unet(mvdream):
    """ComfyUI's UNetModel with the same config and weights, minus camera_embed."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    mv = mvdream[0].model.diffusion_model
    config = dict(mvdream[0].model.model_config.unet_config)
    unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    weights = {k: v.clone() for k, v in mv.state_dict().items() if not k.startswith("camera_embed.")}
    unet.load_state_dict(weights, strict=True)
    return unet.eval()


def inputs(batch: int, seed: int = 0, context_dim: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 32, 32, generator=g)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, context_dim, generator=g)
    return x, t, context


def camera_vectors(views: int = VIEWS) -> torch.Tensor:
    return orbit_cameras(views, 15.0, 0.0, 360.0, 2.0, 40.0).mvdream.float()


def forward(unet, x, t, context, **kw):
    with torch.no_grad():
        return unet(x, t, context=context, transformer_options={}, **kw)


def test_one_view_without_camera_is_comfyuis_plain_unet(mvdream, plain_unet):
    mv = mvdream[0].model.diffusion_model
    x, t, context = inputs(2)
    torch.testing.assert_close(forward(mv, x, t, context, num_views=1), forward(plain_unet, x, t, context),
                               rtol=0, atol=0)


def test_camera_embedding_changes_the_output_only_through_camera_embed(mvdream, plain_unet):
    mv = mvdream[0].model.diffusion_model
    x, t, context = inputs(VIEWS, seed=1)
    cams = camera_vectors()
    with_camera = forward(mv, x, t, context, camera=cams, num_views=1)
    assert (with_camera - forward(plain_unet, x, t, context)).abs().max() > 1e-3  # the camera is seen
    saved = {k: v.clone() for k, v in mv.camera_embed.state_dict().items()}
    try:
        with torch.inference_mode():  # the loader made the weights in inference mode, as ComfyUI runs nodes
            mv.camera_embed[2].weight.zero_()
            mv.camera_embed[2].bias.zero_()
        torch.testing.assert_close(forward(mv, x, t, context, camera=cams, num_views=1),
                                   forward(plain_unet, x, t, context), rtol=0, atol=0)
        # ... and with multi-view attention, zeroed camera_embed equals giving no camera at all
        torch.testing.assert_close(forward(mv, x, t, context, camera=cams, num_views=VIEWS),
                                   forward(mv, x, t, context, num_views=VIEWS), rtol=0, atol=0)
    finally:
        with torch.inference_mode():
            mv.camera_embed.load_state_dict(saved)


def test_views_of_one_object_attend_to_each_other_and_not_to_other_objects(mvdream):
    mv = mvdream[0].model.diffusion_model
    x, t, context = inputs(2 * VIEWS, seed=2)  # two objects of four views
    cams = camera_vectors().repeat(2, 1)
    base = forward(mv, x, t, context, camera=cams, num_views=VIEWS)
    x2 = x.clone()
    x2[2] += torch.randn_like(x2[2])  # change view 2 of object 0
    changed = forward(mv, x2, t, context, camera=cams, num_views=VIEWS)
    assert (changed[0] - base[0]).abs().max() > 1e-4  # view 0 of the same object sees the change
    torch.testing.assert_close(changed[VIEWS:], base[VIEWS:], rtol=0, atol=0)  # the other object does not
    single = forward(mv, x, t, context, camera=cams, num_views=1)
    single2 = forward(mv, x2, t, context, camera=cams, num_views=1)
    torch.testing.assert_close(single2[0], single[0], rtol=0, atol=0)  # single-view: views are independent


def test_permuting_the_views_permutes_the_outputs(mvdream):
    mv = mvdream[0].model.diffusion_model
    x, t, context = inputs(VIEWS, seed=3)
    cams = camera_vectors()
    perm = torch.tensor([2, 0, 3, 1])
    out = forward(mv, x, t, context, camera=cams, num_views=VIEWS)
    out_perm = forward(mv, x[perm], t, context[perm], camera=cams[perm], num_views=VIEWS)
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-4, atol=1e-4)


def test_cond_and_uncond_halves_in_one_batch_equal_separate_calls(mvdream):
    """ComfyUI batches CFG's cond and uncond (each V views) together; each half must be its own object."""
    mv = mvdream[0].model.diffusion_model
    x, t, context = inputs(VIEWS, seed=4)
    _, _, uncond = inputs(VIEWS, seed=5)
    cams = camera_vectors()
    joint = forward(mv, torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, uncond]),
                    camera=cams.repeat(2, 1), num_views=VIEWS)
    cond_alone = forward(mv, x, t, context, camera=cams, num_views=VIEWS)
    uncond_alone = forward(mv, x, t, uncond, camera=cams, num_views=VIEWS)
    torch.testing.assert_close(joint[:VIEWS], cond_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint[VIEWS:], uncond_alone, rtol=1e-5, atol=1e-5)


def test_multiview_self_attention_is_joint_attention_over_the_views_tokens(mvdream):
    """Oracle: softmax(q k^T / sqrt(d)) v written out, with the keys of all V views of the object."""
    from compose3d.nodes.mvdream_model import MultiViewAttention
    from compose3d.nodes.types import VIEWS_OPTION

    attn = next(m for m in mvdream[0].model.diffusion_model.modules() if isinstance(m, MultiViewAttention))
    heads, inner = attn.heads, attn.to_q.weight.shape[0]
    dim = inner // heads
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2 * VIEWS, 16, attn.to_q.weight.shape[1], generator=g)  # 2 objects x 4 views, 16 tokens
    with torch.no_grad():
        got = attn(x, transformer_options={VIEWS_OPTION: VIEWS})
        expected = []
        for obj in x.split(VIEWS):
            seq = obj.reshape(1, VIEWS * 16, -1)
            q, k, v = (lin(seq).reshape(1, -1, heads, dim).transpose(1, 2) for lin in (attn.to_q, attn.to_k,
                                                                                        attn.to_v))
            w = torch.softmax(q @ k.transpose(-1, -2) / dim ** 0.5, dim=-1)
            o = (w @ v).transpose(1, 2).reshape(1, VIEWS * 16, inner)
            expected.append(attn.to_out(o).reshape(VIEWS, 16, -1))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_loaded_model_is_an_eps_sd_model_with_clip_and_vae(mvdream):
    import comfy.model_base
    import comfy.model_patcher

    from compose3d.nodes.mvdream_model import MVDreamModel, MVDreamUNet

    model, clip, vae = mvdream
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert type(model.model) is MVDreamModel and type(model.model.diffusion_model) is MVDreamUNet
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat, 3d asset"))
        image = vae.decode(torch.zeros(1, 4, 32, 32))
    assert cond[0][0].shape == (1, 77, 64)  # the text encoder's width feeds the UNet's cross-attention
    assert image.shape == (1, 256, 256, 3)


def test_core_lora_loading_patches_mvdream_weights_including_camera_embed(mvdream):
    """A LoRA in ComfyUI's diffusion_model key format (what core LoraLoaderModelOnly reads) patches W + up @ down."""
    import comfy.model_management
    import comfy.sd

    model = mvdream[0]
    g = torch.Generator().manual_seed(8)
    targets = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "camera_embed.0"]
    lora, expected = {}, {}
    for name in targets:
        weight = model.model.diffusion_model.state_dict()[name + ".weight"].clone()
        up, down = torch.randn(weight.shape[0], 2, generator=g), torch.randn(2, weight.shape[1], generator=g)
        lora[f"diffusion_model.{name}.lora_up.weight"] = up
        lora[f"diffusion_model.{name}.lora_down.weight"] = down
        expected[name] = weight + 0.5 * up @ down
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0.0)
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        weights = patched.model.diffusion_model.state_dict()
        for name in targets:
            torch.testing.assert_close(weights[name + ".weight"].float(), expected[name], rtol=1e-4, atol=1e-4)
        comfy.model_management.unload_all_models()
    torch.testing.assert_close(model.model.diffusion_model.state_dict()[targets[1] + ".weight"],
                               expected[targets[1]] - 0.5 * lora[f"diffusion_model.{targets[1]}.lora_up.weight"]
                               @ lora[f"diffusion_model.{targets[1]}.lora_down.weight"], rtol=1e-4, atol=1e-4)
