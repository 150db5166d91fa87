"""Phrase -> token positions with real ComfyUI CLIPs: the tiny MVDream sd-v2.1 (OpenCLIP 'h'), an MVDream sd-v1.5
layout (CLIP-L 'l') and SD3 (CLIP-L, CLIP-G, T5-XXL through ComfyUI's own SD3Tokenizer and CLIP wrapper).

Oracles: the tokenizer files ComfyUI ships, read by ``transformers`` directly (``CLIPTokenizer`` for the CLIP
encoders; ``T5TokenizerFast`` with character offsets for T5: a phrase's tokens are those whose characters
overlap the phrase's first whole-word occurrence in the prompt), and ComfyUI's ``SD3ClipModel`` concatenating
stand-in encoders that output each token's id, for where the tokens land in SD3's joint text context.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from compose3d.nodes.tokens import PhraseWording, locate_phrases, resolve_phrases
from harness.inprocess import run_node

SUBJECTS = PhraseWording("subjects", "subject words", "'cat, dog'", "refocusing")
PARTS = PhraseWording("parts", "part phrases", "'head, legs, tail'", "the attention capture")

PROMPT = "an axolotl wearing a red hat next to a blue teapot, 3d asset"


# ---------------------------------------------------------------------------------------------------- oracles

def clip_oracle():
    from transformers import CLIPTokenizer

    import comfy.sd1_clip

    return CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer"))


def t5_oracle():
    from transformers import T5TokenizerFast

    import comfy.text_encoders.sd3_clip

    return T5TokenizerFast.from_pretrained(os.path.join(os.path.dirname(comfy.text_encoders.sd3_clip.__file__),
                                                        "t5_tokenizer"))


def first_run(ids: list[int], run: list[int]) -> list[int]:
    """Positions of the first occurrence of ``run`` in ``ids``."""
    at = next(i for i in range(len(ids)) if ids[i:i + len(run)] == run)
    return list(range(at, at + len(run)))


def clip_positions(oracle, prompt: str, phrase: str) -> list[int]:
    return first_run(oracle(prompt)["input_ids"], oracle(phrase)["input_ids"][1:-1])


def t5_positions(oracle, prompt: str, phrase: str) -> list[int]:
    """Tokens whose characters overlap the phrase's first whole-word occurrence in the prompt."""
    a, b = re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", prompt).span()
    spans = oracle(prompt, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (s, e) in enumerate(spans) if e > s and s < b and e > a]


# ---------------------------------------------------------------------------------------------------- CLIPs

@pytest.fixture(scope="module")
def mvdream_clip(comfy_inprocess, tiny_models):
    from compose3d.nodes.mvdream import MVDreamLoader

    return run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result[1]


@pytest.fixture(scope="module")
def sd15_clip(comfy_inprocess, tmp_path_factory):
    from safetensors.torch import save_file

    from compose3d.nodes.mvdream_model import load_mvdream
    from harness.tiny_models import mvdream_checkpoint_state_dict

    path = tmp_path_factory.mktemp("sd15") / "sd-v1.5-4view.safetensors"
    save_file(mvdream_checkpoint_state_dict("sd15", seed=15), str(path))
    with torch.inference_mode():
        return load_mvdream(str(path))[1]


class TokenIdEncoder(torch.nn.Module):
    """A stand-in text encoder for ComfyUI's ``ClipTokenWeightEncoder``: each token's output is its id in every
    channel, so the context ComfyUI assembles shows which token sits in which column."""

    def __init__(self, width: int, special_tokens: dict):
        super().__init__()
        self.width, self.special_tokens = width, special_tokens

    def encode(self, tokens):
        ids = torch.tensor(tokens, dtype=torch.float32)  # (chunks, T)
        return ids[..., None].expand(*ids.shape, self.width), torch.zeros(ids.shape[0], self.width)


