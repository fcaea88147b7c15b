"""Content ids: every row is keyed by a hash of what it is made of, so re-running a stage is idempotent."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# one encoder for every id: json.dumps with these options would build a new encoder per call (a million steps)
_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_id(*parts: Any, length: int = 16) -> str:
    """Stable hex id of `parts` (JSON-serialisable), independent of dict key order."""
    return hashlib.sha256(_ENCODER.encode(parts).encode("utf-8")).hexdigest()[:length]


def step_id(trace_id: str, idx: int, text: str) -> str:
    """A step's id: its trace, position and text. Hashed from a plain string (not JSON): segmentation makes one per
    step of every trace, millions at scale."""
    return hashlib.sha256(f"step\x1f{trace_id}\x1f{idx}\x1f{text}".encode()).hexdigest()[:16]
