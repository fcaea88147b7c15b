"""Entry point for `dg dev`, `dg check defs`, `dg launch` and `dagster dev -m pipelines.definitions`."""

from pathlib import Path

import dagster as dg
from transformers.utils import logging as hf_logging

from scaffold_lib.core.devices import spread_malloc_arenas

# the code location is where Dagster's run and step processes start: before any stage's threads exist
spread_malloc_arenas()

# per-shard "Loading weights" bars from transformers only clutter the Dagster run logs
hf_logging.disable_progress_bar()


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
