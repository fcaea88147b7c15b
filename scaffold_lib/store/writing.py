"""How stages write the warehouse: holding it open for a whole stage, and writing one batch behind the work."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


def in_session(stage):
    """Run a stage with the warehouse held open (its many batched reads and writes share one open database)."""

    @functools.wraps(stage)
    def run(store, *args, **kwargs):
        with store.warehouse.session():
            return stage(store, *args, **kwargs)

    return run


class BehindWriter:
    """Warehouse writes one batch behind, in a background thread: DuckDB inserts a batch (it releases the GIL) while
    Python prepares the next. At most one batch waits; a failed write raises at the next `submit` or on leaving the
    block, and each batch is still one transaction, so an interrupted stage keeps every batch written before."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warehouse-writer")
        self._last: Future | None = None
        self.results: list = []

    def submit(self, write: Callable, *args) -> None:
        self.wait()
        self._last = self._pool.submit(write, *args)

    def wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            self.results.append(last.result())

    def __enter__(self) -> BehindWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)
