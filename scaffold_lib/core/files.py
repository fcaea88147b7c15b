"""Reading the row files users give us (JSONL, Parquet), with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from scaffold_lib.core.errors import UserError


class DataFileError(UserError):
    """A data file cannot be used; the message names the file, the line and the field."""


def iter_file_rows(
    path: Path, columns: Sequence[str] | None = None
) -> Iterator[tuple[int, dict | None, str, str | None]]:
    """(line number, row or None, raw text, error) for JSONL or Parquet, streamed (bounded memory). A bad line is
    yielded with its error (the caller decides between stopping and quarantining); an unreadable file raises
    `DataFileError`. Raw text is the line for JSONL and empty for Parquet (see `raw_of`). `columns`: the only Parquet
    columns to read, those the file has (a trace file's long texts need not be read to take its questions)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise DataFileError(f"{path}: cannot read as Parquet: {exc}") from exc
        line = 0
        wanted = [c for c in parquet.schema_arrow.names if c in columns] if columns is not None else None
        for batch in parquet.iter_batches(batch_size=4096, columns=wanted):  # bounded memory whatever the file's size
            for row in batch.to_pylist():
                line += 1
                yield line, row, "", None  # raw text only when a row is quarantined: raw_of(row)
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataFileError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .parquet")
    yield from iter_jsonl_rows(path)


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str, str | None]]:
    """`iter_file_rows` of a file read as JSONL whatever its name: (line number, row or None, raw line, error)."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open: {exc.strerror}") from exc
    with fh:
        for i, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as exc:
                yield i, None, raw[:500].decode("utf-8", "replace"), f"not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield i, None, text[:500], f"invalid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield i, None, text[:500], f"expected a JSON object, got {type(row).__name__}"
                continue
            yield i, row, text[:500], None


def raw_of(row: dict, raw: str = "") -> str:
    """What a quarantined row looked like: the line as read (JSONL) or the row as JSON (Parquet), cut to 500 chars."""
    return raw or json.dumps(row, default=str)[:500]


def text_error(value: str) -> str | None:
    """Why a string cannot be stored as text, or None."""
    if "\x00" in value:
        return "contains NUL bytes"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\\ud800" in otherwise valid JSON
        return "contains an unpaired surrogate (not encodable as UTF-8)"
    return None
