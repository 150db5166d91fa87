"""SD3 Attention Capture on the tiny SD3 (real checkpoint format, real CLIP-L tokenizer and encoder, core loaders).

Oracles: the attention probability softmax(q k^T / sqrt(d)) written out in the test from the q and k that the
chosen block really computed (read by a plain attention override installed before the capture), DreamBeast's
official map written out from the same q and k, a plain sampling of the MODEL before and after a capture
(bit-identical), and the step plan's rule written as timesteps.
"""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels.cameras import orbit_cameras
from compose3d.kernels.toy_object import render_toy_object
from compose3d.nodes.attention_patch import MMDIT_TAG
from compose3d.nodes.sd3_capture import CaptureSettings, SD3AttentionCapture, plan_steps
from harness.inprocess import run_node

PROMPT = "a toy with a round head on a wooden base"
HEAD_COLUMN = 6  # <start> a toy with a round head: CLIP position of "head" (checked against the tokenizer below)
RESOLUTION = 128  # 8 x 8 image tokens
GRID = RESOLUTION // 16


@pytest.fixture(scope="module")
def sd3(comfy_inprocess, tiny_models):
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd3_checkpoint)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    return model, clip, vae


@pytest.fixture(scope="module")
def views():
    cameras = orbit_cameras(4, 15.0, distance=2.5)  # front, side, back, side: three prompts, one of two views
    images, _, _ = render_toy_object(cameras, 64, 64)
    return images, cameras


def capture(sd3, views, model=None, **changes):
    model_, clip, vae = sd3
    images, cameras = views
    inputs = dict(model=model or model_, clip=clip, vae=vae, views=images, cameras=cameras, prompt=PROMPT,
                  parts="head", negative="", blocks="1", t_low=300.0, t_high=800.0, sdedit_timestep=600.0, steps=8, cfg=3.0,
                  resolution=RESOLUTION, map_size=GRID, normalization="probability", text_tokens="clip",
                  view_words=True, seed=5)
    inputs.update(changes)
    with torch.inference_mode():
        return run_node(SD3AttentionCapture, **inputs).result


