"""Sequence packing: ``pack_bfd`` is an exact, bulk best-fit-decreasing bin packer (pure numpy, O(N log N)).

Packed training rows are built from its bins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("lengths must be whole numbers")
    return arr.astype(np.int64, copy=False)


def _check_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise ValueError(f"capacity must be an int, got {capacity!r}")
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    return capacity


def pack_bfd(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Pack items of the given lengths into bins of ``capacity`` with exact best-fit decreasing.

    Exactly the classic BFD: items taken longest first (ties by index), each put into the open bin with the
    least remaining room that still fits it, else into a new bin. Ties between equally full bins are broken
    arbitrarily but deterministically; the number of bins and the multiset of bin loads do not depend on that
    choice, so they equal those of any textbook BFD.

    Returns the bins in creation order, each an int64 array of indices into ``lengths`` (in placement order).
    Every item is in exactly one bin and no bin holds more than ``capacity``. Deterministic.

    Raises ``ValueError`` if ``capacity < 1`` or any length is < 1 or > ``capacity`` (split or drop too-long
    items beforehand).

    How it is fast: items are grouped by length and bins are kept in buckets indexed by remaining room. For a
    length ``s`` the best bucket is the smallest non-empty ``r >= s`` (one ``argmax`` over a bool array); since
    no bucket in ``[s, r)`` is open, each bin of bucket ``r`` takes ``q = r // s`` consecutive items of length
    ``s`` and then drops below ``s`` -- so a whole (length, bucket) pair is placed at once with ``np.repeat``.
    New bins likewise take ``capacity // s`` items each.

    Complexity: O(N log N + U * C / w) time and O(N + C) memory, for N items, U <= min(N, C) distinct lengths
    and capacity C (``w``: the vectorised argmax over C bools, a handful of µs for C = 1024): the sort dominates;
    each (length, bucket) step is O(1) Python work plus numpy work linear in the items it places, and a length
    visits each non-empty bucket at most once. For a fixed capacity this is O(N log N).

    Longer than 80 lines because, with this docstring, it is one function on purpose: the buckets, their sizes and
    the non-empty mask are one structure that the hot loop updates together.
    """
    capacity = _check_capacity(capacity)
    arr = _as_lengths(lengths)
    n = arr.size
    if n == 0:
        return []
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 1:
        bad = int(np.flatnonzero(arr < 1)[0])
        raise ValueError(f"every length must be >= 1; lengths[{bad}] = {int(arr[bad])}")
    if hi > capacity:
        bad = int(np.flatnonzero(arr > capacity)[0])
        raise ValueError(
            f"every length must be <= capacity ({capacity}); lengths[{bad}] = {int(arr[bad])} "
            "(split or drop too-long items before packing)"
        )

    # Items by length, descending, stable by index. Sorting the uint16 "room left" key is a radix sort.
    key = (hi - arr).astype(np.uint16 if hi - lo < 1 << 16 else np.int64)
    order = np.argsort(key, kind="stable")
    distinct, counts = np.unique(arr, return_counts=True)
    distinct = distinct[::-1].tolist()
    counts = counts[::-1].tolist()

    # buckets[r]: stack of int64 arrays of bin ids with exactly r room left (0 < r < capacity, r >= lo).
    buckets: list[list[np.ndarray]] = [[] for _ in range(capacity + 1)]
    sizes = [0] * (capacity + 1)
    nonempty = np.zeros(capacity + 1, dtype=np.bool_)
    nonempty[capacity] = True  # sentinel: "open a new bin"
    sorted_bin = np.empty(n, dtype=np.int64)  # bin of the item at each sorted position
    n_bins = 0
    pos = 0

    for s, c in zip(distinct, counts):
        while c:
            r = s + int(nonempty[s:].argmax())
            if r == capacity:  # nothing open fits: new bins, capacity // s items each
                q = capacity // s
                m = -(-c // q)
                ids = np.arange(n_bins, n_bins + m, dtype=np.int64)
                n_bins += m
            else:
                q = r // s
                avail = sizes[r]
                m = -(-c // q)
                if m >= avail:
                    m = avail
                    stack = buckets[r]
                    ids = stack[0] if len(stack) == 1 else np.concatenate(stack)
                    stack.clear()
                    sizes[r] = 0
                    nonempty[r] = False
                else:
                    ids = _pop(buckets[r], m)
                    sizes[r] = avail - m
            placed = min(c, m * q)
            if q == 1:
                sorted_bin[pos : pos + placed] = ids
            else:
                sorted_bin[pos : pos + placed] = np.repeat(ids, q)[:placed]
            pos += placed
            c -= placed
            # Full bins (q items each) are left with r - q*s < s room; the last bin may get fewer.
            last = placed - (m - 1) * q
            if last == q:
                _push(buckets, sizes, nonempty, r - q * s, ids, lo)
            else:
                if m > 1:
                    _push(buckets, sizes, nonempty, r - q * s, ids[:-1], lo)
                _push(buckets, sizes, nonempty, r - last * s, ids[-1:], lo)

    # Group the items by bin, keeping placement order within each bin.
    by_bin = np.argsort(sorted_bin, kind="stable")
    items = order[by_bin]
    ends = np.cumsum(np.bincount(sorted_bin, minlength=n_bins)).tolist()
    starts = [0] + ends[:-1]
    return [items[a:b] for a, b in zip(starts, ends)]


def _pop(stack: list[np.ndarray], m: int) -> np.ndarray:
    """Take m bin ids (m < total) off the top of a bucket's stack of chunks."""
    taken = []
    while m:
        top = stack[-1]
        if top.size <= m:
            taken.append(stack.pop())
            m -= top.size
        else:
            taken.append(top[-m:])
            stack[-1] = top[:-m]
            m = 0
    return taken[0] if len(taken) == 1 else np.concatenate(taken)


def _push(buckets, sizes, nonempty, room: int, ids: np.ndarray, lo: int) -> None:
    if room < lo:  # no item is that short: the bins are closed for good
        return
    buckets[room].append(ids)
    sizes[room] += ids.size
    nonempty[room] = True


def fill_ratio(lengths: Sequence[int] | np.ndarray, bins: Sequence[np.ndarray], capacity: int) -> float:
    """Total length of the packed items / (number of bins * capacity); 1.0 means no padding. 0.0 for no bins."""
    capacity = _check_capacity(capacity)
    if len(bins) == 0:
        return 0.0
    arr = _as_lengths(lengths)
    total = int(arr[np.concatenate(bins)].sum())
    return total / (len(bins) * capacity)
