"""Phrase -> token positions on plain token lists (kernels/tokens.py).

The token lists are written out by hand in the two vocabularies' styles: CLIP's BPE (``</w>`` ends a word, a
start token at 0) and T5's sentencepiece (``▁`` starts a word, no start token); the expected positions are
counted on them.
"""
from __future__ import annotations

import pytest

from compose3d.kernels.tokens import (PhraseWording, TokenSequence, check_one_window, check_prompt_text,
                                      find_phrase, parse_phrases, phrase_positions, token_listing)

SUBJECTS = PhraseWording("subjects", "subject words", "'cat, dog'", "refocusing")
PARTS = PhraseWording("parts", "part phrases", "'head, legs'", "the attention capture")

START, END = "<|startoftext|>", "<|endoftext|>"


def clip_tokens(*pieces: str, pad: int = 3) -> TokenSequence:
    """A CLIP chunk: start, the pieces (ids from their text), end, padding (end tokens, word id 0)."""
    body = list(pieces)
    all_pieces = [START] + body + [END] * (1 + pad)
    return TokenSequence([hash(p) for p in all_pieces], all_pieces, [0] + [1] * len(body) + [0] * (1 + pad),
                         first=1)


def clip_phrase(*pieces: str) -> TokenSequence:
    return clip_tokens(*pieces, pad=0)


def t5_tokens(*pieces: str, pad: int = 2) -> TokenSequence:
    """A T5 chunk: the pieces, ``</s>``, ``<pad>`` padding; no start token."""
    all_pieces = list(pieces) + ["</s>"] + ["<pad>"] * pad
    return TokenSequence([hash(p) for p in all_pieces], all_pieces, [1] * len(pieces) + [0] * (1 + pad), first=0)


PROMPT = clip_tokens("a</w>", "cor", "gi</w>", "wearing</w>", "a</w>", "red</w>", "hat</w>", ",</w>", "a</w>",
                     "red</w>", "hat</w>")


def test_phrases_are_comma_separated_and_stripped_and_blank_means_none():
    assert parse_phrases("corgi, red hat ,teapot", SUBJECTS) == ["corgi", "red hat", "teapot"]
    assert parse_phrases("   ", SUBJECTS) == []
    assert parse_phrases("...", SUBJECTS) == ["..."]


def test_an_empty_entry_is_an_error_in_the_nodes_own_words():
    with pytest.raises(ValueError) as err:
        parse_phrases("cat, , dog", SUBJECTS)
    assert str(err.value) == ("subjects: 'cat, , dog' has an empty entry; separate subject words by single commas, "
                              "e.g. 'cat, dog'")
    with pytest.raises(ValueError) as err:
        parse_phrases("head,", PARTS)
    assert str(err.value) == ("parts: 'head,' has an empty entry; separate part phrases by single commas, "
                              "e.g. 'head, legs'")


def test_a_word_split_into_bpe_pieces_gets_all_its_positions():
    assert find_phrase(PROMPT, clip_phrase("cor", "gi</w>")) == [2, 3]


def test_a_multi_word_phrase_gets_consecutive_positions_at_its_first_occurrence():
    assert find_phrase(PROMPT, clip_phrase("red</w>", "hat</w>")) == [6, 7]
    assert find_phrase(PROMPT, clip_phrase("a</w>")) == [1]


def test_start_end_and_padding_tokens_are_never_matched_and_end_follows_the_text():
    assert find_phrase(PROMPT, clip_phrase(END)) is None
    assert PROMPT.text_positions == list(range(1, 12)) and PROMPT.end == 12
    empty = clip_tokens()
    assert empty.text_positions == [] and empty.end == 1
    t5 = t5_tokens("\u2581cat")
    assert t5.text_positions == [0] and t5.end == 1 and t5_tokens().end == 0


def test_a_phrase_that_is_not_a_run_of_the_prompts_tokens_is_not_found():
    assert find_phrase(PROMPT, clip_phrase("hat</w>", "red</w>")) is None
    assert find_phrase(PROMPT, clip_phrase("...</w>")) is None
    assert find_phrase(PROMPT, clip_phrase("cor</w>")) is None  # 'cor' as a whole word is another token
    assert find_phrase(PROMPT, clip_phrase()) is None


def test_sentencepiece_words_split_differently_after_punctuation_are_found_by_their_text():
    # T5 on 'a "corgi" toy' vs 'corgi' alone: the pieces differ, the text does not
    prompt = t5_tokens("\u2581", "a", "\u2581\"", "c", "org", "i", "\"", "\u2581toy")
    assert find_phrase(prompt, t5_tokens("\u2581cor", "g", "i", pad=0)) == [3, 4, 5]
    # 'blue-teapot' vs 'teapot'; case does not matter
    prompt = t5_tokens("\u2581blue", "-", "t", "e", "a", "pot", "\u2581Hat")
    assert find_phrase(prompt, t5_tokens("\u2581tea", "pot", pad=0)) == [2, 3, 4, 5]
    assert find_phrase(prompt, t5_tokens("\u2581hat", pad=0)) == [6]


