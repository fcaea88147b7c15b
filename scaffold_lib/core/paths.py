"""Where things live by default: everything written at run time goes below DAGSTER_HOME (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def dagster_home() -> Path:
    """$DAGSTER_HOME if set (Dagster requires it absolute), else ./dagster_home of this checkout."""
    home = os.environ.get("DAGSTER_HOME")
    return Path(home).resolve() if home else REPO_ROOT / "dagster_home"


class PathOutsideRoot(ValueError):
    """A path built from configuration or data would land outside the folder it must stay in."""


def inside(root: str | Path, *parts: str) -> Path:
    """`root / parts`, resolved, refused when it escapes `root` (a `..`, an absolute part, a symlink out): names
    that come from config or data (suite names, model names) never write elsewhere."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise PathOutsideRoot(f"{'/'.join(parts)!r} would leave {base}")
    return target
