"""The `scaffold` command's settings: its global options (`--home`, `--preset`, `--set`) and its flags, every one
derived from a field of `PipelineConfig` by one helper (`add_config_flags`): the flag is the field's name
(`--learning-rate` for `train.learning_rate`) or the shorter one the field declares (`json_schema_extra={"flag":
"steps"}` on `train.max_steps`), its type and choices are the field's, and its default is left to the configuration
the command resolves (instance preset, `--preset`, `--set`), which its help shows."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from scaffold_lib.config import ConfigError, PipelineConfig, deep_merge, parse_assignments, resolve, set_path
from scaffold_lib.core import paths

FLAG_PREFIX = "cfg:"  # a flag's destination: `cfg:train.max_steps`
GLOBAL_OPTIONS_WITH_VALUE = ("--home", "--preset", "--set")


class CliError(Exception):
    """An error for the user the CLI itself finds: printed as one line, exit code 2, no traceback."""


def config_field(path: str) -> FieldInfo:
    """The pydantic field at `section.key[.key]` of PipelineConfig."""
    model: type[BaseModel] = PipelineConfig
    *parents, last = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[last]


def config_value(config: BaseModel, path: str) -> Any:
    """The value at `section.key[.key]` of a resolved PipelineConfig."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def flag_of(path: str) -> str:
    """`--name` of the setting at `path`: the field's own `flag`, else its name."""
    extra = config_field(path).json_schema_extra or {}
    return "--" + str(extra.get("flag", path.rsplit(".", 1)[-1])).replace("_", "-")


def _argparse_type(annotation: Any) -> tuple[Any, dict]:
    """(type, extra argparse kwargs) of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _argparse_type(inner[0])
    if origin is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return typing.get_args(annotation)[0], {"nargs": "+"}
    if annotation is bool:
        return bool, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def add_config_flags(
    parser: argparse.ArgumentParser, config_paths: Sequence[str], resolved: Callable[[], BaseModel | None]
) -> None:
    """A flag for each setting in `config_paths`. The CLI never types a default of its own: the default is the
    configuration's, and the help shows the value `resolved()` gives (the instance's) beside the library's."""
    config = resolved()
    for path in config_paths:
        field = config_field(path)
        kind, extra = _argparse_type(field.annotation)
        library = field.get_default(call_default_factory=True)
        here = config_value(config, path) if config is not None else library
        default = f"default: {here!r}" + (f", library default: {library!r}" if here != library else "")
        # argparse %-formats help text: a literal % in a description ("~30 % more compute") must be doubled
        text = f"{field.description or path} [{path}; {default}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": FLAG_PREFIX + path, "default": argparse.SUPPRESS, "help": text, **extra}
        flag = flag_of(path)
        if "action" not in extra:
            kwargs["type"] = kind
            if "choices" not in extra:  # `--steps STEPS`, not argparse's `--steps CFG:TRAIN.MAX_STEPS`
                kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, path: str) -> Any:
    """The value a config flag was given on the command line, or None."""
    return getattr(args, FLAG_PREFIX + path, None)


def flag_overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(FLAG_PREFIX):
            set_path(out, dest.removeprefix(FLAG_PREFIX), value)
    return out


def settings(args: argparse.Namespace, extra: dict | None = None):
    """The resolved configuration of this command: instance preset (or --preset), --set, flags, then `extra`."""
    try:
        overrides = deep_merge(deep_merge(parse_assignments(args.set or []), flag_overrides(args)), extra or {})
        return resolve(args.home, args.preset, overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        default=str(paths.dagster_home()),
        help="the instance folder: warehouse, MLflow, artifacts (default: $DAGSTER_HOME or ./dagster_home)",
    )
    parser.add_argument("--preset", default=None, help="a named preset (`scaffold presets`); default: the instance's")
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.max_steps=400 (repeatable)",
    )


def _command_index(argv: list[str]) -> int | None:
    """Where the subcommand stands in `argv` (the first word that is neither a global option nor its value)."""
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
        elif word.startswith("--") and "=" not in word and any(o.startswith(word) for o in GLOBAL_OPTIONS_WITH_VALUE):
            skip = True  # argparse also takes an unambiguous prefix such as --pre
        elif not word.startswith("-"):
            return i
    return None


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in `argv`, or None."""
    index = _command_index(argv)
    return None if index is None else argv[index]


def resolved_for_help(argv: list[str] | None = None) -> PipelineConfig | None:
    """The configuration the command in `argv` will run with (its global options applied), to show each flag's
    default; None when the options do not resolve (the command itself then reports why)."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    add_global_options(pre)
    known, _ = pre.parse_known_args(argv[: _command_index(argv)])
    try:
        return settings(known).config
    except CliError:
        return None
