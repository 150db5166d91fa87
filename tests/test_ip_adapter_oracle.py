"""The IP-Adapter oracle (``tests/ip_adapter_oracle.py``) is itself right.

1. Without an adapter, diffusers' UNet (built by the oracle from ComfyUI's ``unet_config`` and the checkpoint's
   LDM weights) predicts the same noise as ComfyUI's own model of the tiny SD1.5 checkpoint, and every
   cross-attention layer's output agrees, layer by layer, in execution order. This checks the config translation,
   the weight conversion and :func:`comfy_unet_input` (ComfyUI's input scaling and sigma -> timestep).
2. With the adapter loaded by diffusers' own loader at scale 0.7, the prediction changes; at scale 0 diffusers
   skips the image branch and the prediction is the plain UNet's again.
3. A hand computation of the middle block's ``attn2`` from the raw file tensors (image tokens =
   LayerNorm(reshape(proj(e), (B, 4, 768))), file index 13 = the middle block) matches diffusers' output, and the
   plausible wrong layouts (another layer's weights, a transposed token reshape) do not: this pins the layout
   facts that the pack's node will be compared under.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from ip_adapter_oracle import (LDM_UNET_PREFIX, attn2_modules, comfy_sigma, comfy_unet_input, diffusers_eps,
                               diffusers_unet_from_comfy, ip_adapter_processors, load_ip_adapter,
                               set_ip_adapter_scale)

BATCH = 2
LATENT_HW = (16, 16)
TOKENS = 77
WIDTH = 768
HEADS = 8
TIMESTEP = 500
SCALE = 0.7
#: float32 agreement between two implementations of the same UNet, relative to the reference's largest value
#: (measured: about 2e-6 for eps and every attn2 output).
REL_TOL = 2e-5
#: the middle block's cross-attention: index 6 (last) in diffusers' processor order -> file key 2 * 6 + 1.
MID_FILE_INDEX = 13
#: the middle block's position among the 7 attn2 calls in execution order (down 0, down 1, mid, up 0..3).
MID_EXEC_INDEX = 2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture(scope="module")
def comfy_model(comfy_inprocess, tiny_models):
    import comfy.sd

    path = tiny_models.path("checkpoints", tiny_models.sd15_2d_checkpoint)
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)[0]
    assert next(model.model.diffusion_model.parameters()).dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def plain_unet(comfy_model, tiny_models):
    checkpoint = load_file(str(tiny_models.path("checkpoints", tiny_models.sd15_2d_checkpoint)))
    ldm = {k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    return diffusers_unet_from_comfy(ldm, comfy_model.model.model_config.unet_config)


@pytest.fixture(scope="module")
def adapter_sd(tiny_models):
    return {k: v.float() for k, v in load_file(str(tiny_models.path("ipadapter", tiny_models.ip_adapter))).items()}


@pytest.fixture(scope="module")
def adapted_unet(plain_unet, adapter_sd):
    unet = copy.deepcopy(plain_unet)
    load_ip_adapter(unet, adapter_sd, SCALE)
    return unet


def inputs(seed: int = 0):
    """Latent x (B, 4, h, w) at ComfyUI's sigma of TIMESTEP, text context (B, 77, 768), image embeds (B, 768)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, *LATENT_HW, generator=g)
    context = torch.randn(BATCH, TOKENS, WIDTH, generator=g)
    image_embeds = torch.randn(BATCH, WIDTH, generator=g)
    return x, context, image_embeds


def comfy_eps_and_attn2(model, x: torch.Tensor, sigma: float, context: torch.Tensor):
    """ComfyUI's own eps (from ``apply_model``'s denoised) and its attn2 outputs in execution order."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    outputs = []
    blocks = [m for m in model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock)]
    handles = [b.attn2.register_forward_hook(lambda _m, _a, out: outputs.append(out.clone())) for b in blocks]
    try:
        with torch.inference_mode():
            s = torch.full((x.shape[0],), sigma)
            denoised = model.model.apply_model(x, s, c_crossattn=context)
    finally:
        for h in handles:
            h.remove()
    eps = (x - denoised) / sigma
    return eps.clone(), outputs


def test_unet_config_and_adapter_order(plain_unet, adapted_unet):
    """The layout facts: 7 attn2 layers; processor order down, up, mid; heads and widths as the tiny model's."""
    attn2 = [n for n in plain_unet.attn_processors if n.endswith("attn2.processor")]
    assert attn2 == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                     "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                     "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
                     "mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    modules = attn2_modules(plain_unet)
    assert len(modules) == 7 and all(m.heads == HEADS and m.to_q.weight.shape == (320, 320) for _, m in modules)
    assert list(ip_adapter_processors(adapted_unet)) == attn2
    assert all(p.scale == [SCALE] for p in ip_adapter_processors(adapted_unet).values())


