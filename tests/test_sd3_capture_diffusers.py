"""The SD3 attention capture against an independent implementation: diffusers' ``SD3Transformer2DModel``.

Oracle: the tiny SD3 MMDiT's weights, converted to diffusers' layout by diffusers' own converter
(``convert_sd3_transformer_checkpoint_to_diffusers``) and loaded strictly into diffusers' SD3 transformer. First
the two models must give the same output for the same inputs (so the conversion, the pos-embed cropping and the
token order agree); then an attention processor on one diffusers block computes the joint attention exactly as
diffusers' ``JointAttnProcessor2_0`` does and keeps, for every image query, the head-averaged softmax probability
(over all keys) of each text key. The pack's :class:`AttentionRecorder`, run on ComfyUI's MMDiT with the same
inputs, must read those same numbers.

The trap the test guards: diffusers concatenates its joint sequence image tokens first, ComfyUI text tokens
first. ComfyUI's text column ``j`` is diffusers' column ``L_img + j``; the image queries are rows ``0..L_img``
in diffusers and ``L_txt..`` in ComfyUI. A mapping that ignores this must not match (the last test).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from compose3d.nodes.attention_patch import patch_mmdit_attention
from compose3d.nodes.sd3_capture import AttentionRecorder, CaptureSettings
from oracles import import_hiding_pack_root


def import_diffusers_sd3():
    """diffusers' SD3 transformer class and its checkpoint converter (imported with the pack root hidden: the
    converter's module imports transformers, see :func:`oracles.import_hiding_pack_root`)."""
    diffusers, utils = import_hiding_pack_root("diffusers", "diffusers.loaders.single_file_utils")
    return diffusers.SD3Transformer2DModel, utils.convert_sd3_transformer_checkpoint_to_diffusers


SD3Transformer2DModel, convert_sd3_transformer_checkpoint_to_diffusers = import_diffusers_sd3()

BATCH = 2
TEXT_TOKENS = 20
LATENT_HW = (16, 24)  # non-square: 8 x 12 image tokens, a transposed token grid would show
IMAGE_TOKENS = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
SIGMA = 0.7
KEPT = [0, 3, 7]  # ComfyUI's text-token columns (text first)


@pytest.fixture(scope="module")
def sd3_file(comfy_inprocess, tiny_models) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("diffusion_models", tiny_models.sd3_diffusion_model)


@pytest.fixture(scope="module")
def comfy_mmdit(sd3_file):
    import comfy.sd

    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(sd3_file)
    mmdit = model.model.diffusion_model
    assert next(mmdit.parameters()).dtype == torch.float32
    return mmdit


