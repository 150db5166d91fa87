"""Tiny random-weight models in the real checkpoint formats, written as safetensors for the real loaders.

The architectures are instantiated from ComfyUI's own model classes (whose state-dict layout is the released
checkpoints' layout), with tiny depths, then filled with seeded random numbers so every build is identical.
Nothing here is an oracle: these are fixtures that the real loaders must accept.

Why the SD UNets are 320 channels wide: ComfyUI recognises SD1.x/SD2.x UNets by ``model_channels == 320``
(``comfy/supported_models.py``), so narrower ones would not load through the real loaders. They are kept small
instead by having one resolution level, no middle block and a single transformer block.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .inprocess import init_comfy

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def fill_seeded(state_dict: dict[str, torch.Tensor], seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Replace every tensor with seeded random values (keys visited in sorted order).

    Matrices/convolutions: N(0, 1/fan_in); 1-D ``*weight`` (norm scales): 1 + N(0, 0.1^2); the rest: N(0, 0.02^2).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state_dict):
        t = state_dict[key]
        if not t.is_floating_point():
            out[key] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if t.ndim >= 2:
            value = noise / (t[0].numel() ** 0.5)
        elif key.endswith("weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.02 * noise
        out[key] = value.to(dtype).contiguous()
    return out


def _module_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def taesd_state_dict(latent_channels: int, seed: int) -> dict[str, torch.Tensor]:
    """A TAESD autoencoder (ComfyUI's tiny VAE format, keys ``taesd_encoder.*``/``taesd_decoder.*``)."""
    _comfy_ready()
    import comfy.taesd.taesd

    with torch.device("meta"):
        vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in vae.state_dict().items()}
    sd = fill_seeded(sd, seed)
    sd["vae_scale"] = torch.tensor(1.0, dtype=torch.float16)
    sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float16)
    return sd


def sd_unet_state_dict(*, context_dim: int, use_linear_in_transformer: bool, num_heads: int = -1,
                       num_head_channels: int = -1, seed: int) -> dict[str, torch.Tensor]:
    """An SD1.x/2.x UNet (LDM key layout), one level: conv_in, res-block + transformer, two output res-blocks.

    No middle block and no output transformers: the smallest UNet ComfyUI still detects (about 13 M parameters).
    """
    _comfy_ready()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
            channel_mult=[1], transformer_depth=[1], transformer_depth_output=[0, 0],
            transformer_depth_middle=-2, context_dim=context_dim, use_spatial_transformer=True,
            use_linear_in_transformer=use_linear_in_transformer, num_heads=num_heads,
            num_head_channels=num_head_channels, legacy=False, operations=comfy.ops.disable_weight_init)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in unet.state_dict().items()}
    return fill_seeded(sd, seed)


#: The IP-Adapter test UNet's shape (ComfyUI UNetModel arguments): SD1.5's 320 channels (so ComfyUI detects it
#: as SD1.5), two levels, a transformer at every input, output and middle position: 7 cross-attention layers.
SD15_IP_UNET_SHAPE = dict(model_channels=320, channel_mult=[1, 1], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                          transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1])
SD15_IP_CROSS_ATTENTION_LAYERS = 7


def sd15_ip_unet_state_dict(seed: int, shape: dict | None = None) -> dict[str, torch.Tensor]:
    """An SD1.5 UNet (LDM key layout): 8 heads, 768-wide context, convolution projections, by default
    :data:`SD15_IP_UNET_SHAPE` (a middle block; about 30 M parameters; its cross-attention layers, in diffusers'
    processor order (down, up, mid), are input blocks 1, 3, output blocks 0-3 and the middle block). ``shape``
    replaces the UNet shape (benchmarks build the real SD1.5)."""
    _comfy_ready()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, context_dim=768, use_spatial_transformer=True,
                         use_linear_in_transformer=False, num_heads=8, legacy=False,
                         operations=comfy.ops.disable_weight_init, **(shape or SD15_IP_UNET_SHAPE))
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in unet.state_dict().items()}
    return fill_seeded(sd, seed)


