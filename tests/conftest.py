"""Shared fixtures: only small, generic ones (each test module keeps its own helpers)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest


@pytest.fixture
def warehouse_path(tmp_path: Path) -> Path:
    """Where a test's own DuckDB warehouse file goes (created on first use by `Warehouse`)."""
    return tmp_path / "warehouse.duckdb"


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write rows (dicts are JSON-encoded, str/bytes are written as they are) one per line; returns the path."""

    def write(rows: Iterable[dict | str | bytes], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        with path.open("wb") as fh:
            for row in rows:
                if isinstance(row, dict):
                    row = json.dumps(row)
                if isinstance(row, str):
                    row = row.encode("utf-8")
                fh.write(row + b"\n")
        return path

    return write
