"""Dagster wiring for the Reasoning Scaffolding pipeline. All logic lives in `scaffold_lib`."""
