"""The attention-patching module on real ComfyUI models: the tiny MVDream (SD UNet layout) and the tiny SD3 MMDiT.

Oracles: the models' own attention run unpatched (a patch computing the same attention must not change the
output), a change of one view's input reaching the other views (MVDream's joint attention over an object's
views), and softmax(q k^T / sqrt(d)) v written out for the probabilities an SD3 capture keeps.
"""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels.attention import attention
from compose3d.nodes.attention_patch import (comfy_attention, explicit_attention, patch_mmdit_attention,
                                             patch_unet_attention, unet_transformer_blocks)
from compose3d.nodes.mvdream import MVDreamLoader
from harness.inprocess import run_node

VIEWS = 4


@pytest.fixture(scope="module")
def mvdream(comfy_inprocess, tiny_models):
    return run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result[0]


@pytest.fixture(scope="module")
def sd3(comfy_inprocess, tiny_models):
    import comfy.sd
    import folder_paths

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(
            folder_paths.get_full_path_or_raise("diffusion_models", tiny_models.sd3_diffusion_model))


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(VIEWS, 4, 32, 32, generator=g)
    return x, torch.full((VIEWS,), 500.0), torch.randn(VIEWS, 77, 64, generator=g)


def run_unet(unet, x, t, context, model_options: dict | None = None):
    options = dict((model_options or {}).get("transformer_options", {}))
    with torch.no_grad():
        return unet(x, t, context=context, transformer_options=options, num_views=VIEWS)


def explicit_attn1(calls: list):
    """attn1 patches that compute attention with the kernel (not ComfyUI's) and record q's shape."""
    def make(key, fallback):
        def attn1(q, k, v, extra_options):
            calls.append((key, tuple(q.shape)))
            return explicit_attention(q, k, v, extra_options)[0]
        return attn1
    return make


def test_every_transformer_block_is_listed_with_the_key_comfyui_patches_it_under(mvdream):
    unet = mvdream.model.diffusion_model
    keys = unet_transformer_blocks(unet)
    assert len(keys) == len(set(keys)) == sum(1 for m in unet.modules()
                                               if type(m).__name__ == "BasicTransformerBlock")
    seen = []
    options = patch_unet_attention({}, unet, "attn2", lambda key, fallback: (
        lambda q, k, v, extra: seen.append(key) or fallback(q, k, v, extra)))
    run_unet(unet, *unet_inputs(), options)
    assert seen == keys  # each block's patch was called once, in the UNet's order


def test_an_attn1_patch_on_mvdream_keeps_the_views_attending_to_each_other(mvdream):
    unet = mvdream.model.diffusion_model
    x, t, context = unet_inputs(seed=1)
    calls = []
    options = patch_unet_attention({}, unet, "attn1", explicit_attn1(calls))
    plain = run_unet(unet, x, t, context)
    patched = run_unet(unet, x, t, context, options)
    # the patch saw one sequence per object (1, V * L, C), and computes what MVDream's own attention computes
    assert calls and all(shape[0] == 1 for _, shape in calls)
    torch.testing.assert_close(patched, plain, rtol=1e-4, atol=1e-5)
    # cross-view attention: changing view 3's input changes view 0's output
    x2 = x.clone()
    x2[3] += torch.randn_like(x2[3])
    moved = run_unet(unet, x2, t, context, options)
    assert float((moved[0] - patched[0]).abs().max()) > 1e-3
    assert float((moved[3] - patched[3]).abs().max()) > 1e-3


def test_the_same_attn1_patch_without_view_folding_isolates_the_views(mvdream):
    """The trap the module avoids, shown to be real: ComfyUI runs an attn1 replacement without attn1.forward, so
    a patch that bypasses the folding attends within each view only (view 0 no longer sees view 3)."""
    unet = mvdream.model.diffusion_model
    x, t, context = unet_inputs(seed=1)
    calls = []

    def make(key, fallback):
        patch = explicit_attn1(calls)(key, fallback)
        patch.folds_views = True  # claims to fold, so MVDream does not wrap it: ComfyUI's behaviour
        return patch

    options = patch_unet_attention({}, unet, "attn1", make)
    base = run_unet(unet, x, t, context, options)
    x2 = x.clone()
    x2[3] += torch.randn_like(x2[3])
    moved = run_unet(unet, x2, t, context, options)
    assert all(shape[0] == VIEWS for _, shape in calls)
    assert float((moved[0] - base[0]).abs().max()) == 0.0  # views no longer attend to each other
    assert float((base - run_unet(unet, x, t, context)).abs().max()) > 1e-3  # ... which changes the result


