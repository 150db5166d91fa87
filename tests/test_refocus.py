"""The refocus sampler on the tiny MVDream, run through core SamplerCustom as a workflow would.

Oracles: plain DDIM from core KSamplerSelect (bit-for-bit equality with no subjects), the tokenizer files read by
``transformers.CLIPTokenizer`` directly (token positions), and the refocusing loss's own definition measured
before and after the latent updates (attention of a planted neglected subject must rise).
"""
from __future__ import annotations

import os

import pytest
import torch

from compose3d.kernels.cameras import orbit_cameras
from compose3d.nodes.mvdream import MVDreamConditioning, MVDreamLoader
from compose3d.nodes.refocus import RefocusSampler, resolve_subjects
from harness.inprocess import run_node

PROMPT = "a cat and a dog, 3d asset"
REFOCUS = dict(sampler_name="ddim", refocus_steps=2, step_size=20.0, thresholds="0: 0.05", max_tries=3,
               smoothing_sigma=0.5)


@pytest.fixture(scope="module")
def mvdream(comfy_inprocess, tiny_models):
    return run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result


def encode(clip, text: str):
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


def with_cameras(conditioning, views: int = 4):
    cams = orbit_cameras(views, 15.0, 0.0, 360.0, 2.0, 40.0)
    return run_node(MVDreamConditioning, conditioning=conditioning, cameras=cams).result[0]


