"""Segmentation: a trace is cut into steps. Purely structural, chosen per teacher or source and recorded with the steps.

- `blank_line`: at blank lines, as the paper does for R1-style traces (short paragraphs);
- `line`: at every line break, for worked solutions in the GSM8K style (one step a line);
- `auto`: `blank_line` when the trace has a blank line, else `line`.

Robust to CRLF, runs of blank lines and stray whitespace; never yields an empty step; keeps a fenced code block (```)
or display maths ($$ … $$, \\[ … \\]) inside one step even when it contains blank lines or line breaks.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

Segmenter = Literal["blank_line", "line", "auto"]
SEGMENTERS: tuple[str, ...] = ("blank_line", "line", "auto")

_BLANK = re.compile(r"\n[ \t\f\v]*(?:\n[ \t\f\v]*)+")
_LINE = re.compile(r"\n")
_HAS_BLANK = re.compile(r"\n[ \t\f\v]*\n")
_OPENERS = ("```", "$$", "\\[")


class SegmentationConfig(BaseModel):
    """How traces are cut into steps: one segmenter for all teachers, or one per teacher identity."""

    segmenter: Segmenter = Field("auto", description="blank_line (the paper, R1-style), line (GSM8K-style), or auto")
    per_teacher: dict[str, Segmenter] = Field(default_factory=dict, description="teacher identity -> segmenter")

    def for_teacher(self, teacher: str) -> str:
        return self.per_teacher.get(teacher, self.segmenter)


def clean(trace: str) -> str:
    if "\r" in trace:
        trace = trace.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in trace:
        trace = trace.replace("\x00", "")
    return trace


def resolve(trace: str, segmenter: str = "blank_line") -> str:
    """The concrete segmenter (`auto` decided by the trace)."""
    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; choose one of {SEGMENTERS}")
    if segmenter == "auto":
        return "blank_line" if _HAS_BLANK.search(trace.strip()) else "line"
    return segmenter


def segment(trace: str, segmenter: str = "blank_line") -> list[str]:
    """Split a trace into its steps. Never raises on a str; returns [] for an empty trace."""
    trace = clean(trace)
    style = resolve(trace, segmenter)
    parts = (_BLANK if style == "blank_line" else _LINE).split(trace)
    if any(o in trace for o in _OPENERS):
        parts = _rejoin_blocks(parts, "\n\n" if style == "blank_line" else "\n")
    return [p for p in (part.strip() for part in parts) if p]


def _rejoin_blocks(parts: list[str], joiner: str) -> list[str]:
    out: list[str] = []
    buffer: list[str] = []
    in_fence = in_dollars = False
    bracket_depth = 0
    for part in parts:
        buffer.append(part)
        in_fence ^= part.count("```") % 2 == 1
        in_dollars ^= part.count("$$") % 2 == 1
        bracket_depth = max(0, bracket_depth + part.count("\\[") - part.count("\\]"))
        if not (in_fence or in_dollars or bracket_depth):
            out.append(joiner.join(buffer))
            buffer = []
    if buffer:  # an unclosed block runs to the end of the trace: keep it as one step
        out.append(joiner.join(buffer))
    return out
