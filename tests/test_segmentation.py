"""segment(): blank-line steps, robust to messy whitespace, blocks kept whole; property tests."""

from __future__ import annotations

import contextlib
import re

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaffold_lib.core.ids import step_id
from scaffold_lib.data import segmentation
from scaffold_lib.data.config import SEGMENTERS, SegmentationConfig
from scaffold_lib.data.segmentation import PY_WHITESPACE, clean, resolve, segment, segment_batch


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


# ----------------------------------------------------------------------------------------------------------
# segment_batch: the stage's vectorised segmentation is `segment`, trace for trace


def test_the_whitespace_the_batch_strips_is_what_str_strip_strips():
    assert set(PY_WHITESPACE) == {c for c in map(chr, range(0x110000)) if c.isspace()}


def _reference_steps(trace_id: str, text: str, answer: str | None, style: str) -> list[dict]:
    """segment(), then the answer as one step, as the trace stage writes them. (Before segment_batch the stage chose
    `auto`'s style before cleaning: a CRLF trace with blank lines was cut at every line.)"""
    concrete = resolve(clean(text), style)
    steps = segment(text, concrete)
    if steps and answer and answer.strip():
        steps.append("\n".join(segment(answer)))
    return [
        {"step_id": step_id(trace_id, i, s), "trace_id": trace_id, "idx": i, "text": s, "segmenter": concrete}
        for i, s in enumerate(steps)
    ]


_pieces = st.sampled_from(
    ["So", "x = 1.", "\n", "\n\n", "\r\n", "\r", " ", "\t", "\x0b", "\x0c", "\xa0", "\u3000", "```", "$$", "\\[",
     "\\]", "\x00", "é", "Wait,", "\n \n", "**"]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(_pieces, max_size=14).map("".join),
            st.one_of(st.none(), st.lists(_pieces, max_size=5).map("".join)),
            st.sampled_from(SEGMENTERS),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_segment_batch_cuts_every_trace_as_segment_does(traces):
    for in_sql in (True, False):
        _check_batch(traces, in_sql)


def _check_batch(traces, in_sql: bool) -> None:
    """Both ways of cutting a batch: DuckDB (what R1-length traces take) and Python (short traces)."""
    teachers = [f"teacher-{i}" for i in range(len(traces))]
    cfg = SegmentationConfig(segmenter="auto", per_teacher={t: style for t, (_, _, style) in zip(teachers, traces)})
    batch = pa.table(
        {
            "trace_id": [f"t{i}" for i in range(len(traces))],
            "teacher": teachers,
            "text": [text for text, _, _ in traces],
            "answer_text": [answer for _, answer, _ in traces],
        }
    )
    expected = [
        row for i, (text, answer, style) in enumerate(traces) for row in _reference_steps(f"t{i}", text, answer, style)
    ]
    with _cut_in(in_sql):
        assert segment_batch(batch, cfg).to_pylist() == expected


@contextlib.contextmanager
def _cut_in(sql: bool):
    saved = segmentation.SQL_MIN_MEAN_TRACE_CHARS
    segmentation.SQL_MIN_MEAN_TRACE_CHARS = 0 if sql else 10**9
    try:
        yield
    finally:
        segmentation.SQL_MIN_MEAN_TRACE_CHARS = saved


@pytest.mark.parametrize("in_sql", [True, False])
def test_segment_batch_on_teacher_traces_matches_segment(in_sql):
    """A corpus the programmatic teacher wrote (blank-line paragraphs, an answer step), in one batch."""
    from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
    from scaffold_lib.data.teachers import ProgrammaticTeacher

    traces = ProgrammaticTeacher().generate(generate_problems(GeneratorConfig(n_problems=300, seed=3))).traces
    batch = pa.table({"trace_id": [t.trace_id for t in traces], "text": [t.text for t in traces]})
    expected = [row for t in traces for row in _reference_steps(t.trace_id, t.text, None, "auto")]
    assert len(expected) > 1500
    with _cut_in(in_sql):
        assert segment_batch(batch).to_pylist() == expected


def test_steps_come_back_in_trace_order_whatever_order_the_kernel_returns():
    from scaffold_lib.data.segmentation import _in_trace_order

    steps = pa.table(
        {"row": [0, 0, 0, 2, 2, 5], "idx": pa.array([0, 1, 2, 0, 1, 0], pa.int32()), "text": list("abcdef")}
    )
    assert _in_trace_order(steps) is steps  # kept: no sort
    shuffled = steps.take([3, 0, 5, 2, 1, 4])
    assert _in_trace_order(shuffled).to_pylist() == steps.to_pylist()
    swapped = steps.take([1, 0, 2, 3, 4, 5])  # one trace's steps out of order, the traces in order
    assert _in_trace_order(swapped).to_pylist() == steps.to_pylist()