def ip_adapter_state_dict(layer_widths: list[int], *, embed_dim: int, cross_dim: int = 768, tokens: int = 4,
                          seed: int) -> dict[str, torch.Tensor]:
    """An IP-Adapter (basic) in the released safetensors layout: ``image_proj.proj`` (tokens * cross_dim, embed_dim),
    ``image_proj.norm`` (cross_dim) and ``ip_adapter.{2 i + 1}.to_k_ip/to_v_ip.weight`` (width_i, cross_dim) for
    the i-th cross-attention layer in diffusers' processor order (``layer_widths``). Every layer's weights differ,
    so a wrong layer mapping changes the result."""
    shapes = {"image_proj.proj.weight": (tokens * cross_dim, embed_dim), "image_proj.proj.bias": (tokens * cross_dim,),
              "image_proj.norm.weight": (cross_dim,), "image_proj.norm.bias": (cross_dim,)}
    for i, width in enumerate(layer_widths):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = (width, cross_dim)
        shapes[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (width, cross_dim)
    return fill_seeded({k: torch.empty(s) for k, s in shapes.items()}, seed)


def clip_vision_vitl_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A CLIP ViT-L/14 image encoder (HF ``CLIPVisionModelWithProjection`` layout, ComfyUI's ``clip_vision`` files)
    with random weights. ComfyUI builds image encoders from fixed configs, so it is real-size: 303 M parameters,
    606 MB in float16; ``image_embeds`` are 768 wide."""
    _comfy_ready()
    import json
    import os

    import comfy.clip_model
    import comfy.ops

    with open(os.path.join(os.path.dirname(comfy.clip_model.__file__), "clip_vision_config_vitl.json")) as f:
        config = json.load(f)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta",
                                                           comfy.ops.disable_weight_init)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    return fill_seeded(sd, seed)


def mmdit_state_dict(*, depth: int, seed: int, pos_embed_max_size: int = 16) -> dict[str, torch.Tensor]:
    """An SD3 MMDiT (hidden size 64 * depth, ``depth`` joint blocks) in the SD3 key layout."""
    _comfy_ready()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * depth
    with torch.device("meta"):
        dit = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth,
                    adm_in_channels=2048,
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": 4096, "out_features": hidden}},
                    pos_embed_max_size=pos_embed_max_size, num_patches=pos_embed_max_size ** 2,
                    operations=comfy.ops.disable_weight_init)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in dit.state_dict().items()}
    return fill_seeded(sd, seed)


def mvdream_camera_embed_state_dict(time_embed_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """MVDream's ``camera_embed``: Linear(16, D), SiLU, Linear(D, D), D = time-embedding width."""
    sd = {"camera_embed.0.weight": torch.empty(time_embed_dim, 16),
          "camera_embed.0.bias": torch.empty(time_embed_dim),
          "camera_embed.2.weight": torch.empty(time_embed_dim, time_embed_dim),
          "camera_embed.2.bias": torch.empty(time_embed_dim)}
    return fill_seeded(sd, seed)


#: The tiny MVDream UNet's shape (ComfyUI UNetModel arguments): SD's four levels, narrow.
TINY_MVDREAM_SHAPE = dict(model_channels=64, channel_mult=[1, 1, 2, 2], num_res_blocks=[1, 1, 1, 1],
                          transformer_depth=[1, 1, 1, 0], transformer_depth_middle=1,
                          transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0])


def _comfy_ready() -> None:
    """Import path for ComfyUI: the tests' set-up unless a caller (a benchmark) has set ComfyUI up already."""
    if "comfy.model_management" not in sys.modules:
        init_comfy()


def mvdream_unet_state_dict(*, family: str, seed: int, context_dim: int = 64,
                            shape: dict | None = None) -> dict[str, torch.Tensor]:
    """An MVDream UNet (with ``camera_embed``), by default the tiny one: :data:`TINY_MVDREAM_SHAPE`.

    64 base channels, channel multipliers (1, 1, 2, 2), one res-block per level: 32x32 latents have attention at
    32x32, 16x16 and 8x8 (input blocks 1, 3, 5; output blocks 2..7; ComfyUI pops ``transformer_depth_output`` from
    the end, so its zeros are the lowest level's output blocks 0, 1), so Attend-and-Excite's 8x8 maps exist.
    ``family`` "sd21": linear projections, 64-channel heads; "sd15": convolution projections, 8 heads.
    ``context_dim`` is the text encoder's width (1024 and 768 in the released models; narrow here, matching the
    narrow text encoders). ``shape`` replaces the UNet shape (benchmarks build wider models).
    """
    _comfy_ready()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sd21 = family == "sd21"
    shape = dict(TINY_MVDREAM_SHAPE if shape is None else shape)
    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, out_channels=4, context_dim=context_dim,
            use_spatial_transformer=True, use_linear_in_transformer=sd21, num_heads=-1 if sd21 else 8,
            num_head_channels=64 if sd21 else -1, legacy=False, operations=comfy.ops.disable_weight_init, **shape)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in unet.state_dict().items()}
    width = shape["model_channels"] * 4
    sd.update({k: torch.empty(v.shape) for k, v in mvdream_camera_embed_state_dict(width, 0).items()})
    return fill_seeded(sd, seed)