def test_plain_unet_matches_comfyui(comfy_model, plain_unet):
    x, context, _ = inputs(0)
    sigma = comfy_sigma(comfy_model, TIMESTEP)
    x = x * sigma  # a latent at this noise level
    x_in, t = comfy_unet_input(comfy_model, x, sigma)
    assert t == TIMESTEP

    want_eps, want_attn2 = comfy_eps_and_attn2(comfy_model, x, sigma, context)
    eps, attn2 = diffusers_eps(plain_unet, x_in, t, context, None, capture=True)

    assert eps.shape == (BATCH, 4, *LATENT_HW)
    assert rel_err(eps, want_eps) < REL_TOL, rel_err(eps, want_eps)
    assert len(attn2) == len(want_attn2) == 7
    for i, (got, want) in enumerate(zip(attn2, want_attn2)):
        assert got.shape == want.shape, (i, got.shape, want.shape)
        assert rel_err(got, want) < REL_TOL, (i, rel_err(got, want))


def test_adapter_changes_eps_and_scale_zero_is_plain(plain_unet, adapted_unet):
    x, context, image_embeds = inputs(1)
    plain, _ = diffusers_eps(plain_unet, x, TIMESTEP, context, None)
    with_image, _ = diffusers_eps(adapted_unet, x, TIMESTEP, context, image_embeds)
    assert rel_err(with_image, plain) > 1e-2, rel_err(with_image, plain)

    with pytest.raises(ValueError):
        diffusers_eps(adapted_unet, x, TIMESTEP, context, None)

    # diffusers' negative image embeds for a basic adapter are zeros (pipeline ``encode_image``); they are not "no
    # image": the tokens become LayerNorm(proj.bias chunks) and still shift the prediction.
    zeros, _ = diffusers_eps(adapted_unet, x, TIMESTEP, context, torch.zeros_like(image_embeds))
    assert rel_err(zeros, plain) > 1e-2, rel_err(zeros, plain)

    set_ip_adapter_scale(adapted_unet, 0.0)
    try:
        off, _ = diffusers_eps(adapted_unet, x, TIMESTEP, context, image_embeds)
    finally:
        set_ip_adapter_scale(adapted_unet, SCALE)
    assert rel_err(off, plain) < 1e-6, rel_err(off, plain)


