"""segment(): blank-line steps, robust to messy whitespace, blocks kept whole; property tests."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaffold_lib.data.segmentation import segment


@pytest.mark.parametrize(
    "text, steps",
    [
        ("", []),
        ("   \n\n \t \n", []),
        ("one step", ["one step"]),
        ("first\nstill first\n\nsecond", ["first\nstill first", "second"]),
        ("a\r\n\r\nb\r\nb2", ["a", "b\nb2"]),  # CRLF
        ("a\r\rb", ["a", "b"]),  # old Mac line ends
        ("a\n\n\n\n\nb\n\n\n", ["a", "b"]),  # runs of blank lines
        ("a\n   \nb\n\t\n\t \nc", ["a", "b", "c"]),  # whitespace-only lines between paragraphs
        ("a\n \x0c\x0b \nb", ["a", "b"]),  # form feed / vertical tab on a blank line
        ("  \n\n  a  \n\n\tb\t\n\n  ", ["a", "b"]),  # leading / trailing whitespace
        ("So\x00 this\n\n\x00\n\nthat\x00", ["So this", "that"]),  # NUL bytes are dropped
        ("a\x00\n\x00\nb", ["a", "b"]),  # a line holding only a NUL is blank
    ],
)
def test_segment_cases(text, steps):
    assert segment(text) == steps


def test_code_fence_with_blank_line_stays_one_step():
    text = "Let me write code.\n\n```python\nx = 1\n\ny = 2\n```\n\nSo x + y = 3."
    assert segment(text) == ["Let me write code.", "```python\nx = 1\n\ny = 2\n```", "So x + y = 3."]


def test_display_math_dollars_with_blank_line_stays_one_step():
    text = "Compute:\n\n$$\na = 1\n\nb = 2\n$$\n\nThus a + b = 3."
    assert segment(text) == ["Compute:", "$$\na = 1\n\nb = 2\n$$", "Thus a + b = 3."]


def test_display_math_brackets_with_blank_line_stays_one_step():
    text = "Compute:\n\n\\[\na = 1\n\n\\]\n\nThus a = 1."
    assert segment(text) == ["Compute:", "\\[\na = 1\n\n\\]", "Thus a = 1."]


def test_block_opening_mid_paragraph():
    text = "Here is the code: ```\nx = 1\n\ny = 2\n``` done\n\nNext."
    assert segment(text) == ["Here is the code: ```\nx = 1\n\ny = 2\n``` done", "Next."]


def test_inline_blocks_do_not_glue_steps():
    text = "We have $$x$$ here.\n\nAnd `a` ```b``` there.\n\nAlso \\[y\\] too."
    assert segment(text) == ["We have $$x$$ here.", "And `a` ```b``` there.", "Also \\[y\\] too."]


def test_unclosed_fence_runs_to_end():
    text = "Start.\n\n```\ncode\n\nmore code\n\nstill code"
    assert segment(text) == ["Start.", "```\ncode\n\nmore code\n\nstill code"]


def test_block_with_crlf_and_blank_whitespace_lines():
    text = "A.\r\n\r\n```\r\nx\r\n  \r\ny\r\n```\r\n\r\nB."
    steps = segment(text)
    assert len(steps) == 3 and steps[0] == "A." and steps[2] == "B."
    assert steps[1].startswith("```\nx") and steps[1].endswith("y\n```") and "\r" not in steps[1]


def test_closing_bracket_without_opening_is_harmless():
    assert segment("a \\] b\n\nc\n\n\\[ d \\]\n\ne") == ["a \\] b", "c", "\\[ d \\]", "e"]


# ----------------------------------------------------------------------------------------------------------
# properties

_pieces = st.sampled_from(
    [
        "\n",
        "\n\n",
        "\r\n",
        "\r",
        " ",
        "\t",
        "\x0b",
        "\x0c",
        "\x00",
        "\u2028",
        "\x85",
        "\xa0",
        "```",
        "$$",
        "\\[",
        "\\]",
        "So",
        "Wait,",
        "x = 1",
        "é",
        "😀",
        ".",
    ]
)
messy_text = st.one_of(st.text(), st.lists(st.one_of(_pieces, st.text(max_size=3)), max_size=40).map("".join))


def non_space(text: str) -> list[str]:
    return [c for c in text if not c.isspace() and c != "\x00"]


@settings(max_examples=400, deadline=None)
@given(messy_text)
def test_segment_never_raises_and_never_yields_empty_steps(text):
    steps = segment(text)
    assert isinstance(steps, list)
    for step in steps:
        assert isinstance(step, str)
        assert step.strip() != ""
        assert step == step.strip()
        assert "\r" not in step and "\x00" not in step


@settings(max_examples=400, deadline=None)
@given(messy_text)
def test_segment_loses_no_non_whitespace_characters(text):
    assert non_space("".join(segment(text))) == non_space(text)


_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


@settings(max_examples=300, deadline=None)
@given(messy_text)
def test_without_blocks_no_step_contains_a_blank_line(text):
    if any(o in text for o in ("```", "$$", "\\[")):
        return
    for step in segment(text):
        assert not _BLANK_LINE.search(step)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r\x00$`\\"), min_size=1), max_size=8))
def test_blank_line_joined_paragraphs_come_back(paragraphs):
    paragraphs = [p.strip() for p in paragraphs if p.strip()]
    assert segment("\n\n".join(paragraphs)) == paragraphs
