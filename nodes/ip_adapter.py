"""Image prompts for SD-family MODELs in the IP-Adapter layout: a loader and an apply node.

The adapter's image cross-attention runs inside an ``attn2`` replace patch on every transformer block of a clone
of the MODEL (:func:`nodes.attention_patch.patch_unet_attention`): the patch returns the text attention (the
patch installed before, or ComfyUI's) plus ``weight`` times the attention of the same queries over the image
tokens; the layer's ``to_out`` then applies to the sum, as in diffusers' ``IPAdapterAttnProcessor``.
Adapter layer i (diffusers' order: down, up, middle) is mapped onto ComfyUI's block keys by
:func:`kernels.ip_adapter.diffusers_layer_order`, so the middle block gets its own weights (``ip_adapter.31`` on
SD1.5).

Classifier-free guidance: conditional batch entries attend to the image's tokens, unconditional ones to the tokens
of a zero embedding (what diffusers' pipelines feed as the negative image prompt). ComfyUI tells the patch which
entries are which through ``transformer_options["cond_or_uncond"]``.

Works on MVDream too (its cross-attention is per view): sd-v1.5-4view has SD1.5's layers and 768-wide context, so
an SD1.5 adapter gives it an image prompt.

Folders: adapters are read from the ``ipadapter`` models folder (registered here if no other pack has) and from
``output/ipadapter``, where the identity tuner writes tuned adapters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

import folder_paths
from comfy.ldm.modules.attention import optimized_attention
from comfy_api.latest import io

from ..kernels.ip_adapter import AdapterFileError, IPAdapter, diffusers_layer_order
from .attention_patch import AttentionFn, BlockKey, patch_unet_attention, unet_transformer_block, \
    unet_transformer_blocks
from .types import CATEGORY, IPAdapterType
from .validation import Compose3DNode, InputError, read_model_file

FOLDER = "ipadapter"
#: Sub-folder of the output directory where tuned adapters and LoRAs are written (and listed by the loaders).
OUTPUT_ADAPTERS = "ipadapter"
OUTPUT_LORAS = "loras"


def register_folders() -> None:
    """Make sure the ``ipadapter`` model folder exists in ComfyUI's registry and that ``output/ipadapter`` and
    ``output/loras`` are listed by the adapter loader and by core LoRA loaders (idempotent; the output directory
    is read now, so a later ``--output-directory`` is followed)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                       set(folder_paths.supported_pt_extensions))
    output = folder_paths.get_output_directory()
    folder_paths.add_model_folder_path(FOLDER, os.path.join(output, OUTPUT_ADAPTERS))
    folder_paths.add_model_folder_path("loras", os.path.join(output, OUTPUT_LORAS))


# ------------------------------------------------------------------------------------------------- the patch

@dataclass
class ImagePrompt:
    """What the attention patches of one applied adapter share.

    Attributes:
        adapter: the adapter (its weights are read at every call, so a training updates them in place).
        cond: (N, T, C) or (1, N * T, C) image tokens of conditional entries: one row for the whole batch, or
            one row per entry of a conditional chunk (the identity tuner's per-view prompts).
        uncond: image tokens of unconditional entries (a zero embedding's), same layout.
        weight: how strongly the image attention is added.
    """

    adapter: IPAdapter
    cond: Tensor
    uncond: Tensor
    weight: float

    def tokens_for(self, batch: int, extra_options: dict, device, dtype) -> Tensor:
        """(batch, L, C) tokens for a patch call: chunk by chunk from ``cond_or_uncond`` when ComfyUI gives it."""
        chunks = extra_options.get("cond_or_uncond") or [0]
        if batch % len(chunks):
            chunks = [0]
        per = batch // len(chunks)
        rows = []
        for kind in chunks:
            tokens = self.uncond if kind == 1 else self.cond
            if tokens.shape[0] not in (1, per):
                raise ValueError(f"image prompt: {tokens.shape[0]} token rows for a batch chunk of {per}")
            rows.append(tokens.expand(per, -1, -1))
        return torch.cat(rows).to(device, dtype)


