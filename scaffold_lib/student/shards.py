"""Packed shards: examples bin-packed (best-fit decreasing) into fixed-length rows, written as Parquet files
with a manifest (shard id, member trace ids, tokens, fill ratio, tokenizer hash).

Each example keeps its own `position_ids` restarting at 0, which the backbone turns into a block-diagonal
attention mask, so no example attends to another. An example longer than a row is split into row-sized
chunks or dropped, and counted either way: nothing is truncated silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scaffold_lib.core.ids import content_id
from scaffold_lib.student.config import PackConfig
from scaffold_lib.student.examples import Example
from scaffold_lib.student.model import NO_SIGNAL
from scaffold_lib.student.packing import pack_bfd


@dataclass
class PackStats:
    examples: int = 0
    split_examples: int = 0
    dropped_examples: int = 0
    rows: int = 0
    tokens: int = 0
    capacity: int = 0

    @property
    def fill_ratio(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0


@dataclass
class ShardInfo:
    shard_id: str
    kind: str
    path: str
    n_rows: int
    n_examples: int
    tokens: int
    fill_ratio: float
    tokenizer_hash: str
    trace_ids: list[str] = field(default_factory=list)

    def as_row(self, manifest_hash: str) -> dict:
        row = asdict(self)
        row.pop("trace_ids")
        return {**row, "manifest_hash": manifest_hash}


def _chunks(example: Example, row_len: int) -> list[Example]:
    out = []
    for start in range(0, len(example), row_len):
        stop = min(start + row_len, len(example))
        keep = (example.signal_positions >= start) & (example.signal_positions < stop)
        out.append(
            Example(
                example.trace_id,
                example.input_ids[start:stop],
                example.labels[start:stop],
                example.signal_ids[start:stop],
                example.signal_positions[keep] - start,
                example.signal_targets[keep],
            )
        )
    return out


def pack_rows(examples: Sequence[Example], cfg: PackConfig) -> tuple[list[dict], PackStats]:
    """Rows of exactly `cfg.row_len` tokens (padding at the end has labels -100 and its own positions)."""
    stats = PackStats(examples=len(examples))
    pieces: list[Example] = []
    for ex in sorted(examples, key=lambda e: e.trace_id):
        if len(ex) <= cfg.row_len:
            pieces.append(ex)
        elif cfg.too_long == "split":
            stats.split_examples += 1
            pieces.extend(_chunks(ex, cfg.row_len))
        else:
            stats.dropped_examples += 1
    if not pieces:
        return [], stats
    bins = pack_bfd(np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)), cfg.row_len)
    order = np.random.default_rng(cfg.seed).permutation(len(bins))  # mix long-item rows and gap-filled rows
    rows = [_row([pieces[i] for i in bins[b]], cfg.row_len) for b in order]
    stats.rows = len(rows)
    stats.tokens = sum(r["n_tokens"] for r in rows)
    stats.capacity = len(rows) * cfg.row_len
    return rows, stats


def _row(members: list[Example], row_len: int) -> dict:
    n = sum(len(m) for m in members)
    pad = row_len - n
    position_ids = np.concatenate(
        [np.arange(len(m), dtype=np.int32) for m in members] + [np.arange(pad, dtype=np.int32)]
    )
    offsets = np.cumsum([0] + [len(m) for m in members[:-1]])
    return {
        "input_ids": np.concatenate([m.input_ids for m in members] + [np.zeros(pad, np.int32)]),
        "labels": np.concatenate([m.labels for m in members] + [np.full(pad, -100, np.int32)]),
        "signal_ids": np.concatenate([m.signal_ids for m in members] + [np.full(pad, NO_SIGNAL, np.int8)]),
        "position_ids": position_ids,
        "signal_positions": np.concatenate([m.signal_positions + o for m, o in zip(members, offsets)]).astype(np.int32),
        "signal_targets": np.concatenate([m.signal_targets for m in members]).astype(np.int8),
        "trace_ids": sorted({m.trace_id for m in members}),
        "n_tokens": int(n),
    }


def storage(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(filesystem, path within it, is local) of a folder or file given as a path or an fsspec URL (`s3://…`)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return fs, path, "file" in protocols or "local" in protocols


def _list_column(arrays: Sequence[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=dtype))


def rows_table(rows: Sequence[dict]) -> pa.Table:
    """Packed rows as an Arrow table, built from the numpy arrays directly (no per-token Python objects)."""
    lists = {"input_ids": pa.int32(), "labels": pa.int32(), "signal_ids": pa.int8(), "position_ids": pa.int32()}
    columns = {k: _list_column([r[k] for r in rows], t) for k, t in lists.items()}
    columns["signal_positions"] = _list_column([r["signal_positions"] for r in rows], pa.int32())
    columns["signal_targets"] = _list_column([r["signal_targets"] for r in rows], pa.int8())
    columns["trace_ids"] = pa.array([r["trace_ids"] for r in rows], pa.list_(pa.string()))
    columns["n_tokens"] = pa.array([r["n_tokens"] for r in rows], pa.int64())
    return pa.table(columns)


def write_shards(
    rows: list[dict], out_dir: str | Path, kind: str, tokenizer_hash: str, cfg: PackConfig
) -> tuple[list[ShardInfo], str]:
    """Parquet shards and the manifest hash over them, in a local folder or at an fsspec URL. Never half-written:
    locally a temp name, then a rename; an object store publishes an object whole when its upload completes."""
    fs, root, local = storage(out_dir)
    fs.makedirs(root, exist_ok=True)
    infos: list[ShardInfo] = []
    for start in range(0, len(rows), cfg.rows_per_shard):
        chunk = rows[start : start + cfg.rows_per_shard]
        trace_ids = sorted({t for r in chunk for t in r["trace_ids"]})
        shard_id = content_id("shard", kind, tokenizer_hash, cfg.model_dump(), start, trace_ids)
        path = f"{root.rstrip('/')}/{kind}-{shard_id}.parquet"
        if not fs.exists(path):
            table = rows_table(chunk)
            if local:
                tmp = f"{path}.tmp{os.getpid()}"
                pq.write_table(table, tmp)
                os.replace(tmp, path)
            else:
                with fs.open(path, "wb") as fh:
                    pq.write_table(table, fh)
        tokens = sum(r["n_tokens"] for r in chunk)
        infos.append(
            ShardInfo(
                shard_id,
                kind,
                path if local else fs.unstrip_protocol(path),
                len(chunk),
                sum(len(r["trace_ids"]) for r in chunk),
                tokens,
                tokens / (len(chunk) * cfg.row_len),
                tokenizer_hash,
                trace_ids,
            )
        )
    return infos, content_id("manifest", [i.shard_id for i in infos])


def load_rows(paths: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """All rows of the given shards as tensors; ragged signal positions are padded with -1."""
    tables = []
    for url in paths:  # local paths or fsspec URLs, as write_shards recorded them
        fs, path, _ = storage(url)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        raise ValueError("no shards given")
    return rows_tensors(pa.concat_tables(tables))


def rows_tensors(table: pa.Table) -> dict[str, torch.Tensor]:
    """Packed rows (a `rows_table`) as the tensors the trainer takes; ragged signal positions padded with -1."""
    n = table.num_rows

    def dense(column: str) -> torch.Tensor:  # rows of one length: the flat values reshaped, no Python lists
        values = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(values.astype(np.int64)).reshape(n, -1)

    data = {k: dense(k) for k in ("input_ids", "labels", "signal_ids", "position_ids")}
    positions = table.column("signal_positions").to_pylist()
    targets = table.column("signal_targets").to_pylist()
    width = max((len(p) for p in positions), default=0) or 1
    data["signal_positions"] = torch.full((len(positions), width), -1, dtype=torch.long)
    data["signal_targets"] = torch.zeros((len(positions), width), dtype=torch.long)
    for i, (p, t) in enumerate(zip(positions, targets)):
        data["signal_positions"][i, : len(p)] = torch.tensor(p, dtype=torch.long)
        data["signal_targets"][i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return data
