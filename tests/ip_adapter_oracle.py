"""An independent IP-Adapter reference: diffusers' SD1.5 UNet with diffusers' own IP-Adapter machinery.

Nothing here imports the pack (no ``compose3d.*``): the pack's IP-Adapter node is checked against this module, so
the two must not share code. The pieces:

* :func:`diffusers_unet_from_comfy` builds a diffusers ``UNet2DConditionModel`` from ComfyUI's ``unet_config`` and
  the LDM-layout UNet weights (converted by diffusers' own ``convert_ldm_unet_checkpoint``, loaded strictly).
* :func:`load_ip_adapter` puts a released "basic" IP-Adapter file into it through
  ``UNet2DConditionLoadersMixin._load_ip_adapter_weights`` (the code path of ``pipeline.load_ip_adapter``) and sets
  the scale of every IP-Adapter attention processor.
* :func:`diffusers_eps` runs the UNet (optionally capturing every ``attn2`` output).
* :func:`comfy_sigma` / :func:`comfy_unet_input` say how ComfyUI's EPS ``BaseModel`` turns a latent at ``sigma``
  into the UNet's input and timestep, so a ComfyUI result can be compared with :func:`diffusers_eps`.

Layout facts this oracle relies on (and ``tests/test_ip_adapter_oracle.py`` pins):

* The adapter file holds ``image_proj.proj`` (4 * 768, E), ``image_proj.norm`` (768) and
  ``ip_adapter.{2 i + 1}.to_k_ip/to_v_ip.weight`` (C_i, 768): the i-th cross-attention (``attn2``) layer in the
  order of diffusers' ``unet.attn_processors`` -- down blocks, then up blocks, then the middle block (the middle
  block is *last*, although it runs between the down and the up blocks). For the 7-layer test UNet: file index 1, 3
  are input blocks 1, 3; 5, 7, 9, 11 are output blocks 0-3; 13 is the middle block.
* The image tokens are ``LayerNorm(reshape(proj(image_embeds), (B, 4, 768)))``: ``proj``'s 3072 outputs are 4
  consecutive 768-wide tokens.
* Each IP-Adapter ``attn2`` computes ``to_out(attn(q, k_text, v_text) + scale * attn(q, to_k_ip(ip), to_v_ip(ip)))``:
  the same query (and heads) for both, two separate softmaxes, the sum taken before ``to_out``.
"""
from __future__ import annotations

from typing import Any

import torch

from oracles import import_hiding_pack_root

LDM_UNET_PREFIX = "model.diffusion_model."


#: diffusers, its LDM converter module and its attention-processor module, imported once with the pack root
#: hidden (see :func:`oracles.import_hiding_pack_root`: transformers would otherwise find the pack's ``kernels/``).
_DIFFUSERS = tuple(import_hiding_pack_root("diffusers", "diffusers.loaders.single_file_utils",
                                           "diffusers.models.attention_processor"))


def _diffusers():
    return _DIFFUSERS


def _per_level(values: list[int], levels: int, per_level: int, what: str) -> list[int]:
    """Collapse a flat per-block list into one value per level (diffusers has one value per level)."""
    if len(values) != levels * per_level:
        raise ValueError(f"{what} has {len(values)} entries, expected {levels} x {per_level}")
    out = []
    for level in range(levels):
        chunk = values[level * per_level:(level + 1) * per_level]
        if len(set(chunk)) != 1:
            raise NotImplementedError(f"{what}: level {level} mixes depths {chunk}; diffusers needs one per level")
        out.append(chunk[0])
    return out


