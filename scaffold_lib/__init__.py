"""Reasoning Scaffolding (arXiv 2509.23619) as a small library: one module per stage of the method.

problems -> teachers -> segmentation -> signals -> examples/packing -> model/training -> decoding/evaluation,
with warehouse (DuckDB stage tables + row-level lineage) and registry (MLflow). No Dagster import here.
"""

from scaffold_lib.core.devices import spread_malloc_arenas

__version__ = "0.1.0"

# before any DuckDB, Arrow, torch or tokenizer thread exists: glibc fixes its arena cap when first reached
spread_malloc_arenas()
