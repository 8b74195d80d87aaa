"""A1111's prompt syntax: the parser against A1111's own documented examples, the 75-token chunk rules by hand."""

from __future__ import annotations

import pytest

from model.prompts import BREAK, Chunk, parse_prompt_attention, split_chunks
from model.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # the examples of A1111's parse_prompt_attention docstring
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
          (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
        # the rest by hand
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
        ("(word: 1.3 )", [("word", 1.3)]),
        ("(a [b] c:2)", [("a ", 2.0), ("b", (1 / 1.1) * 2), (" c", 2.0)]),
        ("unmatched) and ]", [("unmatched) and ]", 1.0)]),
        ("a \\\\ b \\c", [("a \\ b c", 1.0)]),  # \\ is a backslash; a lone backslash is dropped
        ("time: 5pm", [("time: 5pm", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would weight the word BREAK by -1.1
        ("aBREAK b", [("aBREAK b", 1.0)]),
    ],
)
def test_parse_prompt_attention(text: str, expected: list[object]) -> None:
    assert parse_prompt_attention(text) == expected


def test_weight_that_is_not_a_number_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"prompt weight '1\.2\.3' .* is not a number"):
        parse_prompt_attention("(word:1.2.3)")


def fragment(n: int, start: int = 0, weight: float = 1.0) -> tuple[list[int], float]:
    return list(range(start, start + n)), weight


COMMA = 999


def test_chunks_of_75() -> None:
    chunks = split_chunks([fragment(75)], COMMA)
    assert [len(c.tokens) for c in chunks] == [75]
    chunks = split_chunks([fragment(76), fragment(2, 100, 1.5)], COMMA)
    assert [len(c.tokens) for c in chunks] == [75, 3]
    assert chunks[1] == Chunk([75, 100, 101], [1.0, 1.5, 1.5])
    assert split_chunks([([], 1.0)], COMMA) == [Chunk()]  # an empty prompt is one empty chunk


def test_full_chunk_moves_the_words_after_its_last_comma() -> None:
    tokens = [*range(60), COMMA, *range(100, 120)]  # comma at 60: 14 tokens after it in the chunk
    chunks = split_chunks([(tokens, 1.0)], COMMA)
    assert chunks[0].tokens == [*range(60), COMMA]
    assert chunks[1].tokens == list(range(100, 120))
    far = [*range(50), COMMA, *range(100, 130)]  # 24 tokens after the comma: more than 20, no move
    assert [len(c.tokens) for c in split_chunks([(far, 1.0)], COMMA)] == [75, 6]
    assert [len(c.tokens) for c in split_chunks([(tokens, 1.0)], COMMA, backtrack=0)] == [75, 6]


def test_break_starts_a_new_chunk() -> None:
    chunks = split_chunks([fragment(3), BREAK, fragment(2, 10)], COMMA)
    assert [c.tokens for c in chunks] == [[0, 1, 2], [10, 11]]
    assert [c.tokens for c in split_chunks([([], 1.0), BREAK, fragment(1)], COMMA)] == [[], [0]]  # leading BREAK
    assert [c.tokens for c in split_chunks([fragment(1), BREAK, ([], 1.0)], COMMA)] == [[0]]  # trailing BREAK


def test_prompt_chunks_rows() -> None:
    tok = ClipTokenizer.bundled()
    plain = tok.prompt_chunks("a photo of a cat", 8)
    assert plain.ids == tok.tokenize(["a photo of a cat"]).input_ids.tolist()  # today's one row, exactly
    assert plain.weights == [[1.0] * 77] and not plain.weighted and plain.num_tokens == 5
    weighted = tok.prompt_chunks("a (photo:1.5) of a [cat]", 8)
    assert weighted.ids == plain.ids and weighted.weighted
    assert weighted.weights[0][:7] == [1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1, 1.0]
    long = tok.prompt_chunks("cat " * 100, 8)
    assert long.num_tokens == 100 and not long.truncated
    assert long.ids[0] == [BOS] + [2368] * 75 + [EOS]
    assert long.ids[1] == [BOS] + [2368] * 25 + [EOS] * 51
    cut = tok.prompt_chunks("cat " * 160, 2)
    assert len(cut.ids) == 2 and cut.truncated and cut.num_tokens == 160
    assert tok.prompt_chunks("BREAK", 8).ids == tok.tokenize([""]).input_ids.tolist()  # no empty 2nd chunk
