"""The IP-Adapter layout (kernels/ip_adapter.py) and the seeded augmentations (kernels/augment.py), on plain
tensors: the loader's checks name what is wrong, the layout round-trips, the layer order is diffusers'."""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels.augment import augment_views
from compose3d.kernels.ip_adapter import (AdapterFileError, IPAdapter, diffusers_layer_order, layer_key,
                                          read_layout)
from harness.tiny_models import ip_adapter_state_dict


def adapter_sd(widths=(320, 640, 1280), embed=1024, tokens=4):
    return {k: v.float() for k, v in ip_adapter_state_dict(list(widths), embed_dim=embed, tokens=tokens,
                                                           seed=5).items()}


def test_layout_is_read_from_the_shapes():
    layout = read_layout(adapter_sd())
    assert (layout.tokens, layout.cross_dim, layout.embed_dim, layout.layer_widths) == (4, 768, 1024,
                                                                                        (320, 640, 1280))
    assert layer_key(2, "to_v_ip") == "ip_adapter.5.to_v_ip.weight"


def test_round_trip_and_tokens():
    sd = adapter_sd()
    adapter = IPAdapter.from_state_dict(sd)
    back = adapter.layout_state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    e = torch.randn(3, 1024)
    tokens = adapter.image_tokens(e)
    want = torch.nn.functional.layer_norm((e @ sd["image_proj.proj.weight"].T + sd["image_proj.proj.bias"])
                                          .reshape(3, 4, 768), (768,), sd["image_proj.norm.weight"],
                                          sd["image_proj.norm.bias"])
    assert torch.allclose(tokens, want, atol=1e-5)
    assert [p.shape for p in adapter.cross_attention_parameters()] == [(320, 768), (640, 768), (1280, 768)] * 2
    assert not any(p.requires_grad for p in adapter.parameters())
    with pytest.raises(ValueError, match=r"expected \(N, 1024\)"):
        adapter.image_tokens(torch.randn(1, 768))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("image_proj.norm.bias"), r"missing key\(s\) image_proj\.norm\.bias"),
    (lambda sd: sd.pop("ip_adapter.3.to_v_ip.weight"), r"missing key\(s\) ip_adapter\.3\.to_v_ip\.weight"),
    (lambda sd: sd.update({"ip_adapter.3.to_q_ip.weight": torch.zeros(2, 2)}),
     r"unexpected key\(s\) ip_adapter\.3\.to_q_ip\.weight"),
    (lambda sd: sd.update({"ip_adapter.3.to_k_ip.weight": torch.zeros(640, 1024)}),
     r"mismatched shape.*ip_adapter\.3\.to_k_ip\.weight \(640, 1024\) \(expected \(W, 768\)\)"),
    (lambda sd: sd.update({"ip_adapter.5.to_v_ip.weight": torch.zeros(320, 768)}),
     r"ip_adapter\.5\.to_v_ip\.weight \(320, 768\) \(expected \(1280, 768\) like to_k_ip\)"),
    (lambda sd: sd.update({"image_proj.proj.weight": torch.zeros(1000, 1024)}),
     r"image_proj\.proj\.weight \(1000, 1024\) \(expected \(tokens \* 768, E\)\)"),
    (lambda sd: sd.update({"image_proj.latents": torch.zeros(1, 16, 768)}), r"IP-Adapter Plus"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("ip_adapter.")], r"missing key\(s\) ip_adapter\.1"),
])
def test_bad_files_are_refused_naming_the_keys(edit, message):
    sd = adapter_sd()
    edit(sd)
    with pytest.raises(AdapterFileError, match=message):
        read_layout(sd, "my_adapter.safetensors")
    with pytest.raises(AdapterFileError, match="^my_adapter.safetensors: "):
        read_layout(sd, "my_adapter.safetensors")


def test_diffusers_order_puts_the_middle_block_last():
    # SD1.5's 16 cross-attention layers as ComfyUI keys them, in execution order.
    execution = [("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + \
                [("output", n, 0) for n in range(3, 12)]
    order = diffusers_layer_order(execution)
    assert order[:6] == execution[:6] and order[6:15] == execution[7:] and order[15] == ("middle", 0, 0)
    # SDXL-style depth: blocks with several transformer blocks keep their inner order.
    assert diffusers_layer_order([("output", 0, 1), ("output", 0, 0), ("input", 4, 1), ("input", 4, 0)]) == \
        [("input", 4, 0), ("input", 4, 1), ("output", 0, 0), ("output", 0, 1)]


def test_augmentations_are_seeded_and_keep_the_originals():
    images = torch.rand(3, 32, 40, 3, generator=torch.Generator().manual_seed(0))
    a, source = augment_views(images, 4, torch.Generator().manual_seed(1))
    b, _ = augment_views(images, 4, torch.Generator().manual_seed(1))
    c, _ = augment_views(images, 4, torch.Generator().manual_seed(2))
    assert a.shape == (12, 32, 40, 3) and source.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0], images[0]) and torch.equal(a[4], images[1])
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # every augmented version differs from its source but stays close (mild augmentations)
    for row in range(12):
        if row % 4:
            diff = (a[row] - images[row // 4]).abs().mean()
            assert 0 < diff < 0.5
