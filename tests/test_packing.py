"""pack_bfd: a valid packing, and exactly the bins of a plain best-fit-decreasing reference."""

from __future__ import annotations

import numpy as np
import pytest

from scaffold_lib.student.packing import fill_ratio, pack_bfd


def reference_bfd_loads(lengths: list[int], capacity: int) -> list[int]:
    """Textbook BFD: longest first (stable by index), into the open bin with least room that fits, else a new one."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads: list[int] = []
    for i in order:
        s = lengths[i]
        best, best_room = -1, capacity + 1
        for j, load in enumerate(loads):
            room = capacity - load
            if s <= room < best_room:
                best, best_room = j, room
        if best < 0:
            loads.append(s)
        else:
            loads[best] += s
    return sorted(loads)


def check_valid(lengths, bins, capacity) -> None:
    lengths = np.asarray(lengths)
    for b in bins:
        assert isinstance(b, np.ndarray) and b.dtype == np.int64 and b.size > 0
        assert int(lengths[b].sum()) <= capacity
    flat = np.concatenate(bins) if bins else np.array([], dtype=np.int64)
    assert np.array_equal(np.sort(flat), np.arange(len(lengths)))  # every item exactly once


def check_matches_reference(lengths, capacity) -> list[np.ndarray]:
    bins = pack_bfd(lengths, capacity)
    check_valid(lengths, bins, capacity)
    arr = np.asarray(lengths)
    got = sorted(int(arr[b].sum()) for b in bins)
    assert got == reference_bfd_loads([int(x) for x in arr], capacity)
    return bins


def _random_cases(seed: int, n_cases: int, max_n: int, max_cap: int):
    rng = np.random.default_rng(seed)
    for k in range(n_cases):
        capacity = int(rng.integers(1, max_cap + 1))
        n = int(rng.integers(0, max_n + 1))
        kind = k % 4
        if kind == 0:  # uniform over the whole range
            lengths = rng.integers(1, capacity + 1, size=n)
        elif kind == 1:  # small items only: many per bin
            lengths = rng.integers(1, max(1, capacity // 4) + 1, size=n)
        elif kind == 2:  # a few distinct values, many repeats
            values = rng.integers(1, capacity + 1, size=int(rng.integers(1, 4)))
            lengths = rng.choice(values, size=n)
        else:  # skewed, like token counts
            lengths = np.clip(np.round(rng.lognormal(np.log(max(capacity, 2) / 5), 0.8, size=n)), 1, capacity)
            lengths = lengths.astype(np.int64)
        yield lengths, capacity


@pytest.mark.parametrize(
    ("seed", "n_cases", "max_n", "max_cap"),
    [(0, 400, 12, 10), (1, 300, 60, 40), (2, 120, 300, 128), (3, 15, 2000, 1024)],
)
def test_matches_reference_bfd_on_random_inputs(seed, n_cases, max_n, max_cap):
    for lengths, capacity in _random_cases(seed, n_cases, max_n, max_cap):
        check_matches_reference(lengths, capacity)


@pytest.mark.parametrize(
    ("lengths", "capacity", "n_bins"),
    [
        ([5], 10, 1),
        ([10], 10, 1),
        ([1], 1, 1),
        ([7] * 9, 7, 9),  # all items == capacity: one bin each
        ([1] * 25, 10, 3),  # all items 1
        ([1] * 30, 10, 3),
        ([1] * 31, 10, 4),
        ([6, 5, 5, 4, 3, 3, 2, 2], 10, 3),
        ([4, 8, 1, 4, 2, 1], 10, 2),
    ],
)
def test_edge_cases(lengths, capacity, n_bins):
    bins = check_matches_reference(lengths, capacity)
    assert len(bins) == n_bins


def test_empty_input():
    assert pack_bfd([], 8) == []
    assert pack_bfd(np.array([], dtype=np.int32), 8) == []
    assert fill_ratio([], [], 8) == 0.0


def test_best_fit_choice_is_exact():
    # Sorted: 6, 5, 4, 3. BFD puts 6 -> A(room 4), 5 -> B(room 5), 4 -> A (best fit, room 0), 3 -> B (room 2).
    bins = pack_bfd([3, 6, 4, 5], 10)
    assert [sorted(b.tolist()) for b in bins] == [[1, 2], [0, 3]]


def test_accepts_lists_and_numpy_dtypes():
    a = pack_bfd([3, 6, 4, 5], 10)
    for arr in (
        np.array([3, 6, 4, 5], dtype=np.int32),
        np.array([3, 6, 4, 5], dtype=np.uint16),
        np.array([3.0, 6.0, 4.0, 5.0]),
    ):
        b = pack_bfd(arr, np.int64(10))
        assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_deterministic():
    rng = np.random.default_rng(7)
    lengths = np.clip(np.round(rng.lognormal(5, 0.7, size=20_000)), 16, 1024).astype(np.int64)
    first = pack_bfd(lengths, 1024)
    for _ in range(2):
        again = pack_bfd(lengths.copy(), 1024)
        assert len(again) == len(first)
        assert all(np.array_equal(x, y) for x, y in zip(first, again))
    check_valid(lengths, first, 1024)


def test_fill_ratio():
    lengths = [6, 4, 5]
    bins = pack_bfd(lengths, 10)
    assert len(bins) == 2
    assert fill_ratio(lengths, bins, 10) == pytest.approx(15 / 20)
    assert fill_ratio([10, 10], pack_bfd([10, 10], 10), 10) == 1.0


def test_high_fill_on_token_like_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(5, 0.7, size=100_000)), 16, 1024).astype(np.int64)
    bins = pack_bfd(lengths, 1024)
    check_valid(lengths, bins, 1024)
    assert fill_ratio(lengths, bins, 1024) > 0.995


@pytest.mark.parametrize("capacity", [0, -3])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match=r"capacity must be >= 1"):
        pack_bfd([1, 2], capacity)


def test_bad_capacity_type():
    with pytest.raises(ValueError, match=r"capacity must be an int"):
        pack_bfd([1, 2], 4.5)


def test_too_long_item():
    with pytest.raises(ValueError, match=r"<= capacity \(10\); lengths\[1\] = 11"):
        pack_bfd([3, 11, 12], 10)


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_item(bad):
    with pytest.raises(ValueError, match=rf">= 1; lengths\[2\] = {bad}"):
        pack_bfd([3, 4, bad], 10)


def test_non_integer_lengths():
    with pytest.raises(ValueError, match="whole numbers"):
        pack_bfd([1.5, 2], 10)
    with pytest.raises(ValueError, match="one-dimensional"):
        pack_bfd([[1, 2]], 10)