def make_ip_patch(prompt: ImagePrompt, index: int, fallback: AttentionFn) -> AttentionFn:
    """The ``attn2`` replacement of adapter layer ``index``: text attention + weight * image attention."""
    def patch(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        out = fallback(q, k, v, extra_options)
        if prompt.weight == 0:
            return out
        tokens = prompt.tokens_for(q.shape[0], extra_options, q.device, q.dtype)
        k_ip, v_ip = prompt.adapter.keys_values(index, tokens)
        image = optimized_attention(q, k_ip, v_ip, extra_options["n_heads"],
                                    attn_precision=extra_options.get("attn_precision"))
        return out + prompt.weight * image

    return patch


def adapter_blocks(model, adapter: IPAdapter, what: str = "ipadapter") -> list[BlockKey]:
    """The MODEL's transformer blocks in adapter-layer order, after checking that the adapter fits the UNet.

    Raises:
        InputError (naming ``what``): not an SD-style UNet, another number of cross-attention layers, another
        query width at some layer, or another text-context width than the adapter was made for.
    """
    unet = model.model.diffusion_model
    try:
        blocks = diffusers_layer_order(unet_transformer_blocks(unet))
    except ValueError:
        raise InputError(f"model: image prompts need an SD-style UNet (SD1.x, SD2.x, MVDream); this MODEL is "
                         f"{type(unet).__name__}") from None
    layout = adapter.layout
    if len(blocks) != len(layout.layer_widths):
        raise InputError(f"{what}: the adapter has {len(layout.layer_widths)} image cross-attention layers but the "
                         f"model has {len(blocks)} cross-attention layers; use an adapter made for this model "
                         f"family (e.g. an SD1.5 adapter for SD1.5 and MVDream sd-v1.5-4view)")
    context = unet_transformer_block(unet, blocks[0]).attn2.to_k.in_features
    if context != layout.cross_dim:
        raise InputError(f"{what}: the adapter was made for a {layout.cross_dim}-wide text context but this model's "
                         f"is {context} wide (768: SD1.5 and MVDream sd-v1.5-4view; 1024: SD2.x); use an adapter "
                         f"made for this model family")
    wrong = []
    for i, key in enumerate(blocks):
        width = unet_transformer_block(unet, key).attn2.to_q.out_features
        if width != layout.layer_widths[i]:
            wrong.append(f"layer {i} ({key[0]} block {key[1]}): adapter {layout.layer_widths[i]}, model {width}")
    if wrong:
        raise InputError(f"{what}: the adapter's widths do not fit the model: " + "; ".join(wrong[:4]))
    return blocks


def check_embeds(embeds: Tensor, adapter: IPAdapter, what: str = "clip_vision_output") -> None:
    """Refuse image embeddings of another width than the adapter takes (another image encoder)."""
    if embeds.ndim != 2 or embeds.shape[1] != adapter.layout.embed_dim:
        raise InputError(f"{what}: the image embeddings are {tuple(embeds.shape)[1:]} wide but the adapter takes "
                         f"{adapter.layout.embed_dim} (ViT-H gives 1024, ViT-L 768, ViT-bigG 1280); encode with "
                         f"the image encoder the adapter was trained with")


def image_prompt(adapter: IPAdapter, embeds: Tensor, weight: float) -> ImagePrompt:
    """The prompt of N images: their tokens side by side (1, N * T, C); the negative uses zero embeddings."""
    with torch.inference_mode(False), torch.no_grad():
        embeds = embeds.detach().float().cpu().clone()
        cond = adapter.image_tokens(embeds).reshape(1, -1, adapter.layout.cross_dim)
        uncond = adapter.image_tokens(torch.zeros_like(embeds)).reshape(1, -1, adapter.layout.cross_dim)
    return ImagePrompt(adapter, cond, uncond, float(weight))


def apply_image_prompt(model, prompt: ImagePrompt, blocks: list[BlockKey]):
    """A clone of ``model`` whose cross-attention layers add ``prompt``'s image attention."""
    index = {key: i for i, key in enumerate(blocks)}
    patched = model.clone()
    patched.model_options = patch_unet_attention(
        patched.model_options, patched.model.diffusion_model, "attn2",
        lambda key, fallback: make_ip_patch(prompt, index[key], fallback))
    return patched


# ------------------------------------------------------------------------------------------------------ nodes

class IPAdapterLoader(Compose3DNode):
    """An IP-Adapter file (released basic layout) -> C3D_IP_ADAPTER."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folders()
        return io.Schema(
            node_id="Compose3D_IPAdapterLoader",
            display_name="Load IP-Adapter",
            category=f"{CATEGORY}/make_your_3d",
            description="Loads an image-prompt adapter in the released IP-Adapter layout (image_proj + "
                        "ip_adapter.N.to_k_ip/to_v_ip, e.g. ip-adapter_sd15.safetensors) from models/ipadapter "
                        "or output/ipadapter (where Identity Tuner writes tuned adapters).",
            inputs=[io.Combo.Input("ipadapter_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="The adapter file. SD1.5 adapters also fit MVDream sd-v1.5-4view.")],
            outputs=[IPAdapterType.Output(display_name="IPADAPTER",
                                          tooltip="The loaded adapter, for Apply IP-Adapter or Identity Tuner.")],
        )

    @classmethod
    def execute(cls, ipadapter_name: str) -> io.NodeOutput:
        register_folders()
        path = folder_paths.get_full_path_or_raise(FOLDER, ipadapter_name)
        sd, _ = read_model_file(path)
        try:
            with torch.inference_mode(False):
                adapter = IPAdapter.from_state_dict(sd, name=ipadapter_name)
        except AdapterFileError as e:
            raise InputError(f"ipadapter_name: {e}") from None
        return io.NodeOutput(adapter)


class ApplyIPAdapter(Compose3DNode):
    """MODEL + adapter + image embedding -> MODEL whose cross-attention also attends to the image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Compose3D_ApplyIPAdapter",
            display_name="Apply IP-Adapter",
            category=f"{CATEGORY}/make_your_3d",
            description="Gives an SD-family MODEL (SD1.x/SD2.x or MVDream) an image prompt: every cross-attention "
                        "layer, the middle block's included, also attends to the image's tokens. Encode the "
                        "image with core 'CLIP Vision Encode' using the image encoder the adapter was trained "
                        "with. Several images in the batch prompt together.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x or MVDream model to give the image prompt."),
                IPAdapterType.Input("ipadapter", tooltip="The image-prompt adapter (from Load IP-Adapter)."),
                io.ClipVisionOutput.Input("clip_vision_output",
                                          tooltip="From CLIP Vision Encode (crop 'center' or 'none')."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.05,
                               tooltip="How strongly the image prompt acts (0: not at all; 1: as trained)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL",
                                     tooltip="A copy of the model whose cross-attention also attends to the image.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision_output, weight: float) -> io.NodeOutput:
        blocks = adapter_blocks(model, ipadapter)
        embeds = clip_vision_output.image_embeds
        check_embeds(embeds, ipadapter)
        return io.NodeOutput(apply_image_prompt(model, image_prompt(ipadapter, embeds, weight), blocks))
