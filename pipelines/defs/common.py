"""Small helpers shared by the asset modules: pools, groups, and reading an upstream asset's metadata."""

import dagster as dg

# DuckDB allows one writer process: every asset that writes the warehouse runs in this pool (limit 1)
WAREHOUSE_POOL = "duckdb_writer"
# one trainer at a time (the GPU op); its own pool so training never blocks the data stages' writes
GPU_POOL = "gpu"

DATA_GROUP, STUDENT_GROUP = "data", "student"


def upstream_metadata(context: dg.AssetExecutionContext, key: str, field: str):
    """A metadata value from the latest materialisation of asset `key` (how assets pass ids, not objects)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"asset {key!r} has never been materialised: materialise it first")
    entry = event.asset_materialization.metadata.get(field)
    if entry is None:
        raise dg.Failure(f"the latest materialisation of {key!r} has no metadata {field!r}")
    return entry.value


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
