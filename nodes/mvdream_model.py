"""MVDream as a ComfyUI model: ComfyUI's SD UNet plus what MVDream adds, loaded from the released checkpoints.

What MVDream adds to an SD1.5/SD2.1 UNet (``mvdream/ldm/modules/diffusionmodules/openaimodel.py`` upstream):

* ``camera_embed``: Linear(16, D), SiLU, Linear(D, D) with D the time-embedding width; its output is added to the
  timestep embedding: ``emb = time_embed(t) + camera_embed(camera)``.
* Multi-view self-attention: the V views of one object are contiguous in the batch and their tokens attend to each
  other, ``(b v) l c -> b (v l) c`` around every ``attn1`` (see :mod:`kernels.attention`), including attn1
  replace patches, which ComfyUI runs without ``attn1.forward`` (see :mod:`nodes.attention_patch`).
  ``transformer_options[SINGLE_VIEW_OPTION] = True`` turns it off (each view attends to itself only).

Everything else is ComfyUI's own: the UNet (``UNetModel``), the model wrapper (``BaseModel``) with its sampling
schedule, the ops (dtype casting, lowvram weight streaming), the ModelPatcher, CLIP and VAE. The model therefore
works with core samplers, model patches and LoRA.

Cameras travel in the CONDITIONING under :data:`CAMERA_KEY` as (V, 16) MVDream camera vectors (attached by
``Compose3D_MVDreamConditioning``). :meth:`MVDreamModel.extra_conds` turns them into the per-sample ``camera`` input
(tiled over the batch, so sample i gets camera i mod V) and the ``num_views`` constant. The SDS optimiser attaches
the cameras of several objects at once: (N, 16) with ``VIEWS_KEY`` = V views per object (N a multiple of V).
Without cameras the model is a single-view SD UNet with no camera embedding, as upstream with ``camera=None``.
"""
from __future__ import annotations

import functools
import json
import logging
import os

from torch import nn

import comfy.conds
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.sd2_clip
import comfy.utils
from comfy.ldm.modules.attention import BasicTransformerBlock, CrossAttention
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..kernels.attention import sequence_to_views, views_to_sequence
from .attention_patch import fold_views
from .common import interrupt_point, interrupt_point_skip
from .types import CAMERA_KEY, SINGLE_VIEW_OPTION, VIEWS_KEY, VIEWS_OPTION
from .validation import ModelFileError, read_model_file


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX_OPENCLIP = "cond_stage_model.model."  # sd-v2.1-base-4view: OpenCLIP ViT-H text tower
TEXT_PREFIX_CLIP_L = "cond_stage_model.transformer."  # sd-v1.5-4view: HF CLIP-L text model
CAMERA_EMBED_KEY = UNET_PREFIX + "camera_embed.0.weight"

#: Keys of LDM checkpoints that are not weights (the DDPM schedule, recomputed by ComfyUI) and are ignored.
SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor"})
IGNORED_PREFIXES = ("model_ema.",)
#: Text-encoder keys that the released files carry but ComfyUI's text model does not use.
UNUSED_TEXT_KEYS = ("logit_scale", "position_ids", "attn_mask")