def hand_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head: q (B, Lq, C), k/v (B, Lk, C) -> (B, Lq, C)."""
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (a.reshape(b, -1, heads, d).transpose(1, 2) for a in (q, k, v))
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ vh).transpose(1, 2).reshape(b, lq, c)


def hand_image_tokens(adapter_sd, image_embeds: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """(B, 4, 768) image tokens: LayerNorm(reshape(proj(e), (B, 4, 768))), in float64."""
    sd = {k: v.double() for k, v in adapter_sd.items()}
    flat = image_embeds.double() @ sd["image_proj.proj.weight"].T + sd["image_proj.proj.bias"]
    tokens = flat.reshape(-1, WIDTH, 4).transpose(1, 2) if transposed else flat.reshape(-1, 4, WIDTH)
    mean = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, unbiased=False, keepdim=True)
    return (tokens - mean) / torch.sqrt(var + 1e-5) * sd["image_proj.norm.weight"] + sd["image_proj.norm.bias"]


def test_hand_check_middle_block(adapted_unet, adapter_sd):
    x, context, image_embeds = inputs(2)
    mid = adapted_unet.mid_block.attentions[0].transformer_blocks[0].attn2
    seen = {}

    def pre(_module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["encoder"] = kwargs["encoder_hidden_states"]

    def post(_module, _args, out):
        seen["out"] = out.detach().clone()

    handles = [mid.register_forward_pre_hook(pre, with_kwargs=True), mid.register_forward_hook(post)]
    try:
        _, attn2 = diffusers_eps(adapted_unet, x, TIMESTEP, context, image_embeds, capture=True)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(attn2[MID_EXEC_INDEX], seen["out"])

    # what the UNet hands every attn2: (text context, [image tokens (B, num_images=1, 4, 768)])
    text, ip = seen["encoder"]
    assert torch.equal(text, context) and isinstance(ip, list) and len(ip) == 1
    assert ip[0].shape == (BATCH, 1, 4, WIDTH)
    tokens = hand_image_tokens(adapter_sd, image_embeds)
    assert rel_err(ip[0][:, 0], tokens) < 1e-5

    def expected(index: int, image_tokens: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
        w = {n: p.detach().double() for n, p in mid.named_parameters() if not n.startswith("processor.")}
        h, ctx = seen["hidden"].double(), context.double()
        q = h @ w["to_q.weight"].T
        text_part = hand_attention(q, ctx @ w["to_k.weight"].T, ctx @ w["to_v.weight"].T, HEADS)
        k_ip = image_tokens @ adapter_sd[f"ip_adapter.{index}.to_k_ip.weight"].double().T
        v_ip = image_tokens @ adapter_sd[f"ip_adapter.{index}.to_v_ip.weight"].double().T
        image_part = hand_attention(q, k_ip, v_ip, HEADS)
        return (text_part + scale * image_part) @ w["to_out.0.weight"].T + w["to_out.0.bias"]

    assert mid.to_q.bias is None and mid.to_k.bias is None and mid.to_v.bias is None
    got = seen["out"]
    assert rel_err(got, expected(MID_FILE_INDEX, tokens)) < 1e-5, rel_err(got, expected(MID_FILE_INDEX, tokens))
    # the check can tell the layouts apart: another layer's weights, or tokens split the other way, are far off
    assert rel_err(got, expected(1, tokens)) > 1e-3
    assert rel_err(got, expected(MID_FILE_INDEX, hand_image_tokens(adapter_sd, image_embeds, True))) > 1e-3
    # and the image branch is not negligible at this layer
    assert rel_err(got, expected(MID_FILE_INDEX, tokens, scale=0.0)) > 1e-2


# ------------------------------------------------------------------------ the pack's node against the oracle

def pack_eps_and_attn2(model, x: torch.Tensor, sigma: float, context: torch.Tensor, negative: torch.Tensor):
    """The (cond, uncond) eps of ``model`` at sigma through ComfyUI's batched ``calc_cond_batch`` (cond and
    uncond in one batch, as sampling runs them) and every attn2 layer's output (after ``to_out``; a replace patch
    skips ``attn2.forward``) in execution order, each (2B, L, C) reordered so that the cond half comes first
    (ComfyUI batches them in the order ``transformer_options["cond_or_uncond"]`` says)."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers
    from comfy.ldm.modules.attention import BasicTransformerBlock

    outputs, order = [], []
    blocks = [m for m in model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock)]
    handles = [b.attn2.to_out.register_forward_hook(lambda _m, _a, out: outputs.append(out.clone()))
               for b in blocks]

    def unet_wrapper(apply_model, args):
        order.append(list(args["c"]["transformer_options"]["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = model.clone()
    model.set_model_unet_function_wrapper(unet_wrapper)
    try:
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model])
            conds = [comfy.samplers.encode_model_conds(model.model.extra_conds,
                                                       comfy.sampler_helpers.convert_cond([[c, {}]]), x, x.device,
                                                       kind) for c, kind in ((context, "positive"),
                                                                             (negative, "negative"))]
            s = torch.full((x.shape[0],), sigma)
            model.pre_run()  # what a sampling run does first (the model's current patcher)
            denoised = comfy.samplers.calc_cond_batch(model.model, conds, x, s, model.model_options)
    finally:
        model.cleanup()
        for h in handles:
            h.remove()
    assert sorted(order[0]) == [0, 1] and len(order) == 1  # one batched call of cond and uncond
    if order[0] == [1, 0]:
        outputs = [torch.cat(out.chunk(2)[::-1]) for out in outputs]
    return [((x - d) / sigma).clone() for d in denoised], outputs


@pytest.fixture(scope="module")
def pack_adapter(comfy_inprocess, tiny_models):
    from harness.inprocess import run_node

    from compose3d.nodes.ip_adapter import IPAdapterLoader

    return run_node(IPAdapterLoader, ipadapter_name=tiny_models.ip_adapter).result[0]


def clip_vision_output(embeds: torch.Tensor):
    from comfy.clip_vision import Output

    out = Output()
    out["image_embeds"] = embeds
    return out


def test_pack_image_prompt_equals_diffusers(comfy_model, adapted_unet, pack_adapter):
    """Compose3D_ApplyIPAdapter on ComfyUI's model = diffusers' IP-Adapter on the same weights, file and image
    embedding: the guided pair (cond with the image, uncond with diffusers' zero negative embedding) and every
    cross-attention layer's output, the middle block's included."""
    from harness.inprocess import run_node

    from compose3d.nodes.ip_adapter import ApplyIPAdapter

    x, context, _ = inputs(2)
    negative = torch.randn(context.shape, generator=torch.Generator().manual_seed(7))
    embed = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(8))
    sigma = comfy_sigma(comfy_model, TIMESTEP)
    x = x * sigma
    patched = run_node(ApplyIPAdapter, model=comfy_model, ipadapter=pack_adapter,
                       clip_vision_output=clip_vision_output(embed), weight=SCALE).result[0]
    (eps_c, eps_u), layers = pack_eps_and_attn2(patched, x, sigma, context, negative)

    x_in, t = comfy_unet_input(comfy_model, x, sigma)
    want_c, attn_c = diffusers_eps(adapted_unet, x_in, t, context, embed.expand(BATCH, -1), capture=True)
    want_u, attn_u = diffusers_eps(adapted_unet, x_in, t, negative, torch.zeros(BATCH, WIDTH), capture=True)
    assert rel_err(eps_c, want_c) < REL_TOL, rel_err(eps_c, want_c)
    assert rel_err(eps_u, want_u) < REL_TOL, rel_err(eps_u, want_u)
    assert len(layers) == 7
    for i, got in enumerate(layers):
        want = torch.cat([attn_c[i], attn_u[i]])
        assert rel_err(got, want) < REL_TOL, (i, rel_err(got, want))

    # The adapter is not a no-op, and the input MODEL is unchanged (the patches live on a clone).
    (plain_c, _), _ = pack_eps_and_attn2(comfy_model, x, sigma, context, negative)
    assert rel_err(plain_c, want_c) > 1e-2


