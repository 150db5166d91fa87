"""Phrases of a prompt -> token positions with a ComfyUI CLIP's own tokenizers (SD1.x, SD2.x/MVDream, SD3).

:func:`locate_phrases` tokenizes the prompt with ``clip.tokenize(prompt, return_word_ids=True)`` and each phrase
alone with the same call, then finds the phrases per text encoder (:mod:`kernels.tokens`). ComfyUI's word ids
are 0 on start, end and padding tokens and > 0 on the text's tokens (they number the prompt's weighted segments
and embeddings, not single words), so they tell the text apart from the specials in every encoder.

Encoders are named by the keys ``clip.tokenize`` returns: SD1.x ``'l'``, SD2.x and MVDream sd-v2.1 ``'h'``,
SD3 ``'l'``, ``'g'``, ``'t5xxl'``. Encoders the CLIP has no model for (an SD3 checkpoint without T5) are left
out: their tokens never reach the diffusion model.

Where the tokens land in the diffusion model's text context (``EncoderTokens.context_offset``):

- SD1.x/SD2.x (one encoder): the context is the encoder's chunk, offset 0.
- SD3 (MMDiT): CLIP-L and CLIP-G are concatenated along channels, 77 tokens per chunk (so both at offset 0),
  then T5's tokens follow (offset = the CLIP part's length, 77 for a one-window prompt; 0 when the CLIP has
  neither CLIP encoder). Models with register tokens (``MMDiT.register_length > 0``; not SD3) put those first.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.sd1_clip
from comfy.text_encoders.sd3_clip import SD3Tokenizer

from ..kernels.tokens import (PhraseWording, TokenSequence, check_one_window, check_prompt_text, parse_phrases,
                              phrase_positions, token_text)

__all__ = ["EncoderTokens", "PhraseTokens", "PhraseWording", "locate_phrases", "resolve_phrases"]


@dataclass(frozen=True)
class EncoderTokens:
    """One text encoder's view of the prompt: its first (for CLIP: only) chunk.

    Attributes:
        key: the encoder's key in ``clip.tokenize``'s output (``'l'``, ``'h'``, ``'g'``, ``'t5xxl'``).
        positions: per phrase, its token positions in the chunk (ascending; the start token is position 0
            where the encoder has one, so CLIP's words start at 1 and T5's at 0).
        first_token: the first text position (1 for CLIP, 0 for T5).
        last_token: the end token's position; the text is ``first_token .. last_token - 1``.
        tokens: the prompt's text tokens as users read them (``tokens[i]`` is position ``first_token + i``).
        length: the chunk's length (77 for CLIP; at least 77 for SD3's T5).
        context_offset: where position 0 lands in the diffusion model's text context; None when the layout is
            not known (models other than SD1.x/SD2.x/SD3).
    """

    key: str
    positions: list[list[int]]
    first_token: int
    last_token: int
    tokens: list[str]
    length: int
    context_offset: int | None

    @property
    def context_positions(self) -> list[list[int]] | None:
        """Per phrase, its tokens' columns in the text context (``positions + context_offset``), or None."""
        if self.context_offset is None:
            return None
        return [[self.context_offset + p for p in pos] for pos in self.positions]


@dataclass(frozen=True)
class PhraseTokens:
    """The phrases of a prompt located by every text encoder of a CLIP.

    Attributes:
        phrases: the phrases as typed.
        encoders: per encoder key, its :class:`EncoderTokens` (CLIP encoders first).
        context_length: the text context's length the prompt gives the diffusion model, or None when the layout
            is not known.
    """

    phrases: list[str]
    encoders: dict[str, EncoderTokens]
    context_length: int | None

    @property
    def primary(self) -> EncoderTokens:
        """The first encoder (the only one for SD1.x/SD2.x; a CLIP one for SD3)."""
        return next(iter(self.encoders.values()))

    def context_columns(self, keys=None) -> list[list[int]]:
        """Per phrase, the sorted text-context columns of its tokens in the encoders ``keys`` (default: all).

        For SD3, ``keys=("l", "g")`` gives the CLIP columns (the same for both: they share positions), the ones
        DreamBeast's attention maps use.

        Raises:
            ValueError: an encoder is not there, or the context layout is not known.
        """
        keys = list(self.encoders) if keys is None else list(keys)
        columns = [set() for _ in self.phrases]
        for key in keys:
            if key not in self.encoders:
                raise ValueError(f"encoder {key!r}: not among this CLIP's text encoders {list(self.encoders)}")
            context = self.encoders[key].context_positions
            if context is None:
                raise ValueError(f"encoder {key!r}: where its tokens land in the model's text context is not "
                                 f"known for this kind of CLIP")
            for cols, pos in zip(columns, context):
                cols.update(pos)
        return [sorted(c) for c in columns]


def resolve_phrases(clip, prompt: str, phrases_text: str, wording: PhraseWording) -> PhraseTokens | None:
    """Comma-separated phrases -> :class:`PhraseTokens`; None when ``phrases_text`` is blank.

    Checks, in order (each a ValueError worded by ``wording``): an empty entry in the list, a blank prompt, a
    prompt longer than one window of a CLIP encoder, a phrase that gives no tokens or is not in the prompt.
    """
    phrases = parse_phrases(phrases_text, wording)
    if not phrases:
        return None
    return locate_phrases(clip, prompt, phrases, wording)