class CheckpointError(ModelFileError):
    """A checkpoint that cannot be loaded as MVDream; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------- the network

class MultiViewAttention(CrossAttention):
    """ComfyUI's CrossAttention whose self-attention spans the views of one object.

    ``transformer_options[VIEWS_OPTION] = V``: x (B*V, L, C) is attended as (B, V*L, C). Same weights and keys as
    CrossAttention (instances are re-classed in place), so V = 1 is exactly ComfyUI's attention.
    """

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        views = int(transformer_options.get(VIEWS_OPTION, 1))
        if views <= 1:
            return super().forward(x, context=context, value=value, mask=mask,
                                   transformer_options=transformer_options)
        x = views_to_sequence(x, views)
        context = None if context is None else views_to_sequence(context, views)
        value = None if value is None else views_to_sequence(value, views)
        out = super().forward(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        return sequence_to_views(out, views)


class MVDreamUNet(UNetModel):
    """ComfyUI's UNetModel with MVDream's camera embedding and multi-view self-attention.

    Extra forward inputs: ``camera`` (B, 16) camera vector per sample (None: no camera embedding) and
    ``num_views`` V (the batch holds B / V objects of V contiguous views).
    """

    def __init__(self, *args, device=None, operations=None, **kwargs):
        super().__init__(*args, device=device, operations=operations, **kwargs)
        width = self.model_channels * 4
        self.camera_embed = nn.Sequential(
            operations.Linear(16, width, dtype=self.dtype, device=device),
            nn.SiLU(),
            operations.Linear(width, width, dtype=self.dtype, device=device),
        )
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock) and type(module.attn1) is CrossAttention:
                module.attn1.__class__ = MultiViewAttention

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 camera=None, num_views=1, **kwargs):
        if x.shape[0] % num_views:
            raise ValueError(f"MVDream: a batch of {x.shape[0]} latents is not a multiple of {num_views} views")
        options = dict(transformer_options)
        # SINGLE_VIEW_OPTION: each view attends to itself only (the mixed-score guider's single-view pass).
        options[VIEWS_OPTION] = 1 if options.get(SINGLE_VIEW_OPTION) else int(num_views)
        patches = dict(options.get("patches", {}))
        # A Cancel is answered within one UNet block, not one sampling step (a step of a big batch takes long).
        patches["input_block_patch"] = list(patches.get("input_block_patch", [])) + [interrupt_point]
        patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [interrupt_point_skip]
        if camera is not None:
            camera_emb = self.camera_embed(camera.to(x.dtype))

            def add_camera(emb, model_channels, transformer_options):
                return emb + camera_emb.to(emb.dtype)

            patches["emb_patch"] = list(patches.get("emb_patch", [])) + [add_camera]
        options["patches"] = patches
        replace = options.get("patches_replace", {})
        if replace.get("attn1"):  # an attn1 replacement never enters attn1.forward: fold the views for it
            folded = {key: fold_views(patch) for key, patch in replace["attn1"].items()}
            options["patches_replace"] = {**replace, "attn1": folded}
        return super()._forward(x, timesteps, context, y, control, options, **kwargs)


class MVDreamModel(comfy.model_base.BaseModel):
    """BaseModel (EPS, SD schedule) around :class:`MVDreamUNet`, reading cameras from the conditioning."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.EPS, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=MVDreamUNet)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cameras = kwargs.get(CAMERA_KEY, None)
        if cameras is not None:
            count = cameras.shape[0]
            views = int(kwargs.get(VIEWS_KEY) or count)
            batch = kwargs["noise"].shape[0]
            if count % views:
                raise ValueError(f"MVDream: {count} cameras are not a whole number of objects of {views} views")
            if batch % count:
                raise ValueError(
                    f"MVDream: the latent batch of {batch} is not a multiple of the {count} views of the cameras "
                    f"(Compose3D_MVDreamConditioning). Set the latent batch size to {count} (one object) or a "
                    f"multiple of it.")
            out["camera"] = comfy.conds.CONDRegular(cameras)
            out["num_views"] = comfy.conds.CONDConstant(views)
        return out


# -------------------------------------------------------------------------------------------- model configs

def _clip_config(clip_sd: dict, prefix: str, stock_config: str, hidden_act: str) -> dict:
    """The CLIP text-model config of the weights under ``prefix`` (HF layout), based on ComfyUI's stock json."""
    with open(stock_config) as f:
        config = json.load(f)
    tok = clip_sd[prefix + "text_model.embeddings.token_embedding.weight"]
    layers = 0
    while f"{prefix}text_model.encoder.layers.{layers}.mlp.fc1.weight" in clip_sd:
        layers += 1
    hidden = tok.shape[1]
    config.update(
        vocab_size=tok.shape[0], hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), hidden_act=hidden_act,
        intermediate_size=clip_sd[f"{prefix}text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=clip_sd[prefix + "text_model.embeddings.position_embedding.weight"].shape[0])
    proj = clip_sd.get(prefix + "text_projection.weight")
    config["projection_dim"] = hidden if proj is None else proj.shape[0]
    return config


def _text_encoder_factory(config: dict, **fixed):
    def build(device="cpu", dtype=None, model_options={}, **kwargs):
        return comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, model_options=model_options,
                                          textmodel_json_config=dict(config), **fixed)
    return build