def sample(model, positive, negative, sampler, steps: int = 4, seed: int = 7, batch: int = 4, size: int = 16,
           reports: list | None = None):
    """Core SamplerCustom on a ``batch`` of ``size`` x ``size`` latents (16: 128 px, 4x4 maps; fast on a CPU).
    ``reports``: a list that receives the refocus sampler's report of the run (through the MODEL's options)."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom

    from compose3d.nodes.types import REFOCUS_REPORT_KEY

    if reports is not None:
        model = model.clone()
        model.model_options[REFOCUS_REPORT_KEY] = reports.append

    (sigmas,) = run_node(BasicScheduler, model=model, scheduler="ddim_uniform", steps=steps, denoise=1.0).result
    out = run_node(SamplerCustom, model=model, add_noise=True, noise_seed=seed, cfg=7.5, positive=positive,
                   negative=negative, sampler=sampler, sigmas=sigmas,
                   latent_image={"samples": torch.zeros(batch, 4, size, size)}).result
    return out[0]["samples"]


def refocus_sampler(clip, subjects: str, prompt: str = PROMPT, **overrides):
    return run_node(RefocusSampler, clip=clip, prompt=prompt, subjects=subjects, **{**REFOCUS, **overrides}).result[0]


def test_subject_words_map_to_the_tokenizers_positions(mvdream):
    from transformers import CLIPTokenizer

    import comfy.sd1_clip

    clip = mvdream[1]
    prompt = "a corgi wearing a red hat next to a blue teapot, 3d asset"
    subjects = resolve_subjects(clip, prompt, "corgi, red hat, teapot")
    oracle = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(comfy.sd1_clip.__file__),
                                                        "sd1_tokenizer"))
    ids = oracle(prompt)["input_ids"]  # [start, ..., end]
    for word, positions in zip(["corgi", "red hat", "teapot"], subjects.positions):
        word_ids = oracle(word)["input_ids"][1:-1]
        assert [ids[p] for p in positions] == word_ids
    assert subjects.last_token == len(ids) - 1
    assert len(subjects.positions[0]) == len(oracle("corgi")["input_ids"]) - 2
    # a word split into BPE pieces gets all of them ("corgi" is one token; "axolotl" is four)
    split = resolve_subjects(clip, "an axolotl in a hat", "axolotl, hat")
    pieces = oracle("axolotl")["input_ids"][1:-1]
    assert len(pieces) > 1 and split.positions == [list(range(2, 2 + len(pieces))), [4 + len(pieces)]]


def test_subjects_not_in_the_prompt_or_empty_get_errors_listing_the_prompts_tokens(mvdream):
    clip = mvdream[1]
    listing = "The prompt's tokens are: 'a', 'cat', 'and', 'a', 'dog', ',', '3', 'd', 'asset'"
    with pytest.raises(ValueError) as err:
        refocus_sampler(clip, "cat, horse")
    assert str(err.value) == f"subjects: 'horse' is not in the prompt. {listing}"
    with pytest.raises(ValueError, match=r"^subjects: 'cat, , dog' has an empty entry"):
        refocus_sampler(clip, "cat, , dog")
    with pytest.raises(ValueError) as err:
        refocus_sampler(clip, "...")
    assert str(err.value).startswith("subjects: '...' ") and listing in str(err.value)
    with pytest.raises(ValueError, match=r"^prompt: empty"):
        refocus_sampler(clip, "cat", prompt="  ")
    with pytest.raises(ValueError, match=r"^prompt: 80 tokens; refocusing needs the prompt to fit one 75-token"):
        refocus_sampler(clip, "cat", prompt="cat " * 80)
    with pytest.raises(ValueError, match=r"^thresholds: 'ten: 0.5' is not 'step: value'"):
        refocus_sampler(clip, "cat", thresholds="0: 0.05, ten: 0.5")
    with pytest.raises(ValueError, match=r"^thresholds: '3: 1.5' needs a step >= 0 and a value in \(0, 1\]"):
        refocus_sampler(clip, "cat", thresholds="3: 1.5")
    with pytest.raises(ValueError, match=r"^clip: missing"):
        run_node(RefocusSampler, clip=None, prompt=PROMPT, subjects="cat", **REFOCUS)


def test_without_subject_words_it_is_plain_ddim_bit_for_bit(mvdream):
    from comfy_extras.nodes_custom_sampler import KSamplerSelect

    model, clip, _ = mvdream
    positive, negative = with_cameras(encode(clip, PROMPT)), with_cameras(encode(clip, ""))
    (ddim,) = run_node(KSamplerSelect, sampler_name="ddim").result
    plain = sample(model, positive, negative, ddim)
    assert torch.equal(sample(model, positive, negative, refocus_sampler(clip, "")), plain)
    assert torch.equal(sample(model, positive, negative, refocus_sampler(clip, "cat", refocus_steps=0)), plain)
    refocused, reports = refocus_sampler(clip, "cat, dog"), []
    changed = sample(model, positive, negative, refocused, reports=reports)
    assert (changed - plain).abs().max() > 1e-3  # refocusing moved the latent
    assert len(reports) == 1  # one report per run, none kept on the SAMPLER
    assert set(vars(refocused)) == {"sampler_function", "extra_options", "inpaint_options"}  # a core KSAMPLER
    report = reports[0]
    assert report.steps == [0, 1] and len(report.before[0]) == 2
    assert report.maps.shape == (4, 2, 4, 4)  # per view and subject, at 1/4 of the latent size


TRIES = 4


def planted_prompt(clip):
    """PROMPT's conditioning and its (1, 77, C) context with the dog's token embedding amplified x3, so the dog
    dominates the cross-attention and the cat is neglected."""
    dog = resolve_subjects(clip, PROMPT, "cat, dog").positions[1][0]
    with torch.inference_mode():
        raw = encode(clip, PROMPT)
        context = raw[0][0].clone()
        context[:, dog] *= 3.0
    return raw, context


def test_planted_neglected_subject_gets_more_attention_in_its_weakest_view(mvdream):
    """Plant: the dog's text embedding is amplified so it dominates the cross-attention and the cat is neglected.
    Refocusing (latent updates at the first step) must raise the cat's min over views of max attention.
    32x32 latents, so the maps are MVDream's 8x8."""
    model, clip, _ = mvdream
    raw, context = planted_prompt(clip)
    negative = with_cameras(encode(clip, ""))
    runs = {}
    for name, cond, tries in [("natural", raw, 0), ("planted", [[context, raw[0][1]]], TRIES)]:
        sampler = refocus_sampler(clip, "cat, dog", refocus_steps=1, thresholds="0: 0.99", max_tries=tries)
        reports = []
        sample(model, with_cameras(cond), negative, sampler, steps=1, size=32, reports=reports)
        runs[name] = reports[0]
    assert runs["natural"].maps.shape == (4, 2, 8, 8)
    planted = runs["planted"]
    assert planted.before[0][0] < runs["natural"].before[0][0] - 0.03  # the plant worked: the cat is neglected
    assert planted.before[0][0] < planted.before[0][1]
    assert planted.tries == [TRIES]  # 0.99 is out of reach: every try is taken
    assert planted.refined[0][0] > 1.1 * planted.before[0][0]  # ... and refocusing raised the cat's attention


