"""Image prompts in the IP-Adapter layout: decoupled image cross-attention, framework-free.

An IP-Adapter adds, next to every cross-attention layer of an SD UNet, a second attention over *image tokens*:

    out = Attention(q, K_text, V_text) + weight * Attention(q, to_k_ip(tokens), to_v_ip(tokens))

with the same queries and heads, before the layer's ``to_out``. The image tokens come from an image encoder's
embedding: ``tokens = LayerNorm(reshape(proj(image_embeds), (T, C)))`` (the "basic" adapter: T = 4 tokens of the
text context's width C). Only ``to_k_ip``/``to_v_ip`` (one pair per layer) and the projection are the adapter's;
identity-aware tuning (Make-Your-3D) trains the ``to_k_ip``/``to_v_ip`` pairs and nothing else.

The released safetensors layout (``ip-adapter_sd15.safetensors``):

* ``image_proj.proj.weight`` (T * C, E), ``image_proj.proj.bias`` (T * C,), ``image_proj.norm.weight`` / ``.bias``
  (C,); E is the image encoder's embedding width (1024 for ViT-H, 768 for ViT-L).
* ``ip_adapter.{2 i + 1}.to_k_ip.weight`` / ``.to_v_ip.weight`` (W_i, C) for the i-th cross-attention layer in
  diffusers' processor order: down blocks, up blocks, then the middle block (even indices were the self-attention
  processors, which have no weights). :func:`diffusers_layer_order` maps that order onto ComfyUI's blocks.

"Plus" adapters (a Resampler with learned queries, ``image_proj.latents``) and FaceID variants are other layouts;
:func:`read_layout` names them and refuses them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PROJ_WEIGHT = "image_proj.proj.weight"
PROJ_BIAS = "image_proj.proj.bias"
NORM_WEIGHT = "image_proj.norm.weight"
NORM_BIAS = "image_proj.norm.bias"
_LAYER_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
#: Keys that mark adapter layouts this module does not implement, and what they are.
_OTHER_LAYOUTS = {"image_proj.latents": "IP-Adapter Plus (Resampler image projection)",
                  "image_proj.proj.0.weight": "IP-Adapter FaceID / full-face (MLP image projection)",
                  "image_proj.perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus"}


class AdapterFileError(ValueError):
    """An adapter file that is not a complete basic IP-Adapter; the message names the keys."""


@dataclass(frozen=True)
class AdapterLayout:
    """The shapes of a basic IP-Adapter.

    Attributes:
        tokens: image tokens T per image.
        cross_dim: token width C (the text context width of the UNet it was made for: 768 SD1.5, 1024 SD2.x).
        embed_dim: image-embedding width E it takes (the ``image_embeds`` of its image encoder).
        layer_widths: W_i, the query width of each cross-attention layer, in diffusers' order.
    """

    tokens: int
    cross_dim: int
    embed_dim: int
    layer_widths: tuple[int, ...]


def layer_key(index: int, which: str) -> str:
    """The file key of layer ``index`` (0-based, diffusers' order) for ``which`` = "to_k_ip" | "to_v_ip"."""
    return f"ip_adapter.{2 * index + 1}.{which}.weight"


def read_layout(sd: Mapping[str, Tensor], name: str = "adapter") -> AdapterLayout:
    """The layout of an adapter state dict, after checking that every key is there with a consistent shape.

    Raises:
        AdapterFileError: a layout this module does not implement, missing keys, unexpected keys or shapes that
            do not fit together, each named (``name`` starts the message).
    """
    for key, what in _OTHER_LAYOUTS.items():
        if key in sd:
            raise AdapterFileError(f"{name}: this is an {what} file; only basic IP-Adapter files "
                                   f"(image_proj.proj + image_proj.norm, e.g. ip-adapter_sd15) are supported")
    missing = [k for k in (PROJ_WEIGHT, PROJ_BIAS, NORM_WEIGHT, NORM_BIAS) if k not in sd]
    indices = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, sd) if m})
    if not indices:
        missing.append("ip_adapter.1.to_k_ip.weight (and the other layers)")
    count = (max(indices) + 1) // 2 if indices else 0
    for i in range(count):
        missing += [layer_key(i, w) for w in ("to_k_ip", "to_v_ip") if layer_key(i, w) not in sd]
    known = {PROJ_WEIGHT, PROJ_BIAS, NORM_WEIGHT, NORM_BIAS} | {layer_key(i, w) for i in range(count)
                                                               for w in ("to_k_ip", "to_v_ip")}
    unexpected = sorted(k for k in sd if k not in known)
    problems = []
    if missing:
        problems.append(f"missing key(s) {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_names(unexpected)}")
    if problems:
        raise AdapterFileError(f"{name}: not a complete IP-Adapter file: " + "; ".join(problems))

    shapes = []
    norm = sd[NORM_WEIGHT]
    cross = int(norm.shape[0]) if norm.ndim == 1 else -1
    proj = sd[PROJ_WEIGHT]
    if cross <= 0 or sd[NORM_BIAS].shape != norm.shape:
        shapes.append(f"{NORM_WEIGHT} {tuple(norm.shape)} / {NORM_BIAS} {tuple(sd[NORM_BIAS].shape)} "
                      f"(expected two (C,) vectors)")
    if proj.ndim != 2 or cross <= 0 or proj.shape[0] % cross:
        shapes.append(f"{PROJ_WEIGHT} {tuple(proj.shape)} (expected (tokens * {cross}, E))")
    elif sd[PROJ_BIAS].shape != (proj.shape[0],):
        shapes.append(f"{PROJ_BIAS} {tuple(sd[PROJ_BIAS].shape)} (expected ({proj.shape[0]},))")
    widths = []
    for i in range(count):
        k, v = sd[layer_key(i, "to_k_ip")], sd[layer_key(i, "to_v_ip")]
        if k.ndim != 2 or k.shape[1] != cross:
            shapes.append(f"{layer_key(i, 'to_k_ip')} {tuple(k.shape)} (expected (W, {cross}))")
        elif v.shape != k.shape:
            shapes.append(f"{layer_key(i, 'to_v_ip')} {tuple(v.shape)} (expected {tuple(k.shape)} like to_k_ip)")
        widths.append(int(k.shape[0]))
    if shapes:
        raise AdapterFileError(f"{name}: mismatched shape(s): " + "; ".join(shapes))
    return AdapterLayout(tokens=int(proj.shape[0]) // cross, cross_dim=cross, embed_dim=int(proj.shape[1]),
                         layer_widths=tuple(widths))