def test_text_matches_must_be_whole_words_on_token_boundaries():
    prompt = t5_tokens("\u2581bob", "cat", "\u2581cats", "\u2581ca", "tt")
    assert find_phrase(prompt, t5_tokens("\u2581cat", pad=0)) is None  # inside 'bobcat', 'cats'
    assert find_phrase(prompt, t5_tokens("\u2581c", "at", pad=0)) is None
    prompt = t5_tokens("\u2581a", "b", "cd")  # 'abcd' in one word
    assert find_phrase(prompt, t5_tokens("\u2581bc", pad=0)) is None


def test_exact_token_runs_win_over_text_matches_and_keep_the_first_occurrence():
    word = t5_tokens("\u2581", "hat", pad=0)
    prompt = t5_tokens("\u2581red", "-", "hat", "\u2581", "hat")  # text match at 2, exact run at 3..4
    assert find_phrase(prompt, word) == [3, 4]


def test_missing_phrases_list_the_prompts_tokens_as_users_read_them():
    phrases = ["corgi", "horse"]
    with pytest.raises(ValueError) as err:
        phrase_positions(PROMPT, phrases, [clip_phrase("cor", "gi</w>"), clip_phrase("horse</w>")], SUBJECTS)
    assert str(err.value) == ("subjects: 'horse' is not in the prompt. The prompt's tokens are: 'a', 'cor', 'gi', "
                              "'wearing', 'a', 'red', 'hat', ',', 'a', 'red', 'hat'")
    with pytest.raises(ValueError) as err:
        phrase_positions(PROMPT, ["()"], [clip_phrase()], PARTS)
    assert str(err.value).startswith("parts: '()' gives no tokens; name words of the prompt. The prompt's tokens "
                                     "are: 'a', 'cor'")
    with pytest.raises(ValueError) as err:
        phrase_positions(clip_tokens(), ["cat"], [clip_phrase("cat</w>")], SUBJECTS)
    assert str(err.value) == "subjects: 'cat' is not in the prompt. The prompt's tokens are: (none)"


def test_an_encoder_after_the_first_is_named_in_its_messages():
    prompt = t5_tokens("\u2581red", "\u2581hat")
    with pytest.raises(ValueError) as err:
        phrase_positions(prompt, ["horse"], [t5_tokens("\u2581horse", pad=0)], PARTS, encoder="t5xxl")
    assert str(err.value) == ("parts: 'horse' is not in the prompt's t5xxl tokens. The prompt's t5xxl tokens are: "
                              "'\u2581red', '\u2581hat'")
    assert phrase_positions(prompt, ["hat", "red"], [t5_tokens("\u2581hat", pad=0), t5_tokens("\u2581red", pad=0)],
                            PARTS, encoder="t5xxl") == [[1], [0]]


def test_prompt_errors_are_worded_for_each_node():
    with pytest.raises(ValueError) as err:
        check_prompt_text(" \n", SUBJECTS)
    assert str(err.value) == "prompt: empty; give the same text as the positive prompt so subject words can be found"
    two = [clip_tokens(*["cat</w>"] * 75, pad=0), clip_tokens(*["cat</w>"] * 5)]
    with pytest.raises(ValueError) as err:
        check_one_window(two, 75, PARTS)
    assert str(err.value) == "prompt: 80 tokens; the attention capture needs the prompt to fit one 75-token window"
    check_one_window(two[:1], 75, PARTS)


def test_token_lists_are_checked_for_equal_lengths():
    with pytest.raises(ValueError, match=r"^tokens: ids, pieces and word_ids differ in length \(2, 1, 2\)"):
        TokenSequence([1, 2], ["a"], [0, 1], first=1)
    assert token_listing(t5_tokens()) == "(none)"


def test_the_modules_examples_hold():
    import doctest

    import compose3d.kernels.tokens as tokens

    result = doctest.testmod(tokens)
    assert result.attempted >= 3 and result.failed == 0


# The refocus sampler's first subject tests, on the module that replaced its own parsing and search.

def test_subject_list_parsing():
    assert parse_phrases("", SUBJECTS) == [] and parse_phrases("   ", SUBJECTS) == []
    assert parse_phrases(" cat,red hat , dog", SUBJECTS) == ["cat", "red hat", "dog"]
    with pytest.raises(ValueError, match="^subjects: 'cat,' has an empty entry"):
        parse_phrases("cat,", SUBJECTS)


def test_subjects_are_found_as_whole_token_sequences_after_the_start_token():
    prompt = clip_tokens("a</w>", "red</w>", "hat</w>", "a</w>", "cat</w>")
    assert phrase_positions(prompt, ["red hat", "cat", "a"],
                            [clip_phrase("red</w>", "hat</w>"), clip_phrase("cat</w>"), clip_phrase("a</w>")],
                            SUBJECTS) == [[2, 3], [5], [1]]
    with pytest.raises(ValueError) as err:
        phrase_positions(prompt, ["hat red"], [clip_phrase("hat</w>", "red</w>")], SUBJECTS)
    assert str(err.value) == ("subjects: 'hat red' is not in the prompt. The prompt's tokens are: "
                              "'a', 'red', 'hat', 'a', 'cat'")
    with pytest.raises(ValueError, match="^subjects: '!' gives no tokens"):
        phrase_positions(prompt, ["!"], [clip_phrase()], SUBJECTS)
    start = TokenSequence([hash(START)], [START], [1], first=0)  # the start token given as if it were text
    with pytest.raises(ValueError, match="is not in the prompt"):  # the start token is not a word
        phrase_positions(prompt, ["<start>"], [start], SUBJECTS)