class MVDreamSD21(comfy.supported_models.SD20):
    """sd-v2.1-base-4view: SD2.1-base UNet (eps), OpenCLIP ViT-H text encoder, KL-f8 VAE."""

    text_prefix = TEXT_PREFIX_OPENCLIP
    clip_prefix = "clip_h."  # what process_clip_state_dict turns text_prefix into

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.EPS

    def get_model(self, state_dict, prefix="", device=None):
        return MVDreamModel(self, device=device)

    def clip_target(self, state_dict={}):
        config = _clip_config(state_dict, "clip_h.transformer.",
                              os.path.join(os.path.dirname(comfy.text_encoders.sd2_clip.__file__),
                                           "sd2_clip_config.json"), "gelu")
        factory = _text_encoder_factory(config, layer="hidden", layer_idx=-2, return_projected_pooled=True,
                                        special_tokens={"start": 49406, "end": 49407, "pad": 0})
        return comfy.supported_models_base.ClipTarget(
            comfy.text_encoders.sd2_clip.SD2Tokenizer,
            functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name="h", clip_model=factory))


class MVDreamSD15(comfy.supported_models.SD15):
    """sd-v1.5-4view: SD1.5 UNet (eps), CLIP-L text encoder, KL-f8 VAE."""

    text_prefix = TEXT_PREFIX_CLIP_L
    clip_prefix = "clip_l.transformer."

    def get_model(self, state_dict, prefix="", device=None):
        return MVDreamModel(self, device=device)

    def clip_target(self, state_dict={}):
        config = _clip_config(state_dict, "clip_l.transformer.",
                              os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json"),
                              "quick_gelu")
        factory = _text_encoder_factory(config, return_projected_pooled=False)
        return comfy.supported_models_base.ClipTarget(
            comfy.sd1_clip.SD1Tokenizer,
            functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name="l", clip_model=factory))


# ---------------------------------------------------------------------------------------------- file reading

