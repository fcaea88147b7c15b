"""Content ids: every row is keyed by a hash of what it is made of, so re-running a stage is idempotent."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_id(*parts: Any, length: int = 16) -> str:
    """Stable hex id of `parts` (JSON-serialisable), independent of dict key order."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]
