"""Segmentation: a trace is cut into steps at blank lines (paper §3.1). Purely structural.

Robust to CRLF, runs of blank lines and stray whitespace; never yields an empty step; keeps a fenced code
block (```) or display maths ($$ … $$, \\[ … \\]) inside one step even when it contains blank lines.
"""

from __future__ import annotations

import re

_BLANK = re.compile(r"\n[ \t\f\v]*(?:\n[ \t\f\v]*)+")
_OPENERS = ("```", "$$", "\\[")


def segment(trace: str) -> list[str]:
    """Split a trace into its steps. Never raises on a str; returns [] for an empty trace."""
    if "\r" in trace:
        trace = trace.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in trace:
        trace = trace.replace("\x00", "")
    parts = _BLANK.split(trace)
    if any(o in trace for o in _OPENERS):
        parts = _rejoin_blocks(parts)
    return [p for p in (part.strip() for part in parts) if p]


def _rejoin_blocks(parts: list[str]) -> list[str]:
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
            out.append("\n\n".join(buffer))
            buffer = []
    if buffer:  # an unclosed block runs to the end of the trace: keep it as one step
        out.append("\n\n".join(buffer))
    return out