def openclip_text_state_dict(*, width: int, layers: int, seed: int, vocab: int = 49408,
                             context: int = 77) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower in the layout of SD2.x's ``cond_stage_model.model.*`` (ViT-H text, narrow)."""
    shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (context, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width),
              "logit_scale": ()}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                       b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                       b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                       b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
                       b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                       b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
    sd = fill_seeded({k: torch.empty(s) for k, s in shapes.items()}, seed)
    sd["token_embedding.weight"] = sd["token_embedding.weight"] * 0.02 * width ** 0.5  # embedding-like scale
    sd["logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    return sd


def clip_l_text_state_dict(*, width: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    """A CLIP text model in the HF layout of SD1.x's ``cond_stage_model.transformer.*`` (CLIP-L text, narrow)."""
    _comfy_ready()
    import comfy.clip_model
    import comfy.ops

    config = {"vocab_size": 49408, "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": 1,
              "intermediate_size": 4 * width, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "projection_dim": width, "eos_token_id": 49407}
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()
          if not k.startswith("text_projection")}
    sd = fill_seeded(sd, seed)
    key = "text_model.embeddings.token_embedding.weight"
    sd[key] = sd[key] * 0.02 * width ** 0.5
    return sd


#: Where an SD1.x checkpoint keeps its CLIP-L text encoder (HF layout).
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
#: Where an SD3 checkpoint keeps its CLIP-L text encoder (``comfy.supported_models.SD3.clip_target``).
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."


def sd3_clip_l_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """SD3's CLIP-L text encoder at its real size (ComfyUI builds CLIP-L from a fixed config: 12 layers of 768;
    123 M parameters, 246 MB in float16): with it inside an SD3 checkpoint, core loaders give an SD3 CLIP whose
    CLIP-L part of the context differs from token to token (CLIP-G and T5 absent, their parts zero)."""
    sd = clip_l_text_state_dict(width=768, layers=12, seed=seed)
    sd["text_projection.weight"] = fill_seeded({"w": torch.empty(768, 768)}, seed + 1)["w"]
    return sd


def mvdream_checkpoint_state_dict(family: str = "sd21", seed: int = 21, *, shape: dict | None = None,
                                  text_width: int = 64) -> dict[str, torch.Tensor]:
    """A whole MVDream checkpoint in the released key layout (``sd-v2.1-base-4view`` or ``sd-v1.5-4view``):
    ``model.diffusion_model.*`` (with ``camera_embed``), ``cond_stage_model.*`` text encoder (3 layers of
    ``text_width``) and ``first_stage_model.*`` VAE (TAESD form: the KL VAE has a fixed 128-channel width in
    ComfyUI's detection). Tiny by default; ``shape`` as in :func:`mvdream_unet_state_dict`."""
    sd = prefixed(UNET_PREFIX, mvdream_unet_state_dict(family=family, seed=seed, context_dim=text_width,
                                                       shape=shape))
    sd.update(prefixed(VAE_PREFIX, taesd_state_dict(4, seed=seed + 1000)))
    if family == "sd21":
        sd.update(prefixed("cond_stage_model.model.", openclip_text_state_dict(width=text_width, layers=3,
                                                                              seed=seed + 2000)))
    else:
        sd.update(prefixed("cond_stage_model.transformer.", clip_l_text_state_dict(width=text_width, layers=3,
                                                                                  seed=seed + 2000)))
    return sd


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


@dataclass(frozen=True)
class TinyModels:
    """File names (relative to their model folder) of the tiny models of one test session."""

    root: Path
    sd15_checkpoint: str = "tiny_sd15.safetensors"
    sd3_checkpoint: str = "tiny_sd3.safetensors"
    sd3_diffusion_model: str = "tiny_sd3_mmdit.safetensors"
    mvdream_checkpoint: str = "tiny_mvdream_sd21.safetensors"
    #: An SD1.5 checkpoint with its text encoder (a real-size CLIP-L, as ComfyUI builds CLIP-L from a fixed
    #: config) and a UNet with a middle block (:data:`SD15_IP_UNET_SHAPE`): the 2D model of mixed-score sampling
    #: and Make-Your-3D, loaded by core CheckpointLoaderSimple with a working CLIP.
    sd15_2d_checkpoint: str = "tiny_sd15_2d.safetensors"
    #: MVDream sd-v1.5-4view in the released layout, its UNet shaped like ``sd15_2d_checkpoint``'s (768-wide
    #: context, 3-layer 768-wide CLIP-L text encoder): the multi-view model of Make-Your-3D.
    mvdream_sd15_checkpoint: str = "tiny_mvdream_sd15.safetensors"
    #: An IP-Adapter file (basic layout, 4 tokens) for the UNets of ``sd15_2d_checkpoint`` and
    #: ``mvdream_sd15_checkpoint`` (7 cross-attention layers, the middle block's included) and a ViT-L image encoder.
    ip_adapter: str = "tiny_ip_adapter_sd15.safetensors"
    #: A real-size CLIP ViT-L/14 image encoder with random weights (606 MB; :func:`build_clip_vision`).
    clip_vision: str = "tiny_clip_vision_vitl.safetensors"

    def path(self, folder: str, name: str) -> Path:
        return self.root / folder / name

    def link_standard_names(self) -> None:
        """Also list each tiny model under the file name the example workflows' loaders use (hard links), so
        the templates validate and run unchanged but for their sizes. Only the names are real: the weights are
        the tiny random ones."""
        for (folder, standard), attribute in STANDARD_NAMES.items():
            link = self.path(folder, standard)
            if not link.exists():
                os.link(self.path(folder, getattr(self, attribute)), link)


#: (folder, the file name users have) -> the :class:`TinyModels` field of the tiny model in the same layout.
STANDARD_NAMES = {
    ("checkpoints", "sd-v2.1-base-4view.safetensors"): "mvdream_checkpoint",
    ("checkpoints", "sd-v1.5-4view.safetensors"): "mvdream_sd15_checkpoint",
    ("checkpoints", "sd3_medium_incl_clips.safetensors"): "sd3_checkpoint",
    ("checkpoints", "v2-1_512-ema-pruned.safetensors"): "sd15_2d_checkpoint",
    ("checkpoints", "v1-5-pruned-emaonly.safetensors"): "sd15_2d_checkpoint",
    ("ipadapter", "ip-adapter_sd15.safetensors"): "ip_adapter",
    ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"): "clip_vision",
}


def build_tiny_models(models_root: Path) -> TinyModels:
    """Write every tiny model into ``models_root/<folder>/`` (checkpoints, diffusion_models, ipadapter,
    clip_vision)."""
    tm = TinyModels(models_root)
    (models_root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models_root / "diffusion_models").mkdir(parents=True, exist_ok=True)

    sd15 = prefixed(UNET_PREFIX, sd_unet_state_dict(context_dim=768, use_linear_in_transformer=False,
                                                    num_heads=8, seed=15))
    sd15.update(prefixed(VAE_PREFIX, taesd_state_dict(4, seed=1504)))
    save_file(sd15, tm.path("checkpoints", tm.sd15_checkpoint), metadata={"compose3d": "tiny sd15 test model"})

    mmdit = mmdit_state_dict(depth=2, seed=3)
    save_file(mmdit, tm.path("diffusion_models", tm.sd3_diffusion_model), metadata={"compose3d": "tiny sd3"})
    sd3 = prefixed(UNET_PREFIX, mmdit)
    sd3.update(prefixed(VAE_PREFIX, taesd_state_dict(16, seed=3016)))
    clip_l = sd3_clip_l_state_dict(seed=3768)
    sd3.update(prefixed(SD3_CLIP_L_PREFIX, clip_l))
    save_file(sd3, tm.path("checkpoints", tm.sd3_checkpoint), metadata={"compose3d": "tiny sd3 test model"})
    del sd3

    sd15_2d = prefixed(UNET_PREFIX, sd15_ip_unet_state_dict(seed=152))
    sd15_2d.update(prefixed(VAE_PREFIX, taesd_state_dict(4, seed=1504)))  # the same VAE as the SD1.5 above
    sd15_2d.update(prefixed(SD15_CLIP_PREFIX, {k: v for k, v in clip_l.items() if k.startswith("text_model.")}))
    save_file(sd15_2d, tm.path("checkpoints", tm.sd15_2d_checkpoint),
              metadata={"compose3d": "tiny sd15 test model with CLIP-L"})
    del sd15_2d, clip_l

    mv = mvdream_checkpoint_state_dict("sd21", seed=21)
    save_file(mv, tm.path("checkpoints", tm.mvdream_checkpoint), metadata={"compose3d": "tiny mvdream test model"})
    mv15 = mvdream_checkpoint_state_dict("sd15", seed=1515, shape=SD15_IP_UNET_SHAPE, text_width=768)
    save_file(mv15, tm.path("checkpoints", tm.mvdream_sd15_checkpoint),
              metadata={"compose3d": "tiny mvdream sd15 test model"})
    del mv, mv15

    (models_root / "ipadapter").mkdir(parents=True, exist_ok=True)
    adapter = ip_adapter_state_dict([320] * SD15_IP_CROSS_ATTENTION_LAYERS, embed_dim=768, seed=1507)
    save_file(adapter, tm.path("ipadapter", tm.ip_adapter), metadata={"compose3d": "tiny ip-adapter"})
    build_clip_vision(tm)
    tm.link_standard_names()
    return tm


def build_clip_vision(tm: TinyModels) -> Path:
    """Write the real-size random ViT-L image encoder into ``clip_vision/`` (once; about 5 s) and return its
    path."""
    path = tm.path("clip_vision", tm.clip_vision)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(clip_vision_vitl_state_dict(seed=1400), str(partial),
                  metadata={"compose3d": "random clip vision vit-l"})
        partial.rename(path)
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