def test_execution_order_mapping_fails_the_oracle(comfy_model, adapted_unet, pack_adapter):
    """The deliberately broken variant: adapter layers mapped in execution order (the middle block between the
    input and output blocks, as it runs) instead of diffusers' processor order. The middle block and the output
    blocks then get other layers' weights, and the oracle sees it."""
    from compose3d.nodes.attention_patch import unet_transformer_blocks
    from compose3d.nodes.ip_adapter import apply_image_prompt, image_prompt

    x, context, _ = inputs(3)
    embed = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(9))
    sigma = comfy_sigma(comfy_model, TIMESTEP)
    x = x * sigma
    execution = unet_transformer_blocks(comfy_model.model.diffusion_model)
    assert execution[2][0] == "middle"
    broken = apply_image_prompt(comfy_model, image_prompt(pack_adapter, embed, SCALE), execution)
    (eps_c, _), layers = pack_eps_and_attn2(broken, x, sigma, context, context)
    x_in, t = comfy_unet_input(comfy_model, x, sigma)
    want_c, attn_c = diffusers_eps(adapted_unet, x_in, t, context, embed.expand(BATCH, -1), capture=True)
    assert rel_err(layers[0][:BATCH], attn_c[0]) < REL_TOL  # the input blocks are mapped alike
    assert rel_err(layers[MID_EXEC_INDEX][:BATCH], attn_c[MID_EXEC_INDEX]) > 1e-3
    assert rel_err(eps_c, want_c) > 1e-3


def test_weight_zero_is_the_plain_model_and_images_prompt_together(comfy_model, pack_adapter):
    from harness.inprocess import run_node

    from compose3d.nodes.ip_adapter import ApplyIPAdapter

    x, context, _ = inputs(4)
    sigma = comfy_sigma(comfy_model, TIMESTEP)
    embeds = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(10))
    off = run_node(ApplyIPAdapter, model=comfy_model, ipadapter=pack_adapter,
                   clip_vision_output=clip_vision_output(embeds), weight=0.0).result[0]
    (plain, _), _ = pack_eps_and_attn2(comfy_model, x * sigma, sigma, context, context)
    (got, _), _ = pack_eps_and_attn2(off, x * sigma, sigma, context, context)
    assert torch.equal(got, plain)

    # Two images: 2 x 4 image tokens in one softmax (as diffusers with num_images = 2).
    on = run_node(ApplyIPAdapter, model=comfy_model, ipadapter=pack_adapter,
                  clip_vision_output=clip_vision_output(embeds), weight=SCALE).result[0]
    prompt_tokens = [p for p in on.model_options["transformer_options"]["patches_replace"]["attn2"].values()]
    assert len(prompt_tokens) == 7
    from compose3d.nodes.ip_adapter import image_prompt
    assert image_prompt(pack_adapter, embeds, SCALE).cond.shape == (1, 8, WIDTH)
