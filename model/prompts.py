"""Prompt syntax as AUTOMATIC1111 reads it: attention weights and ``BREAK``, then 75-token chunks.

Plain Python (no torch). ``parse_prompt_attention`` splits a prompt into (text, weight) fragments with the rules of
A1111's ``modules/prompt_parser.py``; ``split_chunks`` lays the fragments' BPE tokens out in chunks of at most 75
tokens with the rules of A1111's ``modules/sd_hijack_clip.py`` (``tokenize_line``), including its comma backtrack.
The tokenizer (``model.tokenizer``) wraps each chunk in BOS / EOS / padding; ``model.text_encoding`` encodes the
chunks and applies the weights. docs/prompts.md states the rules for users.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

ROUND = 1.1  # (text) multiplies by this; [text] divides by it
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack": how far back a full chunk looks for a comma

# A1111's re_attention, alternative for alternative: escapes, brackets, ":weight)", plain text, a lone colon.
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")  # what float() takes of the weight pattern's matches


class Break:
    """``BREAK`` in a prompt: the current chunk ends here and the text after it starts a new one."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()
Fragment = tuple[str, float] | Break


def parse_prompt_attention(text: str) -> list[Fragment]:
    """(text, weight) fragments of a prompt, with ``BREAK`` markers, as A1111's ``parse_prompt_attention``.

    ``(a)`` x1.1, ``[a]`` /1.1, ``(a:w)`` x w, nested brackets multiply, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``
    are literal characters, a lone backslash is dropped, brackets left open apply to the end of the prompt and
    unmatched closing brackets are literal text. Neighbouring fragments of equal weight are merged. One difference
    from A1111: brackets never weight a ``BREAK`` (A1111 turns a BREAK inside brackets into the word "BREAK" with
    a negative weight). ValueError for a weight that is not a number, such as ``(a:1.2.3)``.
    """
    res: list[list[str | float] | Break] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            if not isinstance(item, Break):
                item[1] = float(item[1]) * multiplier

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            if not _NUMBER.fullmatch(weight):
                raise ValueError(f"prompt weight {weight!r} in {token!r} is not a number; write it like (word:1.2)")
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / ROUND)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(BREAK)
                res.append([part, 1.0])
    for start in round_brackets:
        multiply_range(start, ROUND)
    for start in square_brackets:
        multiply_range(start, 1 / ROUND)

    out: list[Fragment] = []
    for item in res:
        if isinstance(item, Break):
            out.append(BREAK)
        elif out and not isinstance(out[-1], Break) and out[-1][1] == item[1]:
            out[-1] = (out[-1][0] + str(item[0]), out[-1][1])
        else:
            out.append((str(item[0]), float(item[1])))
    return out or [("", 1.0)]


@dataclass
class Chunk:
    """Up to ``chunk_length`` content tokens (no BOS / EOS) and the weight of each."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def split_chunks(
    fragments: Sequence[tuple[list[int], float] | Break], comma_id: int | None, chunk_length: int = 75,
    backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """Lay the fragments' tokens out in chunks, as A1111's ``tokenize_line`` (without textual inversion).

    A chunk ends when it holds ``chunk_length`` tokens, or at a ``BREAK`` (even an empty chunk: a prompt that
    starts with BREAK gets an empty first chunk). When a chunk is full and the next token is not a comma, the
    tokens after the chunk's last comma move to the next chunk if that comma is within the last ``backtrack``
    tokens. A prompt with no tokens is one empty chunk; a trailing BREAK adds none.
    """
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for fragment in fragments:
        if isinstance(fragment, Break):
            next_chunk()
            continue
        tokens, weight = fragment
        for token in tokens:
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif backtrack and len(chunk.tokens) == chunk_length and last_comma != -1 \
                    and len(chunk.tokens) - last_comma <= backtrack:
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                del chunk.tokens[cut:], chunk.weights[cut:]
                next_chunk()
                chunk = moved
            if len(chunk.tokens) == chunk_length:
                next_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks
