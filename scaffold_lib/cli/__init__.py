"""The `scaffold` command: every stage of the method from a shell, through the same stage functions, checks and
configuration (presets + overrides) as the Dagster assets. `scaffold --help` lists the commands; settings come from
the instance's preset (`scaffold init`), `--preset`, `--set section.key=value` and each command's own flags."""

from __future__ import annotations

import argparse
import functools
import sys

from scaffold_lib import stages
from scaffold_lib.cli import stage_commands, tool_commands
from scaffold_lib.cli.flags import CliError, add_config_flags, add_global_options, resolved_for_help


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser: a subcommand per command of the stage table (its stages' settings as flags), `run`, and the tool
    commands. Each flag's help shows the value the configuration of `argv`'s global options resolves to."""
    parser = argparse.ArgumentParser(prog="scaffold", description=__doc__)
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    resolved = functools.cache(lambda: resolved_for_help(argv))

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help)

    def config_flags(p: argparse.ArgumentParser, paths) -> None:
        add_config_flags(p, list(dict.fromkeys(paths)), resolved)

    for name in stages.commands():
        command = stage_commands.command(name)
        p = add_command(name, command.help)
        config_flags(p, [path for stage in stages.of_command(name) for path in stage.flags])
        command.arguments(p)
        p.set_defaults(func=command.run)
    add_command("run", stage_commands.RUN.help).set_defaults(func=stage_commands.RUN.run)
    tool_commands.add_commands(add_command, config_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a stage or a quality gate failed (the message says why); 2 bad input or usage."""
    from scaffold_lib.core.devices import spread_malloc_arenas

    spread_malloc_arenas()  # before any DuckDB, Arrow, torch or tokenizer thread exists
    args = build_parser(argv).parse_args(argv)
    from scaffold_lib.core.errors import RunFailed, UserError

    def fail(exc: BaseException, code: int) -> int:
        print(f"scaffold {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return code

    try:
        args.func(args)
    except RunFailed as exc:
        return fail(exc, 1)
    except (CliError, UserError) as exc:
        return fail(exc, 2)
    except BrokenPipeError:  # `scaffold label … | head` is fine
        return 0
    return 0