def locate_phrases(clip, prompt: str, phrases: list[str], wording: PhraseWording) -> PhraseTokens:
    """Find each phrase's tokens in ``prompt`` with every text encoder of ``clip`` (a ComfyUI CLIP).

    Raises:
        ValueError: a blank prompt; a prompt that spills over one window; a phrase that gives no tokens or is not
            in the prompt (the message lists the prompt's tokens; an encoder after the first is named).
    """
    check_prompt_text(prompt, wording)
    prompt_batches = clip.tokenize(prompt, return_word_ids=True)
    phrase_batches = [clip.tokenize(p, return_word_ids=True) for p in phrases]
    keys = [k for k in prompt_batches if _has_model(clip, k)]
    if not keys:
        raise ValueError("clip: has no text encoder model; load the CLIP with its text encoders")
    tokenizers = {k: _sd_tokenizer(clip.tokenizer, k) for k in keys}
    keys.sort(key=lambda k: tokenizers[k].start_token is None)  # CLIP encoders first (they word messages)

    chunks = {k: [_sequence(c, tokenizers[k]) for c in prompt_batches[k]] for k in keys}
    for k in keys:
        inner = tokenizers[k]
        specials = (inner.start_token is not None) + (inner.end_token is not None)
        check_one_window(chunks[k], inner.max_length - specials, wording)

    offsets = _context_offsets(clip, keys, prompt_batches)
    encoders = {}
    for n, k in enumerate(keys):
        prompt_tokens = chunks[k][0]
        phrase_tokens = [_sequence(batch[k][0], tokenizers[k]) for batch in phrase_batches]
        positions = phrase_positions(prompt_tokens, phrases, phrase_tokens, wording, None if n == 0 else k)
        encoders[k] = EncoderTokens(
            key=k, positions=positions, first_token=prompt_tokens.first, last_token=prompt_tokens.end,
            tokens=[token_text(prompt_tokens.pieces[i]) for i in prompt_tokens.text_positions],
            length=len(prompt_tokens.ids), context_offset=offsets.get(k))
    return PhraseTokens(list(phrases), encoders, _context_length(clip, keys, prompt_batches))


def _sd_tokenizer(tokenizer, key: str):
    """The SDTokenizer behind ``key``: ``clip_<key>`` (SD1Tokenizer, SD3Tokenizer's CLIPs) or ``<key>`` (t5xxl)."""
    for name in (f"clip_{key}", key, getattr(tokenizer, "clip", None)):
        inner = getattr(tokenizer, name, None) if name else None
        if isinstance(inner, comfy.sd1_clip.SDTokenizer):
            return inner
    raise ValueError(f"clip: cannot find the tokenizer of text encoder {key!r} in {type(tokenizer).__name__}")


def _has_model(clip, key: str) -> bool:
    """Whether the CLIP's text model has the encoder ``key`` (SD3ClipModel sets missing ones to None)."""
    model = getattr(clip, "cond_stage_model", None)
    for name in (f"clip_{key}", key):
        if hasattr(model, name):
            return getattr(model, name) is not None
    return True  # no attribute to tell: assume it is there


def _sequence(chunk, inner) -> TokenSequence:
    """One chunk of ``(token, weight, word_id)`` triples -> TokenSequence (embedding vectors never match)."""
    ids, pieces, word_ids = [], [], []
    for token, _weight, word_id in chunk:
        if isinstance(token, int):
            ids.append(token)
            pieces.append(inner.inv_vocab.get(token, str(token)))
        else:  # a textual-inversion embedding's vector
            ids.append(object())
            pieces.append("<embedding>")
        word_ids.append(word_id)
    return TokenSequence(ids, pieces, word_ids, first=0 if inner.start_token is None else 1)


def _clip_part_length(keys, prompt_batches) -> int:
    """Length of SD3's CLIP part of the context: ComfyUI cuts CLIP-L and CLIP-G to the shorter one."""
    lengths = [sum(len(c) for c in prompt_batches[k]) for k in ("l", "g") if k in keys]
    return min(lengths) if lengths else 0


def _context_offsets(clip, keys, prompt_batches) -> dict[str, int]:
    if isinstance(clip.tokenizer, SD3Tokenizer):
        clip_part = _clip_part_length(keys, prompt_batches)
        return {k: clip_part if k == "t5xxl" else 0 for k in keys}
    if isinstance(clip.tokenizer, comfy.sd1_clip.SD1Tokenizer) and len(keys) == 1:
        return {keys[0]: 0}
    return {}


def _context_length(clip, keys, prompt_batches) -> int | None:
    if isinstance(clip.tokenizer, SD3Tokenizer):
        t5 = sum(len(c) for c in prompt_batches["t5xxl"]) if "t5xxl" in keys else 0
        return _clip_part_length(keys, prompt_batches) + t5
    if isinstance(clip.tokenizer, comfy.sd1_clip.SD1Tokenizer) and len(keys) == 1:
        return sum(len(c) for c in prompt_batches[keys[0]])
    return None
