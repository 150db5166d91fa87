"""The attention kernel against softmax(q k^T / sqrt(d) + bias) v written out in float64, and MVDream's view
folding."""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels import attention as attention_module
from compose3d.kernels.attention import attention, biased_attention, sequence_to_views, views_to_sequence


def test_views_are_joined_into_one_sequence_per_object_and_split_back():
    x = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).reshape(8, 3, 5)  # 2 objects x 4 views, L=3
    seq = views_to_sequence(x, 4)
    assert seq.shape == (2, 12, 5)
    torch.testing.assert_close(seq[1, 3:6], x[5])  # object 1, view 1
    torch.testing.assert_close(sequence_to_views(seq, 4), x)
    with pytest.raises(ValueError, match="^views: the batch of 8 is not a multiple of 3 views"):
        views_to_sequence(x, 3)


def oracle(q, k, v, heads, bias=None):
    """Per head, in float64: out (B, Lq, H*Dv) and probabilities (B, H, Lq, Lk)."""
    b, lq, c = q.shape
    d = c // heads
    qh, kh = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k))
    vh = v.double().reshape(b, v.shape[1], heads, -1).transpose(1, 2)
    logits = torch.einsum("bhqd,bhkd->bhqk", qh, kh) / d ** 0.5
    if bias is not None:
        logits = logits + bias.double()
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, vh).transpose(1, 2).reshape(b, lq, -1), probs


def qkv(b=2, lq=37, lk=11, heads=3, d=8, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, heads * d, generator=g), torch.randn(b, lk, heads * d, generator=g),
            torch.randn(b, lk, heads * dv, generator=g))


@pytest.mark.parametrize("chunk_logits", [None, 1, 2 * 3 * 11 * 5, 10 ** 9])
def test_attention_is_the_softmax_formula_with_the_kept_probabilities_chunked_or_not(chunk_logits):
    q, k, v = qkv()
    keep = torch.tensor([0, 4, 10])
    out, probs = attention(q, k, v, 3, keep=keep, chunk_logits=chunk_logits)
    want_out, want_probs = oracle(q, k, v, 3)
    assert out.shape == (2, 37, 15) and probs.shape == (2, 37, 3)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.double(), want_probs.mean(dim=1)[..., keep], rtol=1e-5, atol=1e-7)
    all_out, all_probs = attention(q, k, v, 3, keep=slice(None), chunk_logits=chunk_logits)
    torch.testing.assert_close(all_probs.sum(dim=-1), torch.ones(2, 37))  # every column kept: rows sum to one
    assert attention(q, k, v, 3, chunk_logits=chunk_logits)[1] is None  # nothing kept, nothing returned


@pytest.mark.parametrize("shape", [(2, 3, 37, 11), (1, 3, 1, 11), (2, 1, 37, 11), (11,)])
def test_attention_adds_a_logit_bias_broadcast_over_batch_heads_and_queries(shape):
    q, k, v = qkv(seed=1)
    bias = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 3
    for chunk_logits in (None, 2 * 3 * 11 * 4):  # four query rows per chunk: the bias is sliced with them
        out, probs = attention(q, k, v, 3, logit_bias=bias, keep=slice(None), chunk_logits=chunk_logits)
        want_out, want_probs = oracle(q, k, v, 3, bias)
        torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs.double(), want_probs.mean(dim=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 1, 37, 11), (2, 3, 37, 11), (1, 1, 37, 11), (37, 11)])
def test_the_fused_biased_attention_is_the_softmax_formula_chunked_or_not(shape):
    q, k, v = qkv(seed=3)
    bias = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 3
    want, _ = oracle(q, k, v, 3, bias)
    for chunk_logits in (None, 2 * 3 * 11 * 4, 1):
        out = biased_attention(q, k, v, 3, bias, chunk_logits=chunk_logits)
        assert out.shape == (2, 37, 15) and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_a_minus_infinity_bias_masks_keys_out_and_gradients_reach_q_k_v_and_the_bias():
    q, k, v = qkv(b=1, lq=5, lk=4, heads=2, seed=3)
    bias = torch.zeros(4)
    bias[1] = float("-inf")
    _, probs = attention(q, k, v, 2, logit_bias=bias, keep=slice(None))
    assert float(probs[..., 1].abs().max()) == 0.0
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    bias = torch.zeros(1, 2, 5, 4, requires_grad=True)
    out, probs = attention(q, k, v, 2, logit_bias=bias, keep=torch.tensor([2]), chunk_logits=2 * 4 * 2)
    (out.square().sum() + probs.sum()).backward()
    for t in (q, k, v, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().max()) > 0


def test_chunks_bound_the_logits_held_at_once(monkeypatch):
    q, k, v = qkv(b=2, lq=100, lk=11, heads=3)
    sizes = []
    real_softmax = torch.softmax
    monkeypatch.setattr(attention_module.torch, "softmax",
                        lambda x, dim: sizes.append(x.numel()) or real_softmax(x, dim=dim))
    attention(q, k, v, 3, chunk_logits=2 * 3 * 11 * 16)
    assert max(sizes) <= 2 * 3 * 11 * 16 and sum(sizes) == 2 * 3 * 100 * 11 and len(sizes) == 7


def test_attention_refuses_shapes_that_do_not_fit_the_heads():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^heads: 5 heads do not divide the 24 query/key channels and 15 value"):
        attention(q, k, v, 5)
    with pytest.raises(ValueError, match=r"^k: expected shape \(B, Lk, C\), got \(2, 11, 23\)$"):
        attention(q, k[..., 1:], v, 3)
    with pytest.raises(ValueError, match=r"^v: expected shape \(B, Lk, Cv\), got \(2, 10, 15\)$"):
        attention(q, k, v[:, 1:], 3)
