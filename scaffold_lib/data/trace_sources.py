"""Where imported traces are read from: a JSONL / Parquet file, a folder of them, a dataset saved with
`save_to_disk`, or an HF `datasets` name (streamed); each opened with its format's columns resolved, its rows
streamed. Parquet row groups whose key column names no wanted problem are not read whole.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from scaffold_lib.core.files import DataFileError, iter_file_rows
from scaffold_lib.data.trace_formats import Columns, TraceFieldMap, resolve_columns

TRACE_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
# what `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in their folder
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


@dataclass(frozen=True)
class TraceSource:
    """One thing to read: a JSONL/Parquet file, a dataset saved with `save_to_disk`, or a hub dataset (streamed)."""

    name: str
    kind: Literal["file", "saved", "hub"]
    path: Path | None = None

    @property
    def label(self) -> str:
        """The `source` of problems taken from it: the file's stem, the folder's name, the hub name."""
        return self.name if self.path is None else (self.path.name if self.kind == "saved" else self.path.stem)


def trace_sources(source: str) -> list[TraceSource]:
    """What `source` names: a file, every trace file of a folder (sorted), a saved dataset's folder, or a hub name."""
    path = Path(source)
    if path.is_dir():
        if any((path / name).exists() for name in SAVED_DATASET_FILES):
            return [TraceSource(str(path), "saved", path)]
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TRACE_FILE_SUFFIXES)
        if not files:
            raise DataFileError(f"{source}: no .jsonl/.parquet trace file and no dataset saved with save_to_disk here")
        return [TraceSource(str(f), "file", f) for f in files]
    if path.exists():
        return [TraceSource(source, "file", path)]
    if path.suffix.lower() in TRACE_FILE_SUFFIXES or not HUB_NAME.match(source):
        raise DataFileError(
            f"{source}: no such file (give a .jsonl/.parquet path, a folder, a saved dataset or an HF dataset name)"
        )
    return [TraceSource(source, "hub")]


Rows = Iterator[tuple[int, dict | None, str, str | None]]


def _hub_rows(source: str, split: str) -> Rows:
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as exc:  # hub unreachable, unknown name, bad split: all mean "cannot read this source"
        raise DataFileError(f"{source}: no such file here, nor an HF dataset to load (split {split!r}): {exc}") from exc
    for i, row in enumerate(dataset, start=1):
        yield i, row, "", None


def _saved_rows(path: Path, split: str, columns: list[str] | None) -> Rows:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # not a saved dataset after all, or written by an incompatible version
        raise DataFileError(f"{path}: cannot load the dataset saved there: {exc}") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataFileError(f"{path}: no split {split!r} in the saved dataset (it has {', '.join(dataset)})")
        dataset = dataset[split]
    if columns is not None:  # Arrow files are memory-mapped: unread columns cost nothing
        dataset = dataset.select_columns([c for c in dataset.column_names if c in columns])
    for i, row in enumerate(dataset, start=1):
        yield i, row, "", None


def _parquet_rows(path: Path, cols: Columns, wanted: Callable[[str | None, str | None], bool]) -> Rows:
    """Rows of a Parquet file; a row group is read whole only if its key column names a wanted problem (or a key
    is unusable, so the row is quarantined), otherwise only that column is read."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)  # opened (and its errors reported) by `_parquet_names` already
    names = set(parquet.schema_arrow.names)
    by_id = cols.key is not None and cols.key == cols.problem_id
    line = 0
    for group in range(parquet.num_row_groups):
        if cols.key in names:
            keys = parquet.read_row_group(group, columns=[cols.key]).column(0).to_pylist()
            hits = [
                i
                for i, k in enumerate(keys)
                if not isinstance(k, str) or wanted(k if by_id else None, None if by_id else k)
            ]
        else:
            keys, hits = None, None  # no key column (a chat's question is inside it, or it is missing): read all
        n = len(keys) if keys is not None else parquet.metadata.row_group(group).num_rows
        if hits == []:
            line += n
            continue
        table = parquet.read_row_group(group)
        rows = table.take(hits).to_pylist() if hits is not None else table.to_pylist()
        for i, row in zip(hits if hits is not None else range(n), rows):
            yield line + i + 1, row, "", None
        line += n


def _parquet_names(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    try:
        return set(pq.ParquetFile(path).schema_arrow.names)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise DataFileError(f"{path}: cannot read as Parquet: {exc}") from exc


def _with_names(rows: Rows) -> tuple[set[str], Rows]:
    """The column names of the first readable row (what a JSONL file or a stream says of its columns), and every row."""
    head = []
    for item in rows:
        head.append(item)
        if item[1] is not None:
            return set(item[1]), itertools.chain(head, rows)
    return set(), iter(head)


def open_source(
    src: TraceSource,
    fmt: str,
    fields: TraceFieldMap,
    split: str = "train",
    *,
    wanted: Callable[[str | None, str | None], bool] | None = None,
    problems_only: bool = False,
) -> tuple[Columns, Rows]:
    """The format and columns of a source, and its rows (`problems_only`: only what problems need, where a reader can
    leave the rest unread; `wanted`: Parquet row groups with no wanted key are not read whole)."""
    if src.kind == "file" and src.path.suffix.lower() == ".parquet":
        cols = resolve_columns(fmt, _parquet_names(src.path), fields)
        if problems_only or wanted is None:
            return cols, iter_file_rows(src.path, cols.problem_columns() if problems_only else None)
        return cols, _parquet_rows(src.path, cols, wanted)
    if src.kind == "file":
        rows = iter_file_rows(src.path)
    elif src.kind == "saved":
        rows = _saved_rows(src.path, split, None)
    else:
        rows = _hub_rows(src.name, split)
    names, rows = _with_names(rows)
    return resolve_columns(fmt, names, fields), rows