def test_patches_installed_before_stay_in_force_as_the_fallback(mvdream):
    unet = mvdream.model.diffusion_model
    first = []
    model = mvdream.clone()
    model.set_model_attn1_replace(lambda q, k, v, extra: first.append(q.shape[0]) or comfy_attention(q, k, v, extra),
                                  "input", 1, 0)
    ours = []
    options = patch_unet_attention(model.model_options, unet, "attn1",
                                   lambda key, fallback: (lambda q, k, v, extra: ours.append(key)
                                                          or fallback(q, k, v, extra)))
    run_unet(unet, *unet_inputs(), options)
    assert first == [1]  # the earlier patch ran once, inside ours, on the folded views
    assert len(ours) == len(unet_transformer_blocks(unet))
    assert "attn1" not in mvdream.model_options.get("transformer_options", {}).get("patches_replace", {})
    with pytest.raises(ValueError, match="^which: expected 'attn1' or 'attn2', got 'attn3'"):
        patch_unet_attention({}, unet, "attn3", explicit_attn1([]))


# ---------------------------------------------------------------------------------------------------- SD3

def mmdit_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 16, 16, generator=g)
    context = torch.randn(2, 20, 4096, generator=g)
    y = torch.randn(2, 2048, generator=g)
    return x, torch.full((2,), 700.0), context, y


def run_mmdit(mmdit, x, t, context, y, model_options: dict | None = None):
    options = dict((model_options or {}).get("transformer_options", {}))
    with torch.no_grad():
        return mmdit(x, t, context=context, y=y, transformer_options=options)


def test_the_mmdit_recipe_hands_the_tagged_joint_attention_to_the_handler(sd3):
    mmdit = sd3.model.diffusion_model
    x, t, context, y = mmdit_inputs()
    blocks = [0, len(mmdit.joint_blocks) - 1]
    seen, kept = [], {}

    def capture(call):
        out, probs = attention(call.q.float(), call.k.float(), call.v.float(), call.heads,
                                               keep=torch.arange(call.text_length))
        seen.append((call.block, call.text_length))
        kept[call.block] = (call, probs)
        return out.to(call.q.dtype)

    plain = run_mmdit(mmdit, x, t, context, y)
    patched = run_mmdit(mmdit, x, t, context, y, patch_mmdit_attention({}, blocks, capture))
    torch.testing.assert_close(patched, plain, rtol=1e-4, atol=1e-4)  # explicit attention changes nothing
    assert seen == [(b, context.shape[1]) for b in blocks]
    call, probs = kept[blocks[0]]
    b, length, channels = call.q.shape
    assert call.k.shape == call.v.shape == call.q.shape  # MMDiT's unflattened v comes to the handler flat
    dim = channels // call.heads
    q = call.q.double().reshape(b, length, call.heads, dim).transpose(1, 2)
    k = call.k.double().reshape(b, length, call.heads, dim).transpose(1, 2)
    oracle = torch.softmax(q @ k.transpose(-1, -2) / dim ** 0.5, dim=-1).mean(dim=1)[..., :context.shape[1]]
    assert probs.shape == (b, length, context.shape[1])
    torch.testing.assert_close(probs.double(), oracle, rtol=1e-4, atol=1e-6)


def test_the_mmdit_recipe_keeps_overrides_and_block_patches_installed_before(sd3):
    mmdit = sd3.model.diffusion_model
    x, t, context, y = mmdit_inputs(seed=2)
    earlier_override, earlier_block, ours = [], [], []

    def override(func, *args, **kwargs):
        earlier_override.append(1)
        return func(*args, **kwargs)

    def block_patch(args, extra):
        earlier_block.append(1)
        return extra["original_block"](args)

    model = sd3.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    model.set_model_patch_replace(block_patch, "dit", "double_block", 1)
    options = patch_mmdit_attention(model.model_options, [1], lambda call: ours.append(call.block) or call.default())
    plain = run_mmdit(mmdit, x, t, context, y)
    patched = run_mmdit(mmdit, x, t, context, y, options)
    torch.testing.assert_close(patched, plain, rtol=0, atol=0)
    assert ours == [1] and earlier_block == [1]
    assert len(earlier_override) >= len(mmdit.joint_blocks)  # every joint attention, the tagged one via default()