def test_refocusing_works_with_other_samplers_and_two_objects(mvdream):
    model, clip, _ = mvdream
    positive, negative = with_cameras(encode(clip, PROMPT)), with_cameras(encode(clip, ""))
    for name, batch in (("euler_ancestral", 4), ("dpmpp_2m", 8)):  # 8: two objects of four views
        sampler = refocus_sampler(clip, "cat, dog", sampler_name=name, refocus_steps=1, thresholds="")
        reports = []
        out = sample(model, positive, negative, sampler, steps=2, batch=batch, reports=reports)
        assert out.shape == (batch, 4, 16, 16) and torch.isfinite(out).all()
        assert reports[0].maps.shape == (batch, 2, 4, 4)


def test_attention_patches_already_on_the_model_keep_running_during_refocus_passes(mvdream):
    """A core attn2 replacement (per transformer block, the most specific key) stays in force where refocusing
    does not capture (here the 16x16 level of 16x16 latents), including in the refocus passes."""
    from comfy.ldm.modules.attention import optimized_attention

    model, clip, _ = mvdream
    calls = []

    def counting(q, k, v, extra_options):
        calls.append(tuple(extra_options["activations_shape"][-2:]))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    patched.set_model_attn2_replace(counting, "input", 1, 0)
    positive, negative = with_cameras(encode(clip, PROMPT)), with_cameras(encode(clip, ""))
    sample(patched, positive, negative, refocus_sampler(clip, ""), steps=2)
    plain_calls = len(calls)
    assert plain_calls >= 2 and set(calls) == {(16, 16)}
    calls.clear()
    sample(patched, positive, negative, refocus_sampler(clip, "cat", refocus_steps=1, thresholds=""), steps=2)
    assert len(calls) == plain_calls + 1  # one more: the refocus pass of step 0


def test_models_without_cross_attention_at_a_quarter_of_the_latent_get_clear_errors(mvdream, tiny_models):
    import comfy.sd
    import folder_paths

    clip = mvdream[1]
    sampler = refocus_sampler(clip, "cat", refocus_steps=1, thresholds="")
    with torch.inference_mode():
        sd15, _, _, _ = comfy.sd.load_checkpoint_guess_config(
            folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd15_checkpoint), output_clip=False)
        sd3 = comfy.sd.load_diffusion_model(
            folder_paths.get_full_path_or_raise("diffusion_models", tiny_models.sd3_diffusion_model))
    # the tiny SD1.5 UNet has one level: cross-attention at the latent's own size only
    cond = [[torch.randn(1, 77, 768), {}]]
    with pytest.raises(ValueError, match=r"^refocus sampler: the model has no cross-attention at 4x4 \(1/4 of "):
        sample(sd15, cond, cond, sampler, steps=1, batch=1)
    cond = [[torch.randn(1, 77, 4096), {"pooled_output": torch.randn(1, 2048)}]]
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    with pytest.raises(ValueError, match=r"^refocus sampler: \w*MMDIT\w* is not an SD-style UNet; refocusing works with MVDream"):
        run_node(SamplerCustom, model=sd3, add_noise=True, noise_seed=1, cfg=1.0, positive=cond, negative=cond,
                 sampler=sampler, sigmas=torch.tensor([1.0, 0.0]),
                 latent_image={"samples": torch.zeros(1, 16, 16, 16)})


def test_refinement_moves_only_the_objects_below_the_threshold(mvdream):
    """Two objects in one batch, the cat neglected (planted) only in object 0: the refinement tries change object
    0's result and leave object 1 (above the threshold) exactly as with no tries."""
    model, clip, _ = mvdream
    raw, planted = planted_prompt(clip)
    per_view = torch.cat([planted.repeat(4, 1, 1), raw[0][0].repeat(4, 1, 1)])  # (8, 77, C)
    positive, negative = with_cameras([[per_view, raw[0][1]]]), with_cameras(encode(clip, ""))
    outputs, tries = {}, {}
    for max_tries in (0, 3):
        sampler = refocus_sampler(clip, "cat, dog", refocus_steps=1, thresholds="0: 0.1", max_tries=max_tries)
        reports = []
        outputs[max_tries] = sample(model, positive, negative, sampler, steps=1, batch=8, size=32, reports=reports)
        tries[max_tries] = reports[0].tries[0]
    assert tries[0] == 0 and tries[3] >= 1
    moved = (outputs[3] - outputs[0]).abs().flatten(1).amax(dim=1)
    assert float(moved[:4].min()) > 1e-3  # object 0's views were refined
    assert float(moved[4:].max()) == 0.0  # object 1's were not
