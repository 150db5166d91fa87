"""Phrases of a prompt -> their token positions, for any tokenizer (pure Python; no comfy, no torch).

A node names words of its prompt ("subject words" for refocusing, "part phrases" for an attention capture); the
model sees tokens. This module parses such comma-separated phrase lists, finds each phrase's tokens in the
prompt's tokens, and words the errors a user sees. The ComfyUI side (:mod:`nodes.tokens`) tokenizes with the
model's own tokenizer and hands plain sequences in.

Tokens come as three parallel sequences of one encoder's chunk (as ``clip.tokenize(text, return_word_ids=True)``
gives them): ``ids`` (vocabulary ids, any hashable), ``pieces`` (their vocabulary strings, e.g. ``"corgi</w>"``
for CLIP's BPE, ``"▁cor"`` for T5's sentencepiece) and ``word_ids`` (ComfyUI's: 0 for start, end and padding
tokens, > 0 for the text's tokens).

A phrase is found by its own tokens (tokenized alone with the same tokenizer): first as an exact run of token
ids, at its first occurrence; failing that, by its text: the phrase must cover whole words of the prompt's
decoded tokens and start and end on token boundaries (case-insensitive). The second way finds words that
sentencepiece splits differently after punctuation (``"corgi"`` inside ``'"corgi"'`` or ``"blue-corgi"``);
with CLIP's BPE it never finds what the first does not.

>>> pieces = ["<start>", "a</w>", "cor", "gi</w>", "in</w>", "a</w>", "red</w>", "hat</w>", "<end>"]
>>> ids = list(range(100, 109)); ids[5] = ids[1]  # 'a' twice
>>> prompt = TokenSequence(ids, pieces, [0, 1, 1, 1, 1, 1, 1, 1, 0], first=1)
>>> phrase = TokenSequence([106, 107], ["red</w>", "hat</w>"], [1, 1], first=0)
>>> find_phrase(prompt, phrase)
[6, 7]
>>> prompt.end
8
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

#: Word-boundary markers of the vocabularies ComfyUI ships: CLIP's BPE ends words with ``</w>``, sentencepiece
#: (T5) starts them with ``▁`` (U+2581).
WORD_END = "</w>"
WORD_START = "\u2581"


@dataclass(frozen=True)
class PhraseWording:
    """How messages about phrases are worded, so each node keeps its own voice.

    Attributes:
        input_name: the node input that holds the phrases (``"subjects"``, ``"parts"``).
        items: what the phrases are, in the user's words (``"subject words"``, ``"part phrases"``).
        example: a valid value of that input, quoted (``"'cat, dog'"``).
        purpose: what needs the phrases, as the subject of a sentence (``"refocusing"``).
    """

    input_name: str
    items: str
    example: str
    purpose: str


@dataclass(frozen=True)
class TokenSequence:
    """One encoder's tokens of one text (one chunk): parallel sequences, all of the same length T.

    Attributes:
        ids: (T,) token ids; any hashable values (an embedding's vectors can be given unique objects so they
            never match).
        pieces: (T,) the tokens' vocabulary strings.
        word_ids: (T,) ComfyUI's word ids: 0 for start, end and padding tokens, > 0 for the text's tokens.
        first: where the text starts: 1 after a start token (CLIP), 0 without one (T5).
    """

    ids: Sequence[Hashable]
    pieces: Sequence[str]
    word_ids: Sequence[int]
    first: int

    def __post_init__(self):
        if not len(self.ids) == len(self.pieces) == len(self.word_ids):
            raise ValueError(f"tokens: ids, pieces and word_ids differ in length ({len(self.ids)}, "
                             f"{len(self.pieces)}, {len(self.word_ids)})")

    @property
    def text_positions(self) -> list[int]:
        """Positions of the text's tokens (word id > 0), ascending."""
        return [i for i, w in enumerate(self.word_ids) if w > 0]

    @property
    def end(self) -> int:
        """The position after the last text token: the end token's index (CLIP and T5 put it right after the
        text); :attr:`first` when there is no text."""
        text = self.text_positions
        return text[-1] + 1 if text else self.first

    def text_ids(self) -> list[Hashable]:
        """The ids of the text's tokens (no start, end or padding)."""
        return [self.ids[i] for i in self.text_positions]


def token_text(piece: str) -> str:
    """A token as users read it in messages: the vocabulary string without CLIP's ``</w>`` (sentencepiece
    pieces keep their ``▁``, which shows where a word starts)."""
    return piece.replace(WORD_END, "")


def token_listing(tokens: TokenSequence) -> str:
    """``'a', 'cat', ...``: the text's tokens as users read them, or ``(none)``."""
    return ", ".join(repr(token_text(tokens.pieces[i])) for i in tokens.text_positions) or "(none)"