def _name_keys(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_keys(part: str, name: str, missing, unexpected) -> None:
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {part} key(s): {_name_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} {part} key(s): {_name_keys(unexpected)}")
    if problems:
        raise CheckpointError(f"{name}: not a complete MVDream checkpoint; " + "; ".join(problems) +
                              ". Use the released sd-v2.1-base-4view or sd-v1.5-4view file (or one with "
                              "the same key layout).")


# ---------------------------------------------------------------------------------------------- loading

def _checked_sampling(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: every conditioning of one sampling run must carry the same cameras, or none."""
    conds = getattr(executor.class_obj, "conds", {}) or {}
    with_cameras, without, views = [], [], set()
    for name, entries in conds.items():
        for entry in entries:
            if CAMERA_KEY in entry:
                with_cameras.append(name)
                views.add(int(entry[CAMERA_KEY].shape[0]))
            else:
                without.append(name)
    if with_cameras and without:
        raise ValueError(
            f"MVDream: the {sorted(set(with_cameras))[0]} conditioning has cameras but the "
            f"{sorted(set(without))[0]} conditioning has none. Route both through Compose3D_MVDreamConditioning "
            f"with the same cameras.")
    if len(views) > 1:
        raise ValueError(f"MVDream: the conditionings carry different numbers of views {sorted(views)}; use one "
                         f"camera rig for all of them.")
    return executor(*args, **kwargs)


def load_mvdream(path: str, embedding_directory=None):
    """Load an MVDream checkpoint as (ModelPatcher, CLIP, VAE), all managed by ComfyUI.

    Raises:
        CheckpointError: unreadable/unsafe file, not MVDream, or missing/unexpected keys (named).
    """
    name = os.path.basename(path)
    sd, metadata = read_model_file(path)
    all_keys = list(sd)
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise CheckpointError(f"{name}: no UNet weights under '{UNET_PREFIX}'; not an LDM/MVDream checkpoint.")
    if CAMERA_EMBED_KEY not in sd:
        raise CheckpointError(
            f"{name}: no '{UNET_PREFIX}camera_embed.*' weights, so this is not an MVDream checkpoint. Load plain "
            f"Stable Diffusion checkpoints with the core 'Load Checkpoint' node.")
    if any(k.startswith(TEXT_PREFIX_OPENCLIP) for k in sd):
        config_class = MVDreamSD21
    elif any(k.startswith(TEXT_PREFIX_CLIP_L) for k in sd):
        config_class = MVDreamSD15
    else:
        raise CheckpointError(f"{name}: no text encoder weights ('{TEXT_PREFIX_OPENCLIP}*' for sd-v2.1-base-4view "
                              f"or '{TEXT_PREFIX_CLIP_L}*' for sd-v1.5-4view).")
    if not any(k.startswith(VAE_PREFIX) for k in sd):
        raise CheckpointError(f"{name}: no VAE weights under '{VAE_PREFIX}'.")

    unet_config = comfy.model_detection.detect_unet_config(sd, UNET_PREFIX, metadata=metadata)
    if unet_config is None or unet_config.get("context_dim") is None:
        raise CheckpointError(f"{name}: the UNet under '{UNET_PREFIX}' is not an SD1.x/SD2.x UNet.")
    config = config_class(unet_config)

    parameters = comfy.utils.calculate_parameters(sd, UNET_PREFIX)
    weight_dtype = comfy.utils.weight_dtype(sd, UNET_PREFIX)
    load_device = comfy.model_management.get_torch_device()
    unet_dtype = comfy.model_management.unet_dtype(model_params=parameters, weight_dtype=weight_dtype,
                                                   supported_dtypes=list(config.supported_inference_dtypes))
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(unet_dtype, manual_cast)

    # UNet (with camera_embed): every weight must be used and every parameter given.
    initial_device = comfy.model_management.unet_inital_load_device(parameters, unet_dtype)
    model = config.get_model(sd, UNET_PREFIX, device=initial_device)
    unet_sd = comfy.utils.state_dict_prefix_replace(sd, {UNET_PREFIX: ""}, filter_keys=True)
    missing, unexpected = model.diffusion_model.load_state_dict(unet_sd, strict=False)
    _check_keys("UNet", name, [UNET_PREFIX + k for k in missing], [UNET_PREFIX + k for k in unexpected])
    del unet_sd

    # VAE (ComfyUI's detection picks the architecture from the keys).
    vae_sd = comfy.utils.state_dict_prefix_replace(sd, {VAE_PREFIX: ""}, filter_keys=True)
    vae = comfy.sd.VAE(sd=dict(vae_sd), metadata=metadata)
    if vae.first_stage_model is None:
        raise CheckpointError(f"{name}: the VAE weights under '{VAE_PREFIX}' are not a VAE ComfyUI recognises "
                              f"(a key it detects the architecture by is missing).")
    expected = set(vae.first_stage_model.state_dict())
    _check_keys("VAE", name, [VAE_PREFIX + k for k in expected - set(vae_sd)],
                [VAE_PREFIX + k for k in set(vae_sd) - expected])

    # Text encoder, converted to ComfyUI's CLIP layout by the stock SD1.5/SD2.x key conversion.
    clip_sd = config.process_clip_state_dict(sd)
    clip = comfy.sd.CLIP(config.clip_target(state_dict=clip_sd), embedding_directory=embedding_directory,
                         tokenizer_data=clip_sd, parameters=comfy.utils.calculate_parameters(clip_sd))
    missing, unexpected = clip.load_sd(clip_sd, full_model=True)
    missing = [k for k in missing if not k.endswith(UNUSED_TEXT_KEYS + ("text_projection.weight",))]
    unexpected = [k for k in unexpected if not k.endswith(UNUSED_TEXT_KEYS)]

    def original(key: str) -> str:  # ComfyUI's name -> the checkpoint's prefix (layout inside may differ)
        return config.text_prefix + key[len(config.clip_prefix):] if key.startswith(config.clip_prefix) else key

    _check_keys("text encoder", name, [original(k) for k in missing], [original(k) for k in unexpected])

    # Keys outside the three parts (and not known non-weights) are unexpected.
    parts = (UNET_PREFIX, VAE_PREFIX, config.text_prefix)
    left = [k for k in all_keys if not k.startswith(parts + IGNORED_PREFIXES) and k not in SCHEDULE_KEYS]
    _check_keys("checkpoint", name, [], left)

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "compose3d_mvdream",
                                 _checked_sampling)
    logging.info("Compose3D: loaded MVDream %s (%s, %d UNet parameters, %s)", name, config_class.__name__,
                 parameters, unet_dtype)
    return patcher, clip, vae