def diffusers_unet_config(unet_config: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` keyword arguments for ComfyUI's SD1.x/SD2.x ``unet_config``.

    * ``block_out_channels``: ``model_channels * channel_mult[level]``.
    * ``layers_per_block``: ``num_res_blocks`` (one value for every level).
    * down/up block types: ``CrossAttn*Block2D`` at the levels with transformers, plain ``*Block2D`` elsewhere;
      up blocks listed deepest level first (diffusers' ``up_blocks.0`` is ComfyUI's ``output_blocks.0..``).
    * ``attention_head_dim``: with ``num_head_channels == -1`` (SD1.5) ComfyUI fixes the number of *heads*
      (``num_heads``); diffusers' SD1.5 configs put that number into ``attention_head_dim`` (a historic misnomer:
      without ``num_attention_heads`` diffusers reads ``attention_head_dim`` as the head count). With
      ``num_head_channels`` (SD2.x) the head count per level is ``channels // num_head_channels``.
    * ``use_linear_projection``: ComfyUI's ``use_linear_in_transformer`` (False: 1x1-conv ``proj_in/proj_out``).
    * a middle block with cross-attention (``UNetMidBlock2DCrossAttn``).
    """
    unsupported = [k for k in ("adm_in_channels",) if unet_config.get(k) is not None]
    unsupported += [k for k in ("use_temporal_resblock", "use_temporal_attention") if unet_config.get(k)]
    if unsupported:
        raise NotImplementedError(f"unet_config features this oracle does not handle: {unsupported}")

    mult = list(unet_config["channel_mult"])
    levels = len(mult)
    channels = [unet_config["model_channels"] * m for m in mult]
    res_blocks = list(unet_config["num_res_blocks"])
    if len(set(res_blocks)) != 1:
        raise NotImplementedError(f"num_res_blocks differs between levels: {res_blocks}")
    layers = res_blocks[0]

    down_depth = _per_level(list(unet_config["transformer_depth"]), levels, layers, "transformer_depth")
    up_depth = _per_level(list(unet_config["transformer_depth_output"]), levels, layers + 1,
                          "transformer_depth_output")
    if up_depth != list(reversed(down_depth)):
        raise NotImplementedError(f"output depths {up_depth} do not mirror input depths {down_depth}")
    mid_depth = unet_config.get("transformer_depth_middle")
    if mid_depth is None or mid_depth < 1:
        raise NotImplementedError("this oracle expects a middle block with cross-attention")
    if mid_depth != down_depth[-1]:
        raise NotImplementedError(f"middle depth {mid_depth} != deepest level's {down_depth[-1]}")

    if unet_config.get("num_head_channels", -1) == -1:
        head_counts: Any = unet_config["num_heads"]
    else:
        head_counts = [c // unet_config["num_head_channels"] for c in channels]

    return dict(
        sample_size=unet_config.get("image_size", 64),
        in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"],
        block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=layers,
        transformer_layers_per_block=tuple(max(d, 1) for d in down_depth),
        attention_head_dim=head_counts,
        cross_attention_dim=unet_config["context_dim"],
        use_linear_projection=bool(unet_config.get("use_linear_in_transformer", False)),
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def diffusers_unet_from_comfy(ldm_unet_sd: dict[str, torch.Tensor], unet_config: dict[str, Any]):
    """A float32 CPU ``diffusers.UNet2DConditionModel`` (eval mode) holding ``ldm_unet_sd``.

    ``ldm_unet_sd``: the UNet's LDM-layout weights *without* the ``model.diffusion_model.`` prefix (``input_blocks.*``,
    ``middle_block.*``, ``output_blocks.*``, ``time_embed.*``, ``out.*``), any float dtype: e.g. a checkpoint's
    tensors with the prefix stripped, or ComfyUI's ``model.model.diffusion_model.state_dict()``.
    ``unet_config``: ComfyUI's ``model.model.model_config.unet_config`` (see :func:`diffusers_unet_config`).

    The weights go through diffusers' own ``convert_ldm_unet_checkpoint`` and are loaded with ``strict=True``; every
    LDM tensor must be used (checked by element count), so neither side has a weight the other lacks.
    """
    diffusers, single_file_utils, _ = _diffusers()
    config = diffusers_unet_config(unet_config)
    prefixed = {LDM_UNET_PREFIX + k: v.detach().to(torch.float32) for k, v in ldm_unet_sd.items()}
    converted = single_file_utils.convert_ldm_unet_checkpoint(prefixed, config)
    used, given = sum(v.numel() for v in converted.values()), sum(v.numel() for v in prefixed.values())
    if used != given:
        raise ValueError(f"the conversion used {used} of the checkpoint's {given} UNet weights")
    unet = diffusers.UNet2DConditionModel(**config)  # float32 parameters on the CPU
    unet.load_state_dict(converted, strict=True)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in unet.parameters())
    return unet.eval()


def ip_adapter_processors(unet) -> dict[str, Any]:
    """``{processor name: IPAdapterAttnProcessor*}`` of ``unet``, in diffusers' ``attn_processors`` order."""
    _, _, attention_processor = _diffusers()
    kinds = (attention_processor.IPAdapterAttnProcessor, attention_processor.IPAdapterAttnProcessor2_0,
             attention_processor.IPAdapterXFormersAttnProcessor)
    return {name: proc for name, proc in unet.attn_processors.items() if isinstance(proc, kinds)}


def set_ip_adapter_scale(unet, scale: float) -> None:
    """Set every IP-Adapter processor's scale (one entry per loaded adapter) to ``scale``.

    diffusers reads the scale only from the processor's ``scale`` attribute (a list, one per adapter); the
    ``scale`` argument of the processor's ``__call__`` and ``cross_attention_kwargs={"scale": ...}`` do not touch
    it. A scale of exactly 0 makes the processor skip the image branch altogether.
    """
    procs = ip_adapter_processors(unet)
    if not procs:
        raise ValueError("the UNet has no IP-Adapter processors")
    for proc in procs.values():
        proc.scale = [float(scale)] * len(proc.scale)


def load_ip_adapter(unet, adapter_sd: dict[str, torch.Tensor], scale: float) -> None:
    """Load a "basic" IP-Adapter into ``unet`` (in place) with diffusers' own loader, at ``scale``.

    ``adapter_sd``: the released safetensors layout, ``image_proj.proj.weight`` (4 * D, E), ``image_proj.proj.bias``
    (4 * D), ``image_proj.norm.weight/bias`` (D), ``ip_adapter.{2 i + 1}.to_k_ip.weight`` and ``.to_v_ip.weight``
    (C_i, D) for the i-th ``attn2`` in ``unet.attn_processors`` order (down, up, mid); D the cross-attention width
    (768), E the image-embed width (768 for a ViT-L ``image_embeds``). Split into
    ``{"image_proj": {...}, "ip_adapter": {...}}`` (prefixes removed) and handed to
    ``UNet2DConditionLoadersMixin._load_ip_adapter_weights``, which replaces every ``attn2`` processor by an
    ``IPAdapterAttnProcessor2_0`` holding ``to_k_ip.0/to_v_ip.0``, sets ``encoder_hid_proj`` to a
    ``MultiIPAdapterImageProjection([ImageProjection(...)])`` and ``config.encoder_hid_dim_type = "ip_image_proj"``.
    Tensors are cast to float32 first.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter_sd.items():
        head, _, rest = key.partition(".")
        if head not in groups:
            raise ValueError(f"unexpected IP-Adapter key {key!r}")
        groups[head][rest] = value.detach().to(torch.float32)
    expected = 2 * len([n for n in unet.attn_processors if n.endswith("attn2.processor")])
    if len(groups["ip_adapter"]) != expected:
        raise ValueError(f"the adapter has {len(groups['ip_adapter'])} attention tensors, the UNet needs {expected}")
    unet._load_ip_adapter_weights([groups], low_cpu_mem_usage=False)
    set_ip_adapter_scale(unet, scale)
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    unet.eval()


def attn2_modules(unet) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every cross-attention ``Attention`` of ``unet`` (module registration order)."""
    return [(name, module) for name, module in unet.named_modules() if name.endswith(".attn2")]


@torch.no_grad()
def diffusers_eps(unet, x: torch.Tensor, t, context: torch.Tensor, image_embeds: torch.Tensor | None = None,
                  capture: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' noise prediction and, with ``capture``, every ``attn2`` output.

    ``x``: (B, 4, h, w), the UNet's input exactly as the UNet sees it (for ComfyUI: ``x / sqrt(sigma^2 + 1)``,
    see :func:`comfy_unet_input`). ``t``: the integer timestep (an ``int``, or a (B,) tensor). ``context``:
    (B, 77, 768) text tokens. ``image_embeds``: (B, 768) CLIP ``image_embeds``, one image per batch row; ``None``
    runs without image input, which diffusers only allows on a UNet without an adapter (a UNet with one raises
    ``ValueError``: its ``encoder_hid_dim_type`` is ``ip_image_proj``).

    How diffusers feeds the adapter: ``added_cond_kwargs={"image_embeds": [e]}`` is a *list* with one tensor per
    loaded adapter, each (B, num_images, E) -- here (B, 1, 768), so ``image_embeds.unsqueeze(1)``. (A bare tensor
    is deprecated: diffusers then applies ``unsqueeze(1)`` itself.) ``MultiIPAdapterImageProjection`` flattens to
    (B * num_images, E), ``ImageProjection`` gives (B * num_images, 4, 768) (Linear, reshape, LayerNorm), reshaped
    back to (B, num_images, 4, 768). The UNet then passes ``encoder_hidden_states = (context, [tokens])`` to every
    ``attn2``; the processor's ``to_k_ip`` maps (B, 1, 4, 768) to (B, 1, 4, C) and views it as (B, 4, heads, C/heads)
    (several images would simply be more tokens in one softmax).

    Returns ``eps`` (B, 4, h, w) and (``capture``) the 7 ``attn2`` outputs (B, h_l * w_l, C_l), after ``to_out``
    and before the residual add, in execution order: down blocks, middle block, up blocks (not the
    ``attn_processors`` order of the adapter file). Without ``capture`` the list is empty.
    """
    if image_embeds is None and ip_adapter_processors(unet):
        raise ValueError("this UNet has an IP-Adapter: diffusers needs image_embeds")
    outputs: list[torch.Tensor] = []
    handles = []
    if capture:
        for _, module in attn2_modules(unet):
            handles.append(module.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone())))
    added = None if image_embeds is None else {"image_embeds": [image_embeds.to(torch.float32).unsqueeze(1)]}
    timestep = t if torch.is_tensor(t) else torch.tensor(int(t))
    try:
        eps = unet(x.to(torch.float32), timestep, encoder_hidden_states=context.to(torch.float32),
                   added_cond_kwargs=added, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    return eps, outputs


def comfy_sigma(model_patcher, t: int) -> float:
    """ComfyUI's sigma of integer timestep ``t``: ``model.model.model_sampling.sigmas[t]`` (so that ComfyUI's
    sigma -> timestep mapping, an argmin over log-sigmas, returns exactly ``t``)."""
    return float(model_patcher.model.model_sampling.sigmas[int(t)])


def comfy_unet_input(model_patcher, x: torch.Tensor, sigma) -> tuple[torch.Tensor, Any]:
    """What ComfyUI's EPS ``BaseModel._apply_model`` feeds its UNet for latent ``x`` (B, 4, h, w) at ``sigma``.

    Input: ``x / sqrt(sigma^2 + sigma_data^2)`` with ``sigma_data = 1`` (``EPS.calculate_input``); timestep:
    ``model_sampling.timestep(sigma)``, the index of the nearest log-sigma (``ModelSamplingDiscrete``). ``sigma``:
    a float or a (B,) tensor. Returns the UNet input (B, 4, h, w) and the timestep (an ``int`` for a scalar
    ``sigma``, else a (B,) long tensor). ComfyUI's output is ``denoised = x - eps * sigma``.
    """
    sampling = model_patcher.model.model_sampling
    scalar = not torch.is_tensor(sigma) or sigma.ndim == 0
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    if scalar:
        s = s.expand(x.shape[0])
    x_in = x / (s.reshape(-1, 1, 1, 1) ** 2 + float(sampling.sigma_data) ** 2) ** 0.5
    t = sampling.timestep(s).long()
    return x_in, int(t[0]) if scalar else t
