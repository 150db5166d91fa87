"""Hooks into a ComfyUI diffusion model's attention: one place for every mechanism that captures or steers it.

SD-style UNets (SD1.x/2.x, MVDream): ComfyUI calls an ``attn1``/``attn2`` *replace patch* ``fn(q, k, v,
extra_options)`` with q/k/v (B, L, H * D) from the layer's ``to_q/to_k/to_v``, and applies ``to_out`` to what it
returns. :func:`patch_unet_attention` installs one on every transformer block under ComfyUI's most specific key
(block, number, index), so it wins over patches registered per block, and hands the patch that was there (or
ComfyUI's own attention) to the new one as its fallback.

The multi-view trap: an attn1 replace patch never enters ``attn1.forward``, so on MVDream it would silently drop
the cross-view folding of :class:`nodes.mvdream_model.MultiViewAttention`. MVDream's UNet therefore wraps every
attn1 replacement it is run with in :func:`fold_views` (ours and other packs'): the patch sees one sequence per
object, (B, V * L, H * D), exactly the tensors MVDream's own attention attends over.

SD3 (MMDiT) has no per-layer replace patches; :func:`patch_mmdit_attention` uses ComfyUI's recipe: a
``("dit", "double_block", i)`` replacement runs the original block with a tagged copy of ``transformer_options``
(block index, text length), and ``transformer_options["optimized_attention_override"]`` hands the tagged joint
attention calls to the handler; every other call goes to the override that was installed before, or to ComfyUI's
attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

import comfy.model_patcher
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..kernels.attention import attention, sequence_to_views, views_to_sequence
from .types import VIEWS_OPTION

#: ComfyUI's replace-patch signature: (q, k, v, extra_options) -> (B, Lq, H * Dv) attention output before to_out.
AttentionFn = Callable[[Tensor, Tensor, Tensor, dict], Tensor]
#: (block name, block number, index of the transformer block inside it), as ComfyUI keys attention patches.
BlockKey = tuple[str, int, int]

#: transformer_options key of the tag that :func:`patch_mmdit_attention`'s block patches put on a copy.
MMDIT_TAG = "c3d_mmdit_block"


# ------------------------------------------------------------------------------------------------- SD UNets

def unet_transformer_blocks(diffusion_model) -> list[BlockKey]:
    """(block, number, index) of every transformer block of an SD-style UNet, in the order the UNet runs them.

    Raises:
        ValueError: the model is not an SD-style UNet (no ``input_blocks``), e.g. SD3's MMDiT.
    """
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError(f"{type(diffusion_model).__name__} is not an SD-style UNet")
    found = []
    groups = [("input", i, b) for i, b in enumerate(diffusion_model.input_blocks)] + \
             [("middle", 0, diffusion_model.middle_block)] + \
             [("output", i, b) for i, b in enumerate(diffusion_model.output_blocks)]
    for name, number, block in groups:
        for layer in block or ():  # a UNet may have no middle block
            if isinstance(layer, SpatialTransformer):
                found += [(name, number, index) for index in range(len(layer.transformer_blocks))]
    return found


def unet_transformer_block(diffusion_model, key: BlockKey):
    """The ``BasicTransformerBlock`` at ``key`` (block name, number, index) of an SD-style UNet."""
    name, number, index = key
    block = diffusion_model.middle_block if name == "middle" else \
        getattr(diffusion_model, f"{name}_blocks")[number]
    for layer in block:
        if isinstance(layer, SpatialTransformer):
            return layer.transformer_blocks[index]
    raise KeyError(f"no transformer block at {key}")


def comfy_attention(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
    """ComfyUI's own attention for a replace patch's arguments (what the layer runs when nothing is patched)."""
    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def installed_patch(model_options: dict, which: str, key: BlockKey) -> AttentionFn | None:
    """The ``which`` ("attn1"/"attn2") replacement ComfyUI would run at ``key`` today, or None."""
    patches = model_options.get("transformer_options", {}).get("patches_replace", {}).get(which, {})
    return patches.get(key, patches.get(key[:2]))


def patch_unet_attention(model_options: dict, diffusion_model, which: str,
                         make_patch: Callable[[BlockKey, AttentionFn], AttentionFn]) -> dict:
    """A copy of ``model_options`` with a ``which`` replacement on every transformer block of the UNet.

    Args:
        model_options: a ModelPatcher's (or a sampling run's) model options; not changed.
        diffusion_model: the UNet (``model.model.diffusion_model``), to list its blocks.
        which: "attn1" (self-attention) or "attn2" (cross-attention).
        make_patch: ``(key, fallback) -> patch`` for each block; ``fallback`` is the replacement installed there
            before, or :func:`comfy_attention`; a patch that does not handle a call returns ``fallback(...)``.

    On MVDream, attn1 patches get the views of an object folded into one sequence (see the module notes).
    """
    if which not in ("attn1", "attn2"):
        raise ValueError(f"which: expected 'attn1' or 'attn2', got {which!r}")
    options = comfy.model_patcher.create_model_options_clone(model_options)
    options.setdefault("transformer_options", {})
    for key in unet_transformer_blocks(diffusion_model):
        fallback = installed_patch(model_options, which, key) or comfy_attention
        options = comfy.model_patcher.set_model_options_patch_replace(options, make_patch(key, fallback), which,
                                                                       *key)
    return options


def fold_views(patch: AttentionFn) -> AttentionFn:
    """``patch`` run on one sequence per object: with ``extra_options[VIEWS_OPTION] = V > 1``, q/k/v
    (B * V, L, C) become (B, V * L, C) before the call and the output goes back to (B * V, L, C')."""
    if getattr(patch, "folds_views", False):
        return patch

    def folded(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        views = int(extra_options.get(VIEWS_OPTION, 1))
        if views <= 1:
            return patch(q, k, v, extra_options)
        out = patch(views_to_sequence(q, views), views_to_sequence(k, views), views_to_sequence(v, views),
                    extra_options)
        return sequence_to_views(out, views)

    folded.folds_views = True
    return folded


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, extra_options: dict, logit_bias: Tensor | None = None,
                       keep: Tensor | slice | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`kernels.attention.attention` in float32 for a replace patch's arguments; the output is cast back to
    q's dtype. Returns (out (B, Lq, H * Dv), head-averaged probabilities (B, Lq, K) of the kept keys or None)."""
    out, probs = attention(q.float(), k.float(), v.float(), extra_options["n_heads"], logit_bias, keep)
    return out.to(q.dtype), probs


# -------------------------------------------------------------------------------------------------- MMDiT

@dataclass(frozen=True)
class JointAttentionCall:
    """One joint (text + image) attention call of an MMDiT double block, as a handler sees it.

    ``q``/``k``/``v``: (B, Ltxt + Limg, H * D), text tokens first, qk-norm applied. ``default()`` runs the
    attention the model would have run (the previous override or ComfyUI's) on the same arguments.
    """
    block: int
    text_length: int
    heads: int
    q: Tensor
    k: Tensor
    v: Tensor
    transformer_options: dict
    default: Callable[[], Tensor]


def patch_mmdit_attention(model_options: dict, blocks: list[int],
                          handler: Callable[[JointAttentionCall], Tensor]) -> dict:
    """A copy of ``model_options`` whose MMDiT double blocks ``blocks`` send their joint attention to ``handler``.

    ``handler(call)`` returns the (B, Ltxt + Limg, H * Dv) attention output (``call.default()`` for ComfyUI's).
    Block replacements installed before are kept and run inside ours; other attention calls (untagged blocks,
    the image-only attention of MMDiT-X blocks) go to the override installed before, or ComfyUI's attention.
    """
    options = comfy.model_patcher.create_model_options_clone(model_options)
    transformer_options = options.setdefault("transformer_options", {})
    previous_override = transformer_options.get("optimized_attention_override")
    existing = transformer_options.get("patches_replace", {}).get("dit", {})

    def override(func, q, k, v, *args, **kwargs):
        def default():
            if previous_override is not None:
                return previous_override(func, q, k, v, *args, **kwargs)
            return func(q, k, v, *args, **kwargs)

        tag = (kwargs.get("transformer_options") or {}).get(MMDIT_TAG)
        heads = kwargs.get("heads", args[0] if args else None)
        if tag is None or q.shape[1] != tag[1] + tag[2] or heads is None:
            return default()
        # MMDiT hands v over unflattened, (B, L, H, D), next to qk-normed (B, L, H * D) q and k.
        flat_v = v.reshape(v.shape[0], v.shape[1], -1)
        return handler(JointAttentionCall(tag[0], tag[1], heads, q, k, flat_v, kwargs["transformer_options"],
                                          default))

    transformer_options["optimized_attention_override"] = override
    for index in blocks:
        options = comfy.model_patcher.set_model_options_patch_replace(
            options, _tagging_block(index, existing.get(("double_block", index))), "dit", "double_block", index)
    return options


def _tagging_block(index: int, inner):
    """A double-block replacement that runs the block (or ``inner``, the replacement installed before) with a
    copy of transformer_options tagged (block index, text length, image length)."""
    def block(args: dict, extra: dict) -> dict:
        tagged = dict(args["transformer_options"])
        tagged[MMDIT_TAG] = (index, args["txt"].shape[1], args["img"].shape[1])
        args = {**args, "transformer_options": tagged}
        if inner is not None:
            return inner(args, extra)
        return extra["original_block"](args)

    return block