def spying_model(model):
    """A clone whose attention override records the q and k of every tagged (captured) joint attention call."""
    calls = []

    def spy(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        tag = options.get(MMDIT_TAG)
        if tag is not None:
            calls.append((tag, q.double(), k.double(), float(options["sigmas"].flatten()[0]),
                          list(options["cond_or_uncond"])))
        return func(q, k, v, *args, **kwargs)

    spied = model.clone()
    spied.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = spy
    return spied, calls


def views_of_calls(calls, groups):
    """Which views each recorded call belongs to: a new sampling run (group) starts where the sigma rises."""
    out, group, last = [], -1, None
    for call in calls:
        sigma = call[3]
        if last is None or sigma > last:
            group += 1
        last = sigma
        out.append(groups[group])
    return out


def test_the_head_token_is_at_the_column_the_capture_reads(sd3):
    _, clip, _ = sd3
    prompt_ids = [t[0] for t in clip.tokenize(PROMPT)["l"][0]]
    head_ids = [t[0] for t in clip.tokenize("head")["l"][0]]
    assert prompt_ids[HEAD_COLUMN] == head_ids[1]


def test_the_captured_map_is_the_attention_probability_of_the_blocks_q_and_k(sd3, views):
    spied, calls = spying_model(sd3[0])
    maps, _ = capture(sd3, views, model=spied)
    groups = [[0], [1, 3], [2]]  # front, side, back: the order the prompts first appear
    in_window = [(c, v) for c, v in zip(calls, views_of_calls(calls, groups)) if 300.0 <= c[3] * 1000 <= 800.0]
    assert len(in_window) == len(calls) == 3 * 4  # 3 prompts x the 4 steps of t in [300, 800]: nothing else ran
    totals, counts = torch.zeros(4, GRID * GRID, dtype=torch.float64), torch.zeros(4)
    for (tag, q, k, _, chunks), view_list in in_window:
        text, batch = tag[1], q.shape[0] // len(chunks)
        heads = q.shape[-1] // 64
        qh = q.reshape(q.shape[0], q.shape[1], heads, 64).transpose(1, 2)
        kh = k.reshape(k.shape[0], k.shape[1], heads, 64).transpose(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / 8.0, dim=-1).mean(dim=1)  # (N, L, L)
        cond = chunks.index(0)
        for row, view in enumerate(view_list):
            totals[view] += probs[cond * batch + row, text:, HEAD_COLUMN]
            counts[view] += 1
    assert counts.tolist() == [counts[0].item()] * 4 and counts[0] > 0
    oracle = (totals / counts[:, None]).reshape(4, GRID, GRID)
    assert maps.kind == "probability" and maps.maps.shape == (4, 1, GRID, GRID)
    torch.testing.assert_close(maps.maps[:, 0].double(), oracle, rtol=1e-4, atol=1e-7)


def test_the_official_map_is_dreambeasts_formula_on_the_same_scores(sd3, views):
    spied, calls = spying_model(sd3[0])
    maps, _ = capture(sd3, views, model=spied, normalization="official")
    sums = torch.zeros(4, GRID * GRID, dtype=torch.float64)
    for (tag, q, k, sigma, chunks), view_list in zip(calls, views_of_calls(calls, [[0], [1, 3], [2]])):
        if not 300.0 <= sigma * 1000 <= 800.0:
            continue
        text, batch, cond = tag[1], q.shape[0] // len(chunks), chunks.index(0)
        for row, view in enumerate(view_list):
            sums[view] += q[cond * batch + row, text:] @ k[cond * batch + row, HEAD_COLUMN]  # heads merged
    low, high = sums.amin(1, keepdim=True), sums.amax(1, keepdim=True)
    token = ((sums - low) / (high - low)) ** 0.95
    low, high = token.amin(1, keepdim=True), token.amax(1, keepdim=True)
    oracle = ((token - low) / (high - low)).reshape(4, GRID, GRID)
    assert maps.kind == "official"
    torch.testing.assert_close(maps.maps[:, 0].double(), oracle, rtol=1e-4, atol=1e-5)


def test_the_model_passed_in_is_unchanged_a_plain_sampling_after_is_bit_identical(sd3, views):
    import comfy.sample

    model, clip, _ = sd3
    options_before = repr(model.model_options)

    def plain_sampling():
        with torch.inference_mode():
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
            latent = torch.zeros(2, 16, 16, 16)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
            return comfy.sample.sample(model, noise, 4, 3.0, "euler", "simple", positive, negative, latent,
                                       disable_pbar=True, seed=1)

    before = plain_sampling()
    capture(sd3, views)
    after = plain_sampling()
    assert torch.equal(before, after)
    assert repr(model.model_options) == options_before


def test_the_plan_runs_anchored_steps_only_where_needed_and_stops_below_the_window():
    sigmas = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    settings = CaptureSettings(t_low=250.0, t_high=450.0, sdedit_timestep=650.0, steps=10)
    plan = plan_steps(sigmas, lambda s: s * 1000, settings)
    # t = 1000 ... 700 are anchored and outside the window: only 700 runs (its result starts the free run at 600)
    torch.testing.assert_close(plan.sigmas, torch.tensor([0.7, 0.6, 0.5, 0.4, 0.3, 0.2]))
    assert plan.anchored == (True, False, False, False, False)
    assert plan.run == (True, True, True, True, True)
    wide = plan_steps(sigmas, lambda s: s * 1000, CaptureSettings(t_low=550.0, t_high=950.0, sdedit_timestep=650.0))
    # t = 1000 is anchored, outside the window and followed by another anchored step: skipped; the run stops
    # below t_low, after t = 600
    torch.testing.assert_close(wide.sigmas, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]))
    assert wide.anchored == (True, True, True, False) and all(wide.run)
    with pytest.raises(ValueError, match="t_low/t_high: no step"):
        plan_steps(sigmas, lambda s: s * 1000, CaptureSettings(t_low=910.0, t_high=950.0))


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("changes, message", [
    (dict(parts="head, tail"), "parts: 'tail' is not in the prompt. The prompt's tokens are: 'a', 'toy', 'with'"),
    (dict(parts=" "), "parts: no part phrases; give at least one"),
    (dict(t_low=0.0), "t_low: 0 is outside (0, 1000)"),
    (dict(t_high=1000.0), "t_high: 1000 is outside (0, 1000)"),
    (dict(t_low=600.0, t_high=500.0), "t_low: 600 is above t_high 500"),
    (dict(blocks="7"), "blocks: [7] not among this model's 2 joint blocks"),
    (dict(blocks="one"), "blocks: 'one' is not a comma-separated list"),
])
def test_bad_inputs_are_refused_with_a_message_naming_the_input(sd3, views, changes, message):
    with pytest.raises(ValueError) as error:
        capture(sd3, views, **changes)
    assert str(error.value).startswith(message)


def test_views_and_cameras_of_different_counts_and_a_non_sd3_model_are_refused(sd3, views, comfy_inprocess,
                                                                             tiny_models):
    images, cameras = views
    with pytest.raises(ValueError, match=r"^cameras: 4 cameras for 3 views"):
        capture(sd3, (images[:3], cameras))
    with pytest.raises(ValueError, match=r"^views: 64x32 images; give square views"):
        capture(sd3, (images[:, :32], cameras))
    from compose3d.nodes.mvdream import MVDreamLoader

    mvdream = run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result[0]
    with pytest.raises(ValueError, match=r"^model: expected an SD3 model \(an MMDiT"):
        capture(sd3, views, model=mvdream)