def _names(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


class ImageProjection(nn.Module):
    """(N, E) image embeddings -> (N, T, C) image tokens: ``LayerNorm(reshape(proj(e), (T, C)))``."""

    def __init__(self, embed_dim: int, tokens: int, cross_dim: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class IPAdapter(nn.Module):
    """A basic IP-Adapter: the image projection and one ``to_k_ip``/``to_v_ip`` pair per cross-attention layer
    (index i in diffusers' order). Float32 parameters; build it with :meth:`from_state_dict`."""

    def __init__(self, layout: AdapterLayout):
        super().__init__()
        self.layout = layout
        self.image_proj = ImageProjection(layout.embed_dim, layout.tokens, layout.cross_dim)
        self.to_k_ip = nn.ModuleList(nn.Linear(layout.cross_dim, w, bias=False) for w in layout.layer_widths)
        self.to_v_ip = nn.ModuleList(nn.Linear(layout.cross_dim, w, bias=False) for w in layout.layer_widths)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], name: str = "adapter") -> "IPAdapter":
        """The adapter of a released-layout state dict (checked by :func:`read_layout`), in float32 on the CPU."""
        adapter = cls(read_layout(sd, name))
        with torch.no_grad():
            adapter.image_proj.proj.weight.copy_(sd[PROJ_WEIGHT])
            adapter.image_proj.proj.bias.copy_(sd[PROJ_BIAS])
            adapter.image_proj.norm.weight.copy_(sd[NORM_WEIGHT])
            adapter.image_proj.norm.bias.copy_(sd[NORM_BIAS])
            for i in range(len(adapter.to_k_ip)):
                adapter.to_k_ip[i].weight.copy_(sd[layer_key(i, "to_k_ip")])
                adapter.to_v_ip[i].weight.copy_(sd[layer_key(i, "to_v_ip")])
        return adapter.requires_grad_(False)

    def layout_state_dict(self) -> dict[str, Tensor]:
        """The weights in the released layout (CPU copies, contiguous), as :meth:`from_state_dict` reads them."""
        sd = {PROJ_WEIGHT: self.image_proj.proj.weight, PROJ_BIAS: self.image_proj.proj.bias,
              NORM_WEIGHT: self.image_proj.norm.weight, NORM_BIAS: self.image_proj.norm.bias}
        for i in range(len(self.to_k_ip)):
            sd[layer_key(i, "to_k_ip")] = self.to_k_ip[i].weight
            sd[layer_key(i, "to_v_ip")] = self.to_v_ip[i].weight
        return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in sd.items()}

    def cross_attention_parameters(self) -> list[nn.Parameter]:
        """The image cross-attention projections (every ``to_k_ip``/``to_v_ip`` weight): what identity tuning
        trains."""
        return [m.weight for m in (*self.to_k_ip, *self.to_v_ip)]

    def image_tokens(self, embeds: Tensor) -> Tensor:
        """(N, E) embeddings of N images -> (N, T, C) tokens (float32, on the adapter's device)."""
        if embeds.ndim != 2 or embeds.shape[1] != self.layout.embed_dim:
            raise ValueError(f"image embeddings: expected (N, {self.layout.embed_dim}), got {tuple(embeds.shape)}")
        param = self.image_proj.proj.weight
        return self.image_proj(embeds.to(param.device, param.dtype))

    def keys_values(self, index: int, tokens: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Layer ``index``'s image keys and values for (B, L, C) tokens: two (B, L, W_index) tensors, computed
        in ``dtype`` (default: the tokens'), on the tokens' device. The weights are cast at each call (a few MB for
        SD1.5: no device copy is kept), differentiably, so a training's gradients reach the parameters."""
        dtype = tokens.dtype if dtype is None else dtype
        wk = self.to_k_ip[index].weight.to(tokens.device, dtype)
        wv = self.to_v_ip[index].weight.to(tokens.device, dtype)
        tokens = tokens.to(dtype)
        return torch.nn.functional.linear(tokens, wk), torch.nn.functional.linear(tokens, wv)


def diffusers_layer_order(blocks: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """ComfyUI transformer-block keys (block name "input" | "middle" | "output", number, index) in diffusers'
    processor order: every input block's, then every output block's, then the middle block's (diffusers registers
    ``down_blocks``, ``up_blocks`` and then ``mid_block``). Layer i of an adapter belongs to entry i.

    >>> diffusers_layer_order([("input", 1, 0), ("middle", 0, 0), ("output", 0, 0), ("input", 3, 0)])
    [('input', 1, 0), ('input', 3, 0), ('output', 0, 0), ('middle', 0, 0)]
    """
    rank = {"input": 0, "output": 1, "middle": 2}
    unknown = [b for b in blocks if b[0] not in rank]
    if unknown:
        raise ValueError(f"blocks: unknown block names {unknown}")
    return sorted(blocks, key=lambda b: (rank[b[0]], b[1], b[2]))
