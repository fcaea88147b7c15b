"""An append-only JSONL journal keyed by id: the durable record of expensive answers (teacher completions, LLM
label verdicts) written the moment each arrives, so a killed run loses nothing and the next run asks only for
what is missing (the open-r1 way: skip the ids already written).

Each record is one line written with a single `write` on an unbuffered file: once `append` returns, the line is
in the OS and survives the process being killed. `fsync` runs every `fsync_every_s` and on close, for power
loss. A kill in the middle of a write can leave a torn last line; opening the journal cuts it off (it was never
acknowledged, so its request is simply made again).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path


class Journal:
    def __init__(self, path: str | Path, key: str, fsync_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync_every_s = fsync_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        self.torn_bytes = self._load()
        self._fh = self.path.open("ab", buffering=0)
        self._last_sync = time.monotonic()

    def _load(self) -> int:
        """Read every complete line; cut off a torn tail. Returns how many bytes were cut."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline was never acknowledged
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self._records[record[self.key]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{self.path}:{number}: unreadable journal line ({exc}); move the file away to start over"
                ) from exc
        if end < len(data):
            with self.path.open("r+b") as fh:
                fh.truncate(end)
        return len(data) - end

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def records(self) -> Iterator[dict]:
        return iter(self._records.values())

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # a raw write may take only part of a very long line
            view = view[self._fh.write(view) :]
        self._records[record[self.key]] = record
        if time.monotonic() - self._last_sync >= self.fsync_every_s:
            os.fsync(self._fh.fileno())
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
