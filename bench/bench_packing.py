"""Benchmark: scaffold_lib.student.packing.pack_bfd against TRL's BFD packer (trl.data_utils.pack_dataset, strategy="bfd").

    .venv/bin/python bench/bench_packing.py            # 1,000,000 sequences
    .venv/bin/python bench/bench_packing.py --n 100000

Lengths: lognormal(mu=5, sigma=0.7), rounded, clipped to 16..1024 (seed 0); capacity / seq_length 1024.
pack_bfd: best of --repeats runs on the numpy lengths. TRL: only the pack_dataset call is timed, on an in-memory
datasets.Dataset with an `input_ids` column (list<int32> of zeros). TRL's pack_dataset goes through Dataset.map,
whose default batch_size is 1000, so it packs each block of 1000 sequences separately; its whole-dataset BFD
(map_kwargs={"batch_size": None}) is timed too unless --skip-trl-whole. TRL needs `pip install trl` (bench only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scaffold_lib.student.packing import fill_ratio, pack_bfd

CAPACITY = 1024


def make_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(mean=5.0, sigma=0.7, size=n)), 16, CAPACITY).astype(np.int64)


def make_dataset(lengths: np.ndarray):
    from datasets import Dataset
    from datasets.table import InMemoryTable

    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int32))
    offsets_type = np.int32 if offsets[-1] < 2**31 else np.int64
    list_type = pa.ListArray if offsets_type is np.int32 else pa.LargeListArray
    column = list_type.from_arrays(pa.array(offsets.astype(offsets_type)), values)
    return Dataset(InMemoryTable(pa.table({"input_ids": column})))


def build_rows(column: pa.Array, lengths: np.ndarray, bins: list[np.ndarray]) -> pa.Array:
    """Materialise the packed rows (TRL's timing includes this): reorder the sequences, re-cut at bin bounds."""
    order = np.concatenate(bins)
    taken = pc.take(column, pa.array(order))
    sizes = np.fromiter((b.size for b in bins), dtype=np.int64, count=len(bins))
    starts = np.zeros(len(bins), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(np.add.reduceat(lengths[order], starts), out=offsets[1:])
    offsets = pa.array(offsets.astype(taken.offsets.type.to_pandas_dtype()))
    return type(taken).from_arrays(offsets, taken.flatten())


def packed_fill(packed) -> tuple[int, float]:
    column = packed.data.column("input_ids")
    tokens = int(pc.sum(pc.list_value_length(column)).as_py())
    rows = len(packed)
    return rows, tokens / (rows * CAPACITY)


def time_trl(dataset, map_kwargs=None) -> tuple[float, int, float]:
    from trl.data_utils import pack_dataset

    t0 = time.perf_counter()
    packed = pack_dataset(dataset, seq_length=CAPACITY, strategy="bfd", map_kwargs=map_kwargs)
    seconds = time.perf_counter() - t0
    rows, fill = packed_fill(packed)
    return seconds, rows, fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of sequences (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="pack_bfd runs; the best is reported")
    parser.add_argument("--skip-trl", action="store_true", help="time pack_bfd only")
    parser.add_argument("--skip-trl-whole", action="store_true", help="skip TRL with map batch_size=None")
    args = parser.parse_args()

    lengths = make_lengths(args.n, args.seed)
    total = int(lengths.sum())
    print(f"n={args.n:,} sequences, {total:,} tokens, mean length {lengths.mean():.1f}, capacity {CAPACITY}")
    print(f"lower bound on bins: ceil(tokens / capacity) = {-(-total // CAPACITY):,}")

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bins = pack_bfd(lengths, CAPACITY)
        times.append(time.perf_counter() - t0)
    ours = min(times)
    ours_fill = fill_ratio(lengths, bins, CAPACITY)
    print(
        f"pack_bfd:                     {ours:7.3f} s (best of {args.repeats}: "
        f"{', '.join(f'{t:.3f}' for t in times)}), {len(bins):,} bins, fill {100 * ours_fill:.3f} %"
    )
    if args.skip_trl:
        return

    import datasets

    datasets.disable_progress_bars()
    dataset = make_dataset(lengths)
    column = dataset.data.column("input_ids").combine_chunks()
    t0 = time.perf_counter()
    rows = build_rows(column, lengths, pack_bfd(lengths, CAPACITY))
    with_rows = time.perf_counter() - t0
    assert len(rows) == len(bins) and int(pc.max(pc.list_value_length(rows)).as_py()) <= CAPACITY
    print(f"pack_bfd + arrow rows:        {with_rows:7.3f} s (also builds the packed input_ids column, as TRL does)")
    trl_s, trl_rows, trl_fill = time_trl(dataset)
    print(
        f"TRL pack_dataset bfd:         {trl_s:7.3f} s, {trl_rows:,} rows, fill {100 * trl_fill:.3f} % "
        "(default map batches of 1000)"
    )
    print(f"speed-up pack_bfd vs TRL:     {trl_s / ours:7.1f}x  (with rows built: {trl_s / with_rows:.1f}x)")
    if not args.skip_trl_whole:
        whole_s, whole_rows, whole_fill = time_trl(dataset, {"batch_size": None})
        print(
            f"TRL bfd, one batch:           {whole_s:7.3f} s, {whole_rows:,} rows, fill {100 * whole_fill:.3f} % "
            "(map_kwargs={'batch_size': None})"
        )
        print(f"speed-up vs TRL one batch:    {whole_s / ours:7.1f}x  (with rows built: {whole_s / with_rows:.1f}x)")
        print(f"same bin count as TRL's whole-dataset BFD: {whole_rows == len(bins)}")


if __name__ == "__main__":
    main()
