"""Reasoning Scaffolding (arXiv 2509.23619) as a small library: one module per stage of the method.

problems -> teachers -> segmentation -> signals -> examples/packing -> model/training -> decoding/evaluation,
with warehouse (DuckDB stage tables + row-level lineage) and registry (MLflow). No Dagster import here.
"""

__version__ = "0.1.0"
