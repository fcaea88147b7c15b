"""The warehouse: stage tables in one DuckDB file, keyed by content ids, written idempotently.

Each row keeps its parent id(s), the Dagster run id that wrote it and (where it applies) the MLflow run id,
so row-level lineage is a join (see `lineage.py`). DuckDB allows one writer process at a time: writers open
short transactions and retry while another process holds the file (Dagster also serialises them in a pool).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from scaffold_lib.core.errors import UserError

SCHEMA: dict[str, str] = {
    "problems": """
        problem_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, split VARCHAR NOT NULL, question VARCHAR NOT NULL,
        answer VARCHAR NOT NULL, answer_type VARCHAR NOT NULL, group_id VARCHAR, solution VARCHAR""",
    "teacher_traces": """
        trace_id VARCHAR PRIMARY KEY, problem_id VARCHAR NOT NULL, teacher VARCHAR NOT NULL, text VARCHAR NOT NULL,
        final_answer VARCHAR, is_correct BOOLEAN NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
        sample INTEGER, answer_text VARCHAR, latency_s DOUBLE, attempts INTEGER, endpoint VARCHAR, finish_reason VARCHAR,
        recorded_correct BOOLEAN""",
    "teacher_failures": """
        failure_id VARCHAR PRIMARY KEY, trace_id VARCHAR NOT NULL, problem_id VARCHAR NOT NULL, teacher VARCHAR NOT NULL,
        error VARCHAR NOT NULL""",
    "segmented_steps": """
        step_id VARCHAR NOT NULL, trace_id VARCHAR NOT NULL, idx INTEGER NOT NULL, text VARCHAR NOT NULL,
        segmenter VARCHAR""",
    "signal_labels": """
        step_id VARCHAR NOT NULL, signal VARCHAR NOT NULL, labeller VARCHAR NOT NULL, keyword VARCHAR,
        confidence DOUBLE NOT NULL, keyword_signal VARCHAR, labelling_key VARCHAR""",
    "llm_label_cache": """
        cache_key VARCHAR PRIMARY KEY, validator VARCHAR NOT NULL, proposed_signal VARCHAR, signal VARCHAR,
        reply VARCHAR, attempts INTEGER NOT NULL""",
    "source_files": """
        file_key VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, path VARCHAR NOT NULL, size BIGINT NOT NULL,
        mtime_ns BIGINT NOT NULL, rows INTEGER NOT NULL, quarantined INTEGER NOT NULL""",
    "quarantine": """
        quarantine_id VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, source_file VARCHAR, line INTEGER, field VARCHAR,
        error VARCHAR NOT NULL, raw VARCHAR""",
    "shards": """
        shard_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, path VARCHAR NOT NULL, n_rows INTEGER NOT NULL,
        n_examples INTEGER NOT NULL, tokens BIGINT NOT NULL, fill_ratio DOUBLE NOT NULL, tokenizer_hash VARCHAR NOT NULL,
        manifest_hash VARCHAR NOT NULL""",
    "manifests": """
        manifest_hash VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, pack_key VARCHAR NOT NULL, parent VARCHAR,
        traces INTEGER NOT NULL, split_examples INTEGER NOT NULL, dropped_examples INTEGER NOT NULL,
        budget_json VARCHAR NOT NULL, masked_steps INTEGER, excluded_traces INTEGER""",
    "manifest_shards": """
        manifest_hash VARCHAR NOT NULL, shard_id VARCHAR NOT NULL, PRIMARY KEY (manifest_hash, shard_id)""",
    "shard_members": """
        shard_id VARCHAR NOT NULL, trace_id VARCHAR NOT NULL, PRIMARY KEY (shard_id, trace_id)""",
    "model_versions": """
        model_name VARCHAR NOT NULL, version VARCHAR NOT NULL, kind VARCHAR NOT NULL, mlflow_run_id VARCHAR NOT NULL,
        manifest_hash VARCHAR NOT NULL, config_json VARCHAR NOT NULL, final_loss DOUBLE,
        PRIMARY KEY (model_name, version)""",
    "model_shards": """
        model_name VARCHAR NOT NULL, version VARCHAR NOT NULL, shard_id VARCHAR NOT NULL,
        PRIMARY KEY (model_name, version, shard_id)""",
    "benchmark_scores": """
        score_id VARCHAR PRIMARY KEY, model_name VARCHAR NOT NULL, version VARCHAR NOT NULL, benchmark VARCHAR NOT NULL,
        variant VARCHAR NOT NULL, n INTEGER NOT NULL, accuracy DOUBLE NOT NULL, ci_low DOUBLE, ci_high DOUBLE,
        next_signal_acc DOUBLE, signal_fidelity DOUBLE, answer_consistency DOUBLE, mean_steps DOUBLE,
        eval_config_hash VARCHAR NOT NULL, mlflow_run_id VARCHAR, evaluation_id VARCHAR, split VARCHAR""",
    "contamination": """
        contamination_id VARCHAR PRIMARY KEY, problem_id VARCHAR NOT NULL, suite VARCHAR NOT NULL,
        doc_id VARCHAR NOT NULL, ngram VARCHAR NOT NULL, n INTEGER NOT NULL, action VARCHAR NOT NULL""",
    "experiment_scores": """
        row_id VARCHAR PRIMARY KEY, experiment_id VARCHAR NOT NULL, seed INTEGER NOT NULL, model_name VARCHAR NOT NULL,
        version VARCHAR NOT NULL, variant VARCHAR NOT NULL, split VARCHAR NOT NULL, tau DOUBLE NOT NULL,
        purpose VARCHAR NOT NULL, n INTEGER NOT NULL, accuracy DOUBLE NOT NULL, mean_steps DOUBLE,
        evaluation_id VARCHAR NOT NULL""",
    "item_scores": """
        evaluation_id VARCHAR NOT NULL, model_name VARCHAR NOT NULL, version VARCHAR NOT NULL, benchmark VARCHAR NOT NULL,
        split VARCHAR NOT NULL, variant VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, correct BOOLEAN NOT NULL,
        extracted VARCHAR, gold VARCHAR NOT NULL, n_steps INTEGER, new_tokens INTEGER, stopped_by VARCHAR,
        response VARCHAR,
        PRIMARY KEY (evaluation_id, model_name, version, benchmark, variant, doc_id)""",
}
# Keys the warehouse keeps unique without an index: tables of one row per step, millions of rows. Their primary-key
# index cost a third of the segmenting and labelling time at 6.5 M steps and lived in DuckDB's memory budget; their
# stages append rows their own anti-join found new (`append`), other writes skip or replace existing keys with an
# anti-join, and the `one_row_per_step` check counts duplicates. (A warehouse created before keeps its index; both
# kinds of table work.)
UNINDEXED_KEYS: dict[str, str] = {"segmented_steps": "step_id", "signal_labels": "step_id"}
# every table also records who wrote each row and when
AUDIT_COLUMNS = "dagster_run_id VARCHAR, created_at TIMESTAMP DEFAULT current_timestamp"
# columns added to a table after its first release must be nullable: older warehouse files get them by ALTER


def _known(table: str) -> None:
    if table not in SCHEMA:
        raise KeyError(f"unknown table {table!r}")


def _arrow(rows: Sequence[dict] | pa.Table, dagster_run_id: str | None) -> pa.Table:
    """Rows as an Arrow table, column by column (a key a row lacks is null there), with the writing run's id. An Arrow
    table (a stage's batch, built column-wise) only gets the run id."""
    if isinstance(rows, pa.Table):
        return rows.append_column("dagster_run_id", pa.array([dagster_run_id] * rows.num_rows, pa.string()))
    keys = dict.fromkeys(k for r in rows for k in r)
    columns = {key: [r.get(key) for r in rows] for key in keys}
    columns["dagster_run_id"] = [dagster_run_id] * len(rows)
    return pa.table(columns)


# An insert of at least one DuckDB row group (122,880 rows) is written straight into the file; a smaller one goes
# through the write-ahead log and is written again at the checkpoint. The step stages write in inserts of two row
# groups: 6.5 M labels took 4.2 s instead of 8.6 s, 6.5 M steps 13.7 s instead of 18.8 s (docs/benchmarks.md).
ROW_GROUP_ROWS = 122_880
WRITE_ROWS = 2 * ROW_GROUP_ROWS
COMPRESSIONS = ("auto", "uncompressed")
# DuckDB checkpoints when its write-ahead log passes this size (its default: 16 MB). A checkpoint in the middle of a
# row group compresses and writes that row group again at the next one; with 16 MB, R1 traces written through the log
# in batches of 2,000 (~24 MB) checkpointed after every batch: 100k traces took 28.6 s to write and 506 MB, against
# 17.1 s and 411 MB with 1 GB (docs/benchmarks.md; imports now skip the log, `TRACE_ROW_GROUP_ROWS`, other writers do
# not). The log stays on disk: a crash loses nothing committed, the next open replays it.
CHECKPOINT_THRESHOLD = "1GB"
# Imported traces are written in row groups of this many rows, in inserts of as many: each insert is then written
# straight into the file (no write-ahead log, nothing held in memory until the checkpoint). At DuckDB's default row
# group, 122,880 R1 traces (~1.5 GB), every import batch went through the log and stayed in memory, spilling past
# the memory limit, until the checkpoint rewrote it. Only the trace import opens the file this way: the step tables
# keep the default, which compresses their millions of short rows a third smaller (docs/benchmarks.md).
TRACE_ROW_GROUP_ROWS = 2_048


ATTACHED_AS = "warehouse_file"  # the file's name in a connection that attached it (`row_group_rows`)


def _locked_by_another_process(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


class WarehouseBusyError(RuntimeError):
    """Another process held the DuckDB file for longer than the configured wait."""


class WarehouseMemoryError(UserError):
    """A query needed more memory than DuckDB may use: a setting to change (`SCAFFOLD_DUCKDB_MEMORY`)."""


class Warehouse:
    def __init__(self, path: str | Path, lock_timeout_s: float = 300.0) -> None:
        self.path = Path(path).expanduser().resolve()
        self.lock_timeout_s = lock_timeout_s
        # DuckDB's own default is 80 % of the RAM; joins and sorts beyond the limit spill to <file>.tmp/. No query
        # holds a corpus (packing reads parts of READ_PART_CHARS), and a larger pool mostly caches blocks already read:
        # from 1 M to 6.5 M steps the data stages' peak grew by 0.47 GB at 512 MB as it filled, by 0.11 GB at 192 MB,
        # which cost them about 5 % (docs/benchmarks.md)
        self.memory_limit = os.environ.get("SCAFFOLD_DUCKDB_MEMORY", "192MB")
        # DuckDB compresses text as it writes (zstd for trace-length strings, FSST for steps), which halves its write
        # speed; `uncompressed` trades a file about 3x larger for writes about twice as fast (docs/benchmarks.md)
        self.compression = os.environ.get("SCAFFOLD_DUCKDB_COMPRESSION", "auto")
        if self.compression not in COMPRESSIONS:
            raise UserError(
                f"SCAFFOLD_DUCKDB_COMPRESSION={self.compression!r}: choose one of {list(COMPRESSIONS)} (auto: DuckDB "
                "compresses text; uncompressed: writes about twice as fast, a file about 3x larger)"
            )
        self._held: duckdb.DuckDBPyConnection | None = None
        self._attached = False  # the held connection attached the file (`session(row_group_rows=...)`)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            for table, columns in SCHEMA.items():
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns}, {AUDIT_COLUMNS})")
                self._add_new_columns(con, table, columns)
            indexed = {
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' "
                    "AND database_name = current_database()"
                ).fetchall()
            }
        self._unindexed = {t: key for t, key in UNINDEXED_KEYS.items() if t not in indexed}

    @staticmethod
    def _add_new_columns(con: duckdb.DuckDBPyConnection, table: str, columns: str) -> None:
        """Bring a table from an older release up to SCHEMA (compared against a scratch table of the same DDL)."""
        have = {r[1] for r in con.execute(f"PRAGMA table_info('{table}')").fetchall()}
        con.execute(f"CREATE OR REPLACE TEMP TABLE schema_probe ({columns})")
        for _, name, type_, *_ in con.execute("PRAGMA table_info('schema_probe')").fetchall():
            if name not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {type_}")
        con.execute("DROP TABLE schema_probe")

    @contextlib.contextmanager
    def session(self, row_group_rows: int | None = None) -> Iterator[None]:
        """Keep the file open for a stage's many small reads and writes (each would otherwise open the database
        anew); other processes wait for it as they would for one long write. `row_group_rows`: rows of the row
        groups this session writes (a multiple of 2,048; DuckDB's default when not given)."""
        if self._held is not None:
            yield
            return
        with self.connect(row_group_rows) as con:
            self._held, self._attached = con, row_group_rows is not None
            try:
                yield
            finally:
                self._held, self._attached = None, False

    @contextlib.contextmanager
    def connect(self, row_group_rows: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection, waiting (with backoff) while another process holds the file; inside `session()`, a cursor
        of the session's connection.

        Always read-write: DuckDB refuses two connections with different settings in one process, and a
        read-only one would not get past another process's lock either."""
        if self._held is not None:
            cursor = self._held.cursor()
            if self._attached:
                cursor.execute(f"USE {ATTACHED_AS}")  # a cursor starts in the in-memory database
            try:
                with self._memory_hint():
                    yield cursor
            finally:
                cursor.close()
            return
        retrying = Retrying(
            retry=retry_if_exception(_locked_by_another_process),
            stop=stop_after_delay(self.lock_timeout_s),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        try:
            con = retrying(self._open, row_group_rows)
        except duckdb.IOException as exc:
            if _locked_by_another_process(exc):
                raise WarehouseBusyError(
                    f"{self.path} stayed locked by another process for {self.lock_timeout_s:.0f}s: {exc}"
                ) from exc
            raise
        try:
            with self._memory_hint():
                yield con
        finally:
            con.close()

    def _open(self, row_group_rows: int | None) -> duckdb.DuckDBPyConnection:
        """The file as DuckDB's database; with `row_group_rows`, attached to an in-memory one with that row group size
        (an option of ATTACH only)."""
        if row_group_rows is None:
            return duckdb.connect(str(self.path), config=self._config())
        con = duckdb.connect(":memory:", config=self._config())
        try:
            con.execute(f"ATTACH ? AS {ATTACHED_AS} (ROW_GROUP_SIZE {int(row_group_rows)})", [str(self.path)])
            con.execute(f"USE {ATTACHED_AS}")
        except BaseException:
            con.close()
            raise
        return con

    def _config(self) -> dict[str, str]:
        config = {
            "memory_limit": self.memory_limit,
            "checkpoint_threshold": CHECKPOINT_THRESHOLD,
            # DuckDB's default for a file; an in-memory database (`_open` with `row_group_rows`) would spill to ./.tmp
            "temp_directory": f"{self.path}.tmp",
            # a checkpoint's vacuum merges every table's row groups smaller than the default, so the first checkpoint
            # after an import rewrote all the traces (18 s more segmenting at 100k R1 traces). Row groups whose rows
            # were all deleted (a relabel) are still dropped without it; a partial upsert leaves its deleted rows.
            "max_vacuum_tasks": "0",
        }
        if self.compression != "auto":
            config["force_compression"] = self.compression
        return config

    @contextlib.contextmanager
    def _memory_hint(self) -> Iterator[None]:
        try:
            yield
        except duckdb.OutOfMemoryException as exc:
            raise WarehouseMemoryError(
                f"{self.path}: a query needed more than DuckDB's memory limit of {self.memory_limit}; set "
                f"SCAFFOLD_DUCKDB_MEMORY higher (e.g. 1GB) and run again: what was written is kept, the stage "
                f"resumes. DuckDB said: {str(exc).splitlines()[0]}"
            ) from exc

    def insert_new(self, table: str, rows: Sequence[dict] | pa.Table, dagster_run_id: str | None = None) -> int:
        """Insert rows whose key is not there yet (nor earlier in the batch); returns how many were new. Re-running is
        a no-op. Keyed by the primary key, or for the step tables by an anti-join on their unindexed key."""
        _known(table)
        if not len(rows):
            return 0
        data = _arrow(rows, dagster_run_id)
        column = self._unindexed.get(table)  # an unindexed key column
        insert = (
            f"INSERT INTO {table} BY NAME SELECT * FROM (SELECT DISTINCT ON ({column}) * FROM incoming) i "
            f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{column} = i.{column})"
            if column
            else f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM incoming"
        )
        with self.connect() as con:
            con.register("incoming", data)
            con.execute("BEGIN TRANSACTION")
            before = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            con.execute(insert)
            after = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            con.execute("COMMIT")
            con.unregister("incoming")
        return after - before

    def append(self, table: str, rows: pa.Table, dagster_run_id: str | None = None) -> int:
        """Insert rows a stage has already found new, with no key check: a step table's anti-join against millions of
        rows cost more than the write itself (docs/benchmarks.md). Only inside `session()`, where no other process can
        write between the stage's own pending query and this write; the stage's query must exclude every key already
        there, and the `one_row_per_step` check counts duplicates should one ever get through."""
        _known(table)
        if self._held is None:
            raise RuntimeError("Warehouse.append writes rows found new in this session: call it inside session()")
        if not len(rows):
            return 0
        with self.connect() as con:
            # one chunk: DuckDB writes an insert of several chunks from several threads, into half-full row groups
            con.register("incoming", _arrow(rows, dagster_run_id).combine_chunks())
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
            con.unregister("incoming")
        return len(rows)

    def upsert(self, table: str, rows: Sequence[dict] | pa.Table, dagster_run_id: str | None = None) -> int:
        """Insert rows, replacing those with the same key (a later labelling stage refining a row)."""
        _known(table)
        if not len(rows):
            return 0
        data = _arrow(rows, dagster_run_id)
        column = self._unindexed.get(table)  # an unindexed key column
        with self.connect() as con:
            con.register("incoming", data)
            if column:
                con.execute("BEGIN TRANSACTION")
                con.execute(f"DELETE FROM {table} WHERE {column} IN (SELECT {column} FROM incoming)")
                con.execute(
                    f"INSERT INTO {table} BY NAME SELECT * FROM (SELECT DISTINCT ON ({column}) * FROM incoming)"
                )
                con.execute("COMMIT")
            else:
                con.execute(f"INSERT OR REPLACE INTO {table} BY NAME SELECT * FROM incoming")
            con.unregister("incoming")
        return len(rows)

    def parquet_rows(self, urls: Sequence[str]) -> int:
        """Rows of Parquet files read in place by DuckDB, local or at fsspec URLs (their filesystems are
        registered with the connection), e.g. to check shards where they are stored."""
        with self.connect() as con:
            for url in urls:
                if "://" in url and not url.startswith("file://"):
                    fs = fsspec.filesystem(url.split("://", 1)[0])
                    if not con.filesystem_is_registered(
                        fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
                    ):
                        con.register_filesystem(fs)
            return con.execute("SELECT count(*) FROM read_parquet(?)", [list(urls)]).fetchone()[0]

    def stream(self, sql: str, params: Sequence | dict | None = None, batch_rows: int = 10_000) -> Iterator[list[dict]]:
        """The query's rows in batches of at most `batch_rows`, read as DuckDB produces them: Python holds one batch
        at a time, whatever the table's size. Writes in between (`insert_new` from the same process) are fine: the
        reading query sees the table as it was when it started."""
        for batch in self.stream_arrow(sql, params, batch_rows):
            yield batch.to_pylist()

    def stream_arrow(
        self, sql: str, params: Sequence | dict | None = None, batch_rows: int = 10_000
    ) -> Iterator[pa.Table]:
        """`stream`, as Arrow tables: for stages that work on whole columns and keep text out of Python objects."""
        with self.connect() as con:
            reader = con.sql(sql, params=params or None).to_arrow_reader(batch_rows)
            for batch in reader:
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])

    def missing(self, table: str, column: str, keys: Sequence[str]) -> set[str]:
        """Which of `keys` no row of `table` has in `column` (an anti-join in DuckDB, not a Python set of the
        table's keys)."""
        if table not in SCHEMA or not column.isidentifier():
            raise KeyError(f"unknown table or column {table!r}.{column!r}")
        if not keys:
            return set()
        rows = self.query(
            f"SELECT w.key FROM wanted w ANTI JOIN {table} t ON t.{column} = w.key", tables={"wanted": keys}
        )
        return {r["key"] for r in rows}

    def query(
        self, sql: str, params: Sequence | dict | None = None, tables: dict[str, Sequence[str]] | None = None
    ) -> list[dict]:
        """Rows as dicts. Values from users always go through `params`, never into `sql`; `tables` are lists of keys
        the query can join as tables of one column, `key`."""
        with self.connect() as con:
            for name, keys in (tables or {}).items():
                con.register(name, pa.table({"key": pa.array(list(keys), pa.string())}))
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def scalar(self, sql: str, params: Sequence | dict | None = None):
        with self.connect() as con:
            return con.execute(sql, params or []).fetchone()[0]

    def count(self, table: str) -> int:
        """Rows of one of the warehouse's tables."""
        _known(table)
        return self.scalar(f"SELECT count(*) FROM {table}")

    def counts(self) -> dict[str, int]:
        with self.connect() as con:
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in SCHEMA}