def sd3_clip(tokenizer, encoders=("l", "g", "t5xxl")):
    """A real ``comfy.sd.CLIP`` with ComfyUI's SD3Tokenizer and SD3ClipModel, whose encoders are stand-ins."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders.sd3_clip import sd3_clip as sd3_clip_model

    encoder_class = type("TokenIds", (TokenIdEncoder, comfy.sd1_clip.ClipTokenWeightEncoder), {})
    clip = comfy.sd.CLIP(ClipTarget(lambda **_: tokenizer, sd3_clip_model(clip_l=False, clip_g=False, t5=False)))
    model = clip.cond_stage_model
    if "l" in encoders:
        model.clip_l = encoder_class(768, {"start": 49406, "end": 49407, "pad": 49407})
    if "g" in encoders:
        model.clip_g = encoder_class(1280, {"start": 49406, "end": 49407, "pad": 0})
    if "t5xxl" in encoders:
        model.t5xxl = encoder_class(4096, {"end": 1, "pad": 0})
        model.t5_attention_mask = False
    return clip


@pytest.fixture(scope="module")
def sd3_tokenizer(comfy_inprocess):
    from comfy.text_encoders.sd3_clip import SD3Tokenizer

    return SD3Tokenizer()


# ------------------------------------------------------------------------------------------------ SD1 / SD2

def test_mvdream_clip_positions_are_the_clip_tokenizers(mvdream_clip):
    found = resolve_phrases(mvdream_clip, PROMPT, "axolotl, red hat, teapot, a", SUBJECTS)
    oracle = clip_oracle()
    ids = oracle(PROMPT)["input_ids"]  # [start, ..., end]
    assert list(found.encoders) == ["h"]
    h = found.primary
    for phrase, positions in zip(["axolotl", "red hat", "teapot", "a"], h.positions):
        assert positions == clip_positions(oracle, PROMPT, phrase)  # first occurrence ('a' is there twice)
    assert len(h.positions[0]) == 4  # 'axolotl' is four BPE pieces: 'ax', 'o', 'lot', 'l</w>'
    assert (h.first_token, h.last_token, h.length) == (1, len(ids) - 1, 77)
    assert h.tokens == [oracle.convert_ids_to_tokens(i).replace("</w>", "") for i in ids[1:-1]]
    assert h.context_positions == h.positions and found.context_columns() == h.positions
    assert found.context_length == 77
    assert resolve_phrases(mvdream_clip, PROMPT, "  ", SUBJECTS) is None


def test_refocus_messages_are_reproduced_word_for_word(mvdream_clip):
    prompt = "a cat and a dog, 3d asset"
    listing = "The prompt's tokens are: 'a', 'cat', 'and', 'a', 'dog', ',', '3', 'd', 'asset'"
    cases = {("cat, horse", prompt): f"subjects: 'horse' is not in the prompt. {listing}",
             ("...", prompt): f"subjects: '...' is not in the prompt. {listing}",
             ("cat, , dog", prompt): "subjects: 'cat, , dog' has an empty entry; separate subject words by single "
                                     "commas, e.g. 'cat, dog'",
             ("()", prompt): f"subjects: '()' gives no tokens; name words of the prompt. {listing}",
             ("cat", "  "): "prompt: empty; give the same text as the positive prompt so subject words can be found",
             ("cat", "cat " * 80): "prompt: 80 tokens; refocusing needs the prompt to fit one 75-token window"}
    for (phrases, text), message in cases.items():
        with pytest.raises(ValueError) as err:
            resolve_phrases(mvdream_clip, text, phrases, SUBJECTS)
        assert str(err.value) == message


def test_sd15_clip_finds_phrases_with_its_clip_l_tokenizer(sd15_clip):
    prompt = "a cat, a cat and a (red hat:1.2) on a dog"
    found = locate_phrases(sd15_clip, prompt, ["a cat", "red hat", "dog"], SUBJECTS)
    assert list(found.encoders) == ["l"]
    oracle = clip_oracle()
    plain = prompt.replace("(red hat:1.2)", "red hat")  # weights change no token
    assert found.primary.positions == [clip_positions(oracle, plain, p) for p in ["a cat", "red hat", "dog"]]
    assert found.primary.positions[0] == [1, 2]  # the first of the two
    assert found.primary.last_token == len(oracle(plain)["input_ids"]) - 1


# ------------------------------------------------------------------------------------------------------ SD3

def test_sd3_clip_positions_per_encoder_are_the_tokenizers(sd3_tokenizer):
    prompt = 'a corgi wearing a "red hat" next to a blue-teapot, 3d asset'
    phrases = ["corgi", "red hat", "teapot", "asset"]
    found = locate_phrases(sd3_clip(sd3_tokenizer), prompt, phrases, PARTS)
    assert sorted(found.encoders) == ["g", "l", "t5xxl"] and found.primary.key in ("l", "g")
    clip, t5 = clip_oracle(), t5_oracle()
    for key in ("l", "g"):
        enc = found.encoders[key]
        assert enc.positions == [clip_positions(clip, prompt, p) for p in phrases]
        assert (enc.first_token, enc.last_token, enc.context_offset) == (1, len(clip(prompt)["input_ids"]) - 1, 0)
    enc = found.encoders["t5xxl"]
    t5_ids = t5(prompt)["input_ids"]  # no start token; '</s>' last
    # 'red hat' in quotes and 'teapot' after '-' are other pieces than alone: found by their text
    assert enc.positions == [t5_positions(t5, prompt, p) for p in phrases]
    assert (enc.first_token, enc.last_token) == (0, len(t5_ids) - 1)
    assert enc.tokens == t5.convert_ids_to_tokens(t5_ids[:-1])
    assert enc.length == 77 and enc.context_offset == 77 and found.context_length == 154


def test_sd3_positions_land_where_comfyui_puts_the_tokens_in_the_joint_context(sd3_tokenizer):
    prompt = "a corgi wearing a red hat next to a blue teapot, 3d asset"
    phrases = ["corgi", "red hat", "teapot"]
    clip, t5 = clip_oracle(), t5_oracle()
    for encoders in [("l", "g", "t5xxl"), ("l", "g"), ("g", "t5xxl"), ("t5xxl",)]:
        sd3 = sd3_clip(sd3_tokenizer, encoders)
        found = locate_phrases(sd3, prompt, phrases, PARTS)
        assert sorted(found.encoders) == sorted(encoders)
        context, _, _ = sd3.cond_stage_model.encode_token_weights(sd3.tokenize(prompt))  # (1, L, 4096)
        assert context.shape[1] == found.context_length
        for i, phrase in enumerate(phrases):
            if "l" in encoders:
                cols = found.encoders["l"].context_positions[i]
                assert context[0, cols, 0].tolist() == clip(phrase)["input_ids"][1:-1]
            if "g" in encoders:
                cols = found.encoders["g"].context_positions[i]
                assert context[0, cols, 768].tolist() == clip(phrase)["input_ids"][1:-1]
            if "t5xxl" in encoders:
                cols = found.encoders["t5xxl"].context_positions[i]
                assert context[0, cols, 0].tolist() == t5(phrase)["input_ids"][:-1]
        if "l" in encoders and "g" in encoders:
            assert found.context_columns(("l", "g")) == found.encoders["l"].positions


def test_sd3_messages_name_the_parts_and_the_encoder_that_misses_a_phrase(sd3_tokenizer):
    sd3 = sd3_clip(sd3_tokenizer)
    prompt = "a cat on a 3d box"
    with pytest.raises(ValueError) as err:
        resolve_phrases(sd3, prompt, "cat, horse", PARTS)
    assert str(err.value) == ("parts: 'horse' is not in the prompt. The prompt's tokens are: 'a', 'cat', 'on', 'a', "
                              "'3', 'd', 'box'")
    # CLIP has 'd' as a word of its own in '3d'; T5 has '▁3', 'd': inside a word
    with pytest.raises(ValueError) as err:
        resolve_phrases(sd3, prompt, "cat, d", PARTS)
    assert str(err.value).startswith("parts: 'd' is not in the prompt's t5xxl tokens. The prompt's t5xxl tokens "
                                     "are: '▁', 'a', '▁cat'")
    with pytest.raises(ValueError) as err:
        resolve_phrases(sd3, "cat " * 80, "cat", PARTS)
    assert str(err.value) == "prompt: 80 tokens; the attention capture needs the prompt to fit one 75-token window"
    with pytest.raises(ValueError, match=r"^prompt: empty; give the same text as the positive prompt so part "
                                         r"phrases can be found$"):
        resolve_phrases(sd3, "", "cat", PARTS)
    # a T5-free SD3 CLIP does not need T5 to find the phrase
    assert resolve_phrases(sd3_clip(sd3_tokenizer, ("l", "g")), prompt, "d", PARTS).primary.positions == [[6]]
