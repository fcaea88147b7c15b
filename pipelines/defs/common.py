"""What the Dagster modules share: pools, the instance's configuration, run-config classes derived from the
library's config sections, and small metadata helpers.

Run config is never typed here: each asset's config class is built from its section of
`scaffold_lib.config.PipelineConfig`, with the instance's preset (`$DAGSTER_HOME/scaffold.toml`) as defaults. So the
launchpad shows the values schedules and sensors will run with, and changing the preset (`scaffold init`) changes
them after a code-location reload.
"""

import base64
import typing
from pathlib import Path

import dagster as dg
from pydantic import BaseModel, Field, create_model

from scaffold_lib.checks import Check
from scaffold_lib.config import PipelineConfig, Resolved, resolve
from scaffold_lib.core import paths

# The stage table's pools as Dagster pools (limit 1 each, dagster_home/dagster.yaml): DuckDB allows one writer
# process, so every stage that writes the warehouse runs in `duckdb_writer`; one trainer at a time (the GPU op) in
# `gpu`, its own pool so training never blocks the data stages' writes
POOLS = {"warehouse": "duckdb_writer", "accelerator": "gpu"}
FLEET_GROUP = "teacher_fleet"  # the partitioned teacher of a fleet's backfill (Dagster only)


def instance_config() -> Resolved:
    """The configuration this instance runs with (its recorded preset and overrides)."""
    return resolve(paths.dagster_home())


def _dagster_type(annotation, nested: bool = False):
    """Dagster's config types take a Literal only at the top of a field: inside a dict or list it becomes str (the
    library model validates the value when the run config is turned back into it)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal and nested:
        return str
    if origin in (dict, list):
        return origin[tuple(_dagster_type(a, True) for a in typing.get_args(annotation))]
    return annotation


def _derive(model: type[BaseModel], defaults: BaseModel, name: str) -> type[dg.Config]:
    fields: dict = {}
    for field_name, f in model.model_fields.items():
        if f.exclude:  # secrets (an endpoint's api_key) never become run config
            continue
        value = getattr(defaults, field_name)
        annotation = f.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sub = _derive(annotation, value, f"{name}_{field_name}")
            fields[field_name] = (sub, Field(default_factory=sub, description=f.description))
        else:
            fields[field_name] = (_dagster_type(annotation), Field(default=value, description=f.description))
    return create_model(f"{name}_config", __base__=dg.Config, __doc__=model.__doc__, **fields)


def section_config(*sections: str) -> type[dg.Config]:
    """A run-config class holding these sections of PipelineConfig, defaults from the instance's preset."""
    resolved = instance_config()
    fields = {}
    for section in sections:
        model = PipelineConfig.model_fields[section].annotation
        sub = _derive(model, getattr(resolved.config, section), section)
        fields[section] = (sub, Field(default_factory=sub, description=model.__doc__))
    return create_model("_".join(sections) + "_run_config", __base__=dg.Config, **fields)


def library_config(config: dg.Config, section: str):
    """The library's typed config of `section` from a run config built by `section_config`."""
    model = PipelineConfig.model_fields[section].annotation
    return model.model_validate(getattr(config, section).model_dump())


def stage_failure(exc: Exception) -> dg.Failure:
    """A stage that cannot succeed by retrying (bad input, nothing answered, refused credentials) fails once, loudly."""
    return dg.Failure(" ".join(str(exc).split()), allow_retries=False)


def rounded(value):
    """Floats as a reader wants them in the UI (0.1467, not 0.14666666666666667), inside dicts, lists and JSON
    metadata too; everything else unchanged."""
    if isinstance(value, float):
        return round(value, 4) if value == 0 or abs(value) >= 1e-3 else float(f"{value:.3g}")
    if isinstance(value, dg.JsonMetadataValue):
        return dg.MetadataValue.json(rounded(value.data))
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # plain ones only: Dagster's metadata values are tuple-like records
        return [rounded(v) for v in value]
    return value


def check_result(check: Check) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=check.passed,
        description=check.description,
        metadata=rounded(check.metadata),
        severity=dg.AssetCheckSeverity.ERROR if check.blocking else dg.AssetCheckSeverity.WARN,
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 32) -> str:
    """A curve as one line of text (`2.77 █▇▆▅▄▃▃▂▂▁ 0.91`): the metadata table shows text inline, where a markdown
    image waits behind "[Show Markdown]". Each character is the mean of its share of the values."""
    if not values:
        return ""
    width = min(width, len(values))
    means = [
        sum(chunk) / len(chunk)
        for chunk in (values[i * len(values) // width : (i + 1) * len(values) // width] for i in range(width))
    ]
    low, high = min(means), max(means)
    scale = (len(SPARKS) - 1) / (high - low) if high > low else 0.0
    return f"{values[0]:.3f} {''.join(SPARKS[round((m - low) * scale)] for m in means)} {values[-1]:.3f}"


def png_markdown(path: str, alt: str) -> str:
    """A small PNG inline in asset metadata (the UI renders markdown; a local path would not load in the browser)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"