@pytest.fixture(scope="module")
def diffusers_sd3(sd3_file):
    """diffusers' SD3 transformer with the tiny MMDiT's weights, converted by diffusers and loaded strictly."""
    original = load_file(sd3_file)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    assert not original, f"the converter left keys unconverted: {sorted(original)}"
    hidden = converted["context_embedder.weight"].shape[0]
    model = SD3Transformer2DModel(
        sample_size=LATENT_HW[0], patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=hidden // 64, joint_attention_dim=4096, caption_projection_dim=hidden,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=16)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.float().eval()


def inputs(seed: int = 0):
    """x (B, 16, H, W), the timestep sigma x 1000 (ComfyUI's t and diffusers' timestep), context, pooled y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 16, *LATENT_HW, generator=g)
    context = torch.randn(BATCH, TEXT_TOKENS, 4096, generator=g)
    y = torch.randn(BATCH, 2048, generator=g)
    return x, torch.full((BATCH,), SIGMA * 1000.0), context, y


def run_comfy(mmdit, x, t, context, y, transformer_options: dict | None = None):
    with torch.no_grad():
        return mmdit(x, t, context=context, y=y, transformer_options=dict(transformer_options or {}))


def run_diffusers(model, x, t, context, y):
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t,
                     return_dict=False)[0]


class RecordingJointProcessor:
    """Runs diffusers' own processor for the output and, next to it, the joint attention probabilities as
    ``JointAttnProcessor2_0`` forms them: ``probs`` (B, L_img + L_txt, L_img + L_txt), image tokens first,
    softmax over all keys, averaged over heads (in float64)."""

    def __init__(self, original):
        self.original = original
        self.probs: torch.Tensor | None = None
        self.image_tokens: int | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, l_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, H * D) -> (B, H, L, D)
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        query, key = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = split(attn.add_q_proj(encoder_hidden_states))
        text_key = split(attn.add_k_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2).double()  # diffusers' order: image, then text
        key = torch.cat([key, text_key], dim=2).double()
        probs = torch.softmax(query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        self.probs, self.image_tokens = probs, l_img
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    @property
    def text_probs(self) -> torch.Tensor:
        """(B, L_img, L_txt): for every image query (rows 0..L_img), the text keys (columns L_img + j)."""
        return self.probs[:, :self.image_tokens, self.image_tokens:]


def diffusers_attention(model, block: int, x, t, context, y) -> RecordingJointProcessor:
    """diffusers' joint attention probabilities of block ``block``, recorded while the model runs unchanged."""
    attn = model.transformer_blocks[block].attn
    original = attn.processor
    recording = RecordingJointProcessor(original)
    attn.set_processor(recording)
    try:
        plain = run_diffusers(model, x, t, context, y)
    finally:
        attn.set_processor(original)
    torch.testing.assert_close(plain, run_diffusers(model, x, t, context, y), rtol=0, atol=0)
    assert recording.probs is not None, "the recording processor was not called"
    return recording


def captured_attention(mmdit, block: int, x, t, context, y) -> torch.Tensor:
    """What the pack's recorder reads from ComfyUI's MMDiT block ``block`` for the KEPT columns: (B, L_img, K)."""
    settings = CaptureSettings(blocks=(block,), t_low=0.0, t_high=1000.0, normalization="probability")
    recorder = AttentionRecorder(settings, KEPT, BATCH, IMAGE_TOKENS, lambda s: s * 1000.0, torch.device("cpu"))
    patched = patch_mmdit_attention({}, [block], recorder.handle)
    options = dict(patched["transformer_options"])
    options["sigmas"] = torch.full((BATCH,), SIGMA)
    options["cond_or_uncond"] = [0]
    recorder.view_index = torch.arange(BATCH)
    run_comfy(mmdit, x, t, context, y, options)
    assert recorder.calls == 1
    return recorder.accumulator.mean()


def test_diffusers_sd3_with_the_converted_weights_computes_what_comfyui_s_mmdit_computes(comfy_mmdit,
                                                                                         diffusers_sd3):
    """The oracle is the same network: same weights (diffusers' conversion), same output to float tolerance."""
    x, t, context, y = inputs(seed=0)
    ours = run_comfy(comfy_mmdit, x, t, context, y)
    theirs = run_diffusers(diffusers_sd3, x, t, context, y)
    assert ours.shape == theirs.shape == x.shape
    assert float(ours.abs().max()) > 1e-2  # not a trivially zero output
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [0, 1], ids=["first-block", "last-block-context-pre-only"])
def test_the_capture_reads_diffusers_attention_probabilities_of_the_kept_text_tokens(comfy_mmdit, diffusers_sd3,
                                                                                   block):
    """Per view and image token, the recorder's value for ComfyUI's text column j is diffusers' head-averaged
    probability of key L_img + j, in the first block and in the last one (whose text branch is pre-only)."""
    x, t, context, y = inputs(seed=1)
    assert diffusers_sd3.transformer_blocks[block].context_pre_only == (block == 1)
    text_probs = diffusers_attention(diffusers_sd3, block, x, t, context, y).text_probs  # (B, L_img, L_txt)
    assert text_probs.shape == (BATCH, IMAGE_TOKENS, TEXT_TOKENS)
    captured = captured_attention(comfy_mmdit, block, x, t, context, y)  # (views = B, L_img, K)
    assert captured.shape == (BATCH, IMAGE_TOKENS, len(KEPT))
    # ComfyUI's text column j is diffusers' key L_img + j, i.e. column j of text_probs
    torch.testing.assert_close(captured.double(), text_probs[:, :, KEPT], rtol=0, atol=1e-5)
    # the probabilities are not degenerate: they differ across image tokens and kept tokens
    assert float(text_probs[:, :, KEPT].std()) > 1e-3


def test_a_capture_that_ignored_diffusers_image_first_order_would_not_match(comfy_mmdit, diffusers_sd3):
    """The oracle can fail: reading diffusers' columns j (image keys) instead of L_img + j, or the image
    queries' rows in ComfyUI's text-first numbering, gives numbers far from what the capture reads."""
    block = 0
    x, t, context, y = inputs(seed=1)
    probs = diffusers_attention(diffusers_sd3, block, x, t, context, y).probs  # (B, L, L), image first
    captured = captured_attention(comfy_mmdit, block, x, t, context, y).double()
    right = probs[:, :IMAGE_TOKENS, [IMAGE_TOKENS + j for j in KEPT]]
    torch.testing.assert_close(captured, right, rtol=0, atol=1e-5)
    wrong_columns = probs[:, :IMAGE_TOKENS, KEPT]  # image keys, as if text came first
    wrong_rows = probs[:, TEXT_TOKENS:TEXT_TOKENS + IMAGE_TOKENS, [IMAGE_TOKENS + j for j in KEPT]]
    for wrong in (wrong_columns, wrong_rows):
        assert float((captured - wrong).abs().max()) > 1e-3
