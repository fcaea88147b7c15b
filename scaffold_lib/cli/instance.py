"""What the `scaffold` commands find in the instance: its store, its registered versions, and the handles that
earlier commands and Dagster runs wrote there."""

from __future__ import annotations

import argparse
from typing import Any

from scaffold_lib import stages
from scaffold_lib.cli.flags import CliError


def store_of(args: argparse.Namespace):
    from scaffold_lib.store.store import Store

    return Store.at(args.home)


def newest_handle(args: argparse.Namespace, name: str, run_id: str | None = None, hint: str = "") -> Any:
    """The handle stage `name` wrote in run `run_id`, or in its newest run."""
    from scaffold_lib.store.handles import HandleNotFound, load_handle

    try:
        return load_handle(args.home, name, stages.stage(name).handle, run_id)
    except HandleNotFound as exc:
        command = stages.stage(name).command
        raise CliError(f"{exc}: run `scaffold {command}` first{hint}") from exc


def model_handle(args: argparse.Namespace, name: str, ref: str | None):
    """The newest trained model of stage `name`, or the registered version `ref` (champion / challenger / N)."""
    from scaffold_lib.store.handles import all_handles
    from scaffold_lib.student.handles import BASELINE_SUFFIX, ModelHandle

    if ref is None:
        return newest_handle(args, name)
    store = store_of(args)
    model_name = store.model_name + (BASELINE_SUFFIX if name == "baseline_model" else "")
    version = registered_version(args, ref, model_name)
    for handle in reversed(all_handles(args.home, name, ModelHandle)):
        if handle.model_name == model_name and handle.version == version:
            return handle
    raise CliError(f"{model_name} v{version} has no training record in {args.home}/handles (it was trained elsewhere)")


def registered_version(args: argparse.Namespace, ref: str, model_name: str | None = None) -> str:
    from scaffold_lib.store import registry

    try:
        return registry.resolve_version(store_of(args).registry, ref, model_name)
    except LookupError as exc:
        raise CliError(str(exc)) from exc