def parse_phrases(text: str, wording: PhraseWording) -> list[str]:
    """Comma-separated phrases -> stripped entries; an empty (or blank) text means no phrases.

    Raises:
        ValueError: an entry is empty (``"cat,,dog"``, a trailing comma), worded with ``wording``.

    >>> parse_phrases(" cat, red hat ", PhraseWording("subjects", "subject words", "'cat, dog'", "refocusing"))
    ['cat', 'red hat']
    """
    if not text.strip():
        return []
    entries = [part.strip() for part in text.split(",")]
    if any(not e for e in entries):
        raise ValueError(f"{wording.input_name}: {text!r} has an empty entry; separate {wording.items} by single "
                         f"commas, e.g. {wording.example}")
    return entries


def check_prompt_text(prompt: str, wording: PhraseWording) -> None:
    """Raise a ValueError when the prompt is empty or blank (phrases could not be found in it)."""
    if not prompt.strip():
        raise ValueError(f"prompt: empty; give the same text as the positive prompt so {wording.items} can be "
                         f"found")


def check_one_window(chunks: Sequence[TokenSequence], window: int, wording: PhraseWording) -> None:
    """Raise a ValueError when the prompt spills over one encoder window (more than one chunk).

    Args:
        chunks: the prompt's chunks from one encoder.
        window: the text tokens one chunk holds (75 for CLIP: 77 minus the start and end tokens).
    """
    if len(chunks) > 1:
        count = sum(len(c.text_positions) for c in chunks)
        raise ValueError(f"prompt: {count} tokens; {wording.purpose} needs the prompt to fit one {window}-token "
                         f"window")


def find_phrase(prompt: TokenSequence, phrase: TokenSequence) -> list[int] | None:
    """Positions of the phrase's tokens in the prompt (first occurrence), or None when it is not there.

    Args:
        prompt: the prompt's tokens; positions index into it (start token included).
        phrase: the phrase tokenized alone by the same tokenizer; only its text tokens count.

    Returns:
        Ascending, consecutive positions among the prompt's text tokens; None also when the phrase has no text
        tokens.
    """
    wanted = phrase.text_ids()
    if not wanted:
        return None
    text = prompt.text_positions
    ids = [prompt.ids[i] for i in text]
    n = len(wanted)
    for k in range(len(ids) - n + 1):
        if ids[k:k + n] == wanted:
            return text[k:k + n]
    return _find_by_text(prompt, phrase)


def _surface(piece: str) -> str:
    """A piece's text with word-boundary markers turned into spaces."""
    return piece.replace(WORD_END, " ").replace(WORD_START, " ")


def _find_by_text(prompt: TokenSequence, phrase: TokenSequence) -> list[int] | None:
    words = "".join(_surface(phrase.pieces[i]) for i in phrase.text_positions).split()
    if not words:
        return None
    text = prompt.text_positions
    starts, surface = [], ""
    for i in text:
        starts.append(len(surface))
        surface += _surface(prompt.pieces[i])
    ends = starts[1:] + [len(surface)]
    pattern = re.compile("(?=(" + r"\s+".join(re.escape(w) for w in words) + "))", re.IGNORECASE)
    for match in pattern.finditer(surface):
        a, b = match.start(1), match.end(1)
        if (a > 0 and surface[a - 1].isalnum()) or (b < len(surface) and surface[b].isalnum()):
            continue  # not whole words
        first = max(k for k, s in enumerate(starts) if s <= a)
        last = max(k for k, s in enumerate(starts) if s < b)
        if surface[starts[first]:a].strip() or surface[b:ends[last]].strip():
            continue  # starts or ends inside a token
        return text[first:last + 1]
    return None


def phrase_positions(prompt: TokenSequence, phrases: Sequence[str], phrase_tokens: Sequence[TokenSequence],
                     wording: PhraseWording, encoder: str | None = None) -> list[list[int]]:
    """Each phrase's token positions in the prompt (see :func:`find_phrase`), or an error a user can act on.

    Args:
        prompt: the prompt's tokens from one encoder.
        phrases: the phrases as typed (for messages).
        phrase_tokens: each phrase tokenized alone by the same encoder.
        encoder: None for the first (or only) encoder checked; else its name (``"t5xxl"``), which the messages
            then name (a phrase found by one encoder and not by another).

    Raises:
        ValueError: a phrase gives no tokens or is not in the prompt; the message lists the prompt's tokens.
    """
    if len(phrases) != len(phrase_tokens):
        raise ValueError(f"phrase_tokens: {len(phrase_tokens)} token sequences for {len(phrases)} phrases")
    tokens = "The prompt's tokens are" if encoder is None else f"The prompt's {encoder} tokens are"
    listing = f"{tokens}: {token_listing(prompt)}"
    out = []
    for phrase, sequence in zip(phrases, phrase_tokens):
        if not sequence.text_positions:
            raise ValueError(f"{wording.input_name}: {phrase!r} gives no tokens; name words of the prompt. {listing}")
        found = find_phrase(prompt, sequence)
        if found is None:
            where = "the prompt" if encoder is None else f"the prompt's {encoder} tokens"
            raise ValueError(f"{wording.input_name}: {phrase!r} is not in {where}. {listing}")
        out.append(found)
    return out
