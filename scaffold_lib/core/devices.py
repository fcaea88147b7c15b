"""Which device the student and the local teacher run on, and the process settings that let them use it well."""

from __future__ import annotations

import ctypes
import functools

M_ARENA_MAX = -8  # mallopt parameter, glibc's malloc.h


def pick_device(name: str = "auto"):
    """CUDA when present (with "auto"), else the CPU; or exactly the named device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def spread_malloc_arenas(arenas: int = 64) -> None:
    """Lets every thread take its own glibc malloc arena. With the default cap (8 per core) DuckDB's, Arrow's and
    torch's threads use them all up in a long process, and the tokenizer's workers, started last, share an arena and
    queue on its lock (bench/bench_scale.py: tokenizing 3x slower). Effective only before the cap is first reached,
    hence called first thing by each entry point that runs stages (the CLI, the Dagster code location, the
    training launcher, the benches that run stages), never on import of the library. No-op off glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (AttributeError, OSError):
        pass
