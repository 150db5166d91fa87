"""Attention maths shared by every mechanism that looks into or steers a diffusion model's attention (no comfy).

* :func:`attention`: scaled dot-product attention written out, with an optional additive logit bias and the
  head-averaged probabilities of chosen key columns, computed in chunks of queries so memory stays bounded.
  The explicit form is what capture (the refocus sampler, SD3 part maps) and modulation (logit biases) need;
  plain inference keeps the model's own fast attention.
* :func:`selected_probabilities` / :func:`selected_scores`: only the kept key columns' probabilities (exact,
  softmax over all keys) or raw scores, chunked over queries, to read next to a model's own attention call
  (the SD3 capture: the model's output stays its own).
* Multi-view folding (MVDream): the tokens of the V views of one object attend to each other, so before
  self-attention ``(b v) l c -> b (v l) c`` and after it back. Views of one object are contiguous in the batch.

Layout follows ComfyUI's attention functions: heads are packed in the channel dimension, ``(B, L, H * D)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_shape

#: Most logits (B x H x queries x keys) one chunk of :func:`attention` holds: 2^25 floats, 128 MiB in float32.
CHUNK_LOGITS = 1 << 25


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, logit_bias: Tensor | None = None,
              keep: Tensor | slice | None = None, chunk_logits: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``softmax(q k^T / sqrt(D) + logit_bias) v`` per head, and the probabilities of the kept key columns.

    Args:
        q: (B, Lq, H * D) queries; k: (B, Lk, H * D) keys; v: (B, Lk, H * Dv) values (heads packed in channels).
        heads: H.
        logit_bias: None or a tensor broadcastable to (B, H, Lq, Lk), added to the scaled logits before the
            softmax (``-inf`` masks a key out; a row must keep at least one finite logit).
        keep: None (no probabilities returned), ``slice(None)`` (every key column), another slice, or a (K,)
            long tensor of key columns.
        chunk_logits: most logits per chunk of queries (default :data:`CHUNK_LOGITS`); at least one query row
            per chunk. Chunking changes nothing but peak memory.

    Returns:
        out: (B, Lq, H * Dv), dtype of the inputs' computation (no casting is done here).
        probs: (B, Lq, K) the attention probabilities of the kept columns averaged over heads, or None.

    Differentiable w.r.t. q, k, v and ``logit_bias``.

    >>> q = torch.zeros(1, 2, 4); k = torch.randn(1, 3, 4); v = torch.eye(3).repeat(1, 1, 2)[:, :, :4]
    >>> out, probs = attention(q, k, v, heads=2, keep=slice(None))
    >>> probs  # equal logits: uniform over the three keys
    tensor([[[0.3333, 0.3333, 0.3333],
             [0.3333, 0.3333, 0.3333]]])
    """
    b, lq, lk, channels = _qkv_sizes(q, k, v, heads)
    dim = channels // heads
    qh = q.reshape(b, lq, heads, dim).transpose(1, 2)  # (B, H, Lq, D)
    kh = k.reshape(b, lk, heads, dim).transpose(1, 2)
    vh = v.reshape(b, lk, heads, -1).transpose(1, 2)  # (B, H, Lk, Dv)
    per_row = b * heads * lk
    rows = max(1, (chunk_logits or CHUNK_LOGITS) // per_row)
    outs, kept = [], []
    for start in range(0, lq, rows):
        stop = min(start + rows, lq)
        logits = qh[:, :, start:stop] @ kh.transpose(-1, -2) * dim ** -0.5  # (B, H, rows, Lk)
        if logit_bias is not None:
            logits = logits + _rows(logit_bias, start, stop, lq)
        probs = torch.softmax(logits, dim=-1)
        outs.append(probs @ vh)
        if keep is not None:
            kept.append(probs[..., keep].mean(dim=1))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    out = out.transpose(1, 2).reshape(b, lq, -1)
    if keep is None:
        return out, None
    return out, torch.cat(kept, dim=1) if len(kept) > 1 else kept[0]


def biased_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, logit_bias: Tensor,
                     chunk_logits: int | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(D) + logit_bias) v`` per head through PyTorch's fused attention
    (``scaled_dot_product_attention`` with a float mask): the same result as :func:`attention` without its
    probabilities, several times faster, and no (B, H, Lq, Lk) matrix where a fused kernel runs.

    Args:
        q: (B, Lq, H * D); k: (B, Lk, H * D); v: (B, Lk, H * Dv).
        logit_bias: broadcastable to (B, H, Lq, Lk), e.g. (B, 1, Lq, Lk) shared by the heads.
        chunk_logits: queries are processed in chunks of at most this many logits (default :data:`CHUNK_LOGITS`),
            which bounds memory where PyTorch falls back to its unfused maths.

    Returns:
        (B, Lq, H * Dv) in the dtype of q (the bias is cast to it).
    """
    b, lq, lk, channels = _qkv_sizes(q, k, v, heads)
    qh = q.reshape(b, lq, heads, -1).transpose(1, 2)  # (B, H, Lq, D)
    kh = k.reshape(b, lk, heads, -1).transpose(1, 2)
    vh = v.reshape(b, lk, heads, -1).transpose(1, 2)
    bias = logit_bias.to(q.dtype)
    while bias.ndim < 4:
        bias = bias[None]
    rows = max(1, (chunk_logits or CHUNK_LOGITS) // (b * heads * lk))
    outs = [F.scaled_dot_product_attention(qh[:, :, start:start + rows], kh, vh,
                                           attn_mask=_rows(bias, start, min(start + rows, lq), lq))
            for start in range(0, lq, rows)]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).reshape(b, lq, -1)


def _qkv_sizes(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[int, int, int, int]:
    """(B, Lq, Lk, C) of (B, Lq, C) queries, (B, Lk, C) keys and (B, Lk, Cv) values, checked to split into
    ``heads`` heads."""
    sizes = check_shape("q", q, ("B", "Lq", "C"))
    check_shape("k", k, ("B", "Lk", "C"), sizes=sizes)
    check_shape("v", v, ("B", "Lk", "Cv"), sizes=sizes)
    if sizes["C"] % heads or sizes["Cv"] % heads:
        raise ValueError(f"heads: {heads} heads do not divide the {sizes['C']} query/key channels and "
                         f"{sizes['Cv']} value channels")
    return sizes["B"], sizes["Lq"], sizes["Lk"], sizes["C"]


def _rows(bias: Tensor, start: int, stop: int, lq: int) -> Tensor:
    """The query rows start..stop of a bias broadcastable to (B, H, Lq, Lk)."""
    if bias.ndim >= 2 and bias.shape[-2] == lq and lq > 1:
        return bias[..., start:stop, :]
    return bias


def selected_probabilities(q: Tensor, k: Tensor, heads: int, keep: Tensor | slice,
                           chunk_logits: int | None = None) -> Tensor:
    """The head-averaged attention probabilities of the kept key columns, without the attention output.

    ``softmax(q k^T / sqrt(D))`` per head over **all** Lk keys (exact probabilities), averaged over heads, then
    only the columns ``keep``. For reading a model's attention next to its own fast attention call: the
    output comes from the model, the probabilities from here. Chunked over queries like :func:`attention`:
    memory is one chunk of logits plus the (B, Lq, K) result.

    Args:
        q: (B, Lq, H * D) queries; k: (B, Lk, H * D) keys (heads packed in channels).
        keep: a (K,) long tensor of key columns, or a slice.

    Returns:
        (B, Lq, K) in the inputs' dtype; each row's entries are >= 0 and sum to at most 1.

    >>> q = torch.zeros(1, 2, 4); k = torch.randn(1, 3, 4)
    >>> selected_probabilities(q, k, heads=2, keep=torch.tensor([0, 2]))
    tensor([[[0.3333, 0.3333],
             [0.3333, 0.3333]]])
    """
    sizes = check_shape("q", q, ("B", "Lq", "C"))
    check_shape("k", k, ("B", "Lk", "C"), sizes=sizes)
    b, lq, lk, channels = sizes["B"], sizes["Lq"], sizes["Lk"], sizes["C"]
    if channels % heads:
        raise ValueError(f"heads: {heads} heads do not divide the {channels} query/key channels")
    dim = channels // heads
    qh = q.reshape(b, lq, heads, dim).transpose(1, 2)  # (B, H, Lq, D)
    kh = k.reshape(b, lk, heads, dim).transpose(1, 2)
    kept_keys = kh[:, :, keep]  # (B, H, K, D)
    rows = max(1, (chunk_logits or CHUNK_LOGITS) // (b * heads * lk))
    kept = []
    for start in range(0, lq, rows):
        qc = qh[:, :, start:start + rows] * dim ** -0.5
        norm = torch.logsumexp(qc @ kh.transpose(-1, -2), dim=-1, keepdim=True)  # (B, H, rows, 1)
        kept.append(torch.exp(qc @ kept_keys.transpose(-1, -2) - norm).mean(dim=1))
    return torch.cat(kept, dim=1) if len(kept) > 1 else kept[0]


def selected_scores(q: Tensor, k: Tensor, keep: Tensor | slice) -> Tensor:
    """Raw attention scores with the heads merged: ``q . k`` over all H * D channels for the kept key columns.

    No softmax and no scale (DreamBeast's official map reads these and min-max normalises them, so a constant
    scale cancels). q: (B, Lq, C), k: (B, Lk, C) -> (B, Lq, K).
    """
    sizes = check_shape("q", q, ("B", "Lq", "C"))
    check_shape("k", k, ("B", "Lk", "C"), sizes=sizes)
    return q @ k[:, keep].transpose(-1, -2)


def views_to_sequence(x: Tensor, views: int) -> Tensor:
    """(B * V, L, C) -> (B, V * L, C): one sequence holding every view of an object."""
    bv, length, channels = x.shape
    if bv % views:
        raise ValueError(f"views: the batch of {bv} is not a multiple of {views} views")
    return x.reshape(bv // views, views * length, channels)


def sequence_to_views(x: Tensor, views: int) -> Tensor:
    """(B, V * L, C) -> (B * V, L, C), the inverse of :func:`views_to_sequence`."""
    b, vl, channels = x.shape
    return x.reshape(b * views, vl // views, channels)
