"""The `scaffold` command: each stage of the method usable from a shell. `scaffold --help` lists them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scaffold_lib import paths


class CliError(Exception):
    """An error for the user: printed as one line, exit code 2, no traceback."""


def _read_trace_lines(path: Path):
    """(line number, id, trace) for each line of a JSONL file with `id` and `trace`."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CliError(f"{path}: cannot open: {exc.strerror}") from exc
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CliError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               "re-encode the file as UTF-8") from exc
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CliError(f"{path}:{number}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
            if not isinstance(row, dict):
                raise CliError(f"{path}:{number}: expected a JSON object with 'id' and 'trace'")
            for field_name in ("id", "trace"):
                if field_name not in row:
                    raise CliError(f"{path}:{number}: missing field {field_name!r}")
            if not isinstance(row["trace"], str):
                raise CliError(f"{path}:{number}: field 'trace' must be a string, got {type(row['trace']).__name__}")
            for field_name, value in (("id", str(row["id"])), ("trace", row["trace"])):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:  # valid JSON such as "\ud800", but not writable as UTF-8
                    raise CliError(f"{path}:{number}: field {field_name!r} contains an unpaired surrogate "
                                   f"at character {exc.start}") from exc
            yield number, str(row["id"]), row["trace"]


def cmd_label(args: argparse.Namespace) -> None:
    from scaffold_lib.segmentation import segment
    from scaffold_lib.signals import KeywordFileError, LabellerConfig, label_steps

    config = LabellerConfig(keywords_path=args.keywords)
    out = sys.stdout
    try:
        for _, trace_id, trace in _read_trace_lines(Path(args.traces)):
            steps = segment(trace)
            for idx, (text, label) in enumerate(zip(steps, label_steps(steps, config))):
                out.write(json.dumps({"trace_id": trace_id, "idx": idx, "text": text, "signal": label.signal,
                                      "labeller": label.labeller}, ensure_ascii=False) + "\n")
    except KeywordFileError as exc:
        raise CliError(str(exc)) from exc


def cmd_data(args: argparse.Namespace) -> None:
    """Run the data stages (problems -> traces -> steps -> labels) into the warehouse, without Dagster."""
    from pydantic import ValidationError

    from scaffold_lib.problems import FieldMap, GeneratorConfig, ProblemFileError, generate_problems, load_problem_file
    from scaffold_lib.stages import generate_teacher_traces, label_signals, segment_traces, store_problems
    from scaffold_lib.teachers import ProgrammaticTeacher
    from scaffold_lib.warehouse import Warehouse

    wh = Warehouse(args.warehouse)
    if args.problems_file:
        try:
            loaded = load_problem_file(args.problems_file, FieldMap(), lenient=args.lenient)
        except ProblemFileError as exc:
            raise CliError(str(exc)) from exc
        reports = [store_problems(wh, loaded.problems, loaded.quarantined)]
    else:
        try:
            gen_config = GeneratorConfig(n_problems=args.n_problems, seed=args.seed)
        except ValidationError as exc:
            raise CliError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                     for e in exc.errors())) from exc
        reports = [store_problems(wh, generate_problems(gen_config))]
    reports.append(generate_teacher_traces(wh, ProgrammaticTeacher()))
    reports.append(segment_traces(wh))
    reports.append(label_signals(wh))
    for r in reports:
        print(r.summary())
    print(f"warehouse: {wh.path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaffold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("label", help="segment and keyword-label traces from a JSONL file (fields: id, trace)")
    p.add_argument("traces", help="JSONL file, one {\"id\": ..., \"trace\": ...} per line")
    p.add_argument("--keywords", default=None, help="keyword file (TOML) replacing the built-in one")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("data", help="run the data stages into the DuckDB warehouse (no Dagster)")
    p.add_argument("--warehouse", default=str(paths.default_warehouse()))
    p.add_argument("--n-problems", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems-file", default=None, help="JSONL/Parquet problems (GSM8K format by default)")
    p.add_argument("--lenient", action="store_true", help="quarantine bad rows instead of stopping")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"scaffold {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `scaffold label … | head` is fine
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
