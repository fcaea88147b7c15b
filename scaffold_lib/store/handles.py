"""What stages hand on. Handles: what one stage hands the next (ids, paths, hashes, figures as a small JSON document),
kept per run below `<home>/handles/<stage>/`. Dagster's IO manager and the `scaffold` CLI read and write the same files,
so `scaffold train` can pick up the shards a Dagster run packed and the other way round; a run always reads its own
stage's output, never another run's by accident. The handle classes live with their stages (`student/handles.py`,
`evaluation/handles.py`); a stage that writes tables only returns a `StageReport`, the promotion a
`PromotionOutcome`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

H = TypeVar("H", bound=BaseModel)


@dataclass
class StageReport:
    """What a stage that writes tables only did, for logs, the CLI and Dagster metadata."""

    stage: str
    new_rows: int
    total_rows: int
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items() if not isinstance(v, (dict, list)))
        return f"{self.stage}: +{self.new_rows} new rows ({self.total_rows} total){'; ' + extra if extra else ''}"


@dataclass(frozen=True)
class PromotionOutcome:
    promoted: bool
    reason: str
    previous_champion: str | None
    champion: str | None

    def summary(self) -> str:
        return f"promotion: {'yes' if self.promoted else 'no'} — {self.reason}"


class HandleNotFound(LookupError):
    """No stage run has written the requested handle yet."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", name)


def handle_dir(home: str | Path, stage: str) -> Path:
    return Path(home) / "handles" / _safe(stage)


def save_handle(home: str | Path, stage: str, run_id: str, handle: BaseModel) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a handle."""
    path = handle_dir(home, stage) / f"{_safe(run_id)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {"type": type(handle).__name__, "run_id": run_id, "handle": handle.model_dump(mode="json")}, indent=1
        )
    )
    tmp.replace(path)
    return path


def load_handle(home: str | Path, stage: str, model: type[H], run_id: str | None = None) -> H:
    """The handle `stage` wrote in run `run_id`, or (no run id) in its newest run."""
    folder = handle_dir(home, stage)
    if run_id is not None:
        path = folder / f"{_safe(run_id)}.json"
        if not path.exists():
            raise HandleNotFound(f"stage {stage!r} wrote no handle in run {run_id} ({path})")
    else:
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns) if folder.exists() else []
        if not files:
            raise HandleNotFound(f"stage {stage!r} has not run yet in {home} (no {folder}/*.json)")
        path = files[-1]
    return model.model_validate(json.loads(path.read_text())["handle"])


def all_handles(home: str | Path, stage: str, model: type[H]) -> list[H]:
    """Every handle a stage wrote, oldest first."""
    folder = handle_dir(home, stage)
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns) if folder.exists() else []
    return [model.model_validate(json.loads(p.read_text())["handle"]) for p in files]
