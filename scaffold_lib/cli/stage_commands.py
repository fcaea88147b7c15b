"""The `scaffold` commands that run stages, one per command of the stage table (`scaffold_lib.stages`): `data`, `pack`,
`train`, `eval`, `promote`, `experiment`, and `run` (the whole pipeline). Each runs its stages through the runner,
checks included, with the stages' settings as flags; what a command adds is here: options that are no setting
(which model to score, a file to import), where it finds the handles of earlier commands, and what it prints.

A command of the table with no entry here runs its stages with the newest handles of their inputs and prints their
summaries."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scaffold_lib import stages
from scaffold_lib.cli.flags import CliError, given, settings
from scaffold_lib.cli.instance import model_handle, newest_handle, registered_version, store_of


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run(args: argparse.Namespace, names: list[str], inputs: dict | None = None, extra: dict | None = None, **kw):
    """Run these stages of the table with the command's settings; their summaries and checks go to `log` (stdout
    unless the command prints a document there)."""
    from scaffold_lib.runner import new_run_id, run_stages

    resolved = settings(args, extra)
    chosen = [stages.stage(name) for name in names]
    kw.setdefault("run_id", new_run_id())
    return resolved, run_stages(store_of(args), resolved.config, chosen, inputs=inputs, preset=resolved.preset, **kw)


# --- data -------------------------------------------------------------------------------------------------------------


def data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--problems-file",
        action="append",
        default=[],
        help="JSONL/Parquet problems (GSM8K format: question, answer '… #### N'; a split column is "
        "honoured); repeatable; replaces the synthetic generator",
    )
    p.add_argument("--base-url", action="append", default=[], help="endpoint /v1 URL; repeat to spread the load")
    p.add_argument("--model", default=None, help="the endpoint's model name, or the local model for --teacher hf")
    p.add_argument(
        "--import-traces",
        default=None,
        help="take traces (and their problems and gold answers) from this JSONL/Parquet file, folder, saved dataset "
        "or HF dataset name; replaces the synthetic generator unless --source is given",
    )
    p.add_argument(
        "--fields",
        default=None,
        help="import columns over the format's, e.g. question=problem,thinking=generation,answer=final,gold=answer",
    )
    p.add_argument("--validate-labels", action="store_true", help="have an LLM confirm/correct the keyword labels")
    p.add_argument("--label-model", default=None, help="model for label validation (default: --model)")


def data_overrides(args: argparse.Namespace) -> dict:
    """The data command's composite options: a problem file, a trace import, an endpoint or local model."""
    extra: dict = {"problems": {}, "teacher": {}, "labeller": {}}
    if args.problems_file:
        extra["problems"].update(source="files", files=[str(Path(f).resolve()) for f in args.problems_file])
    if args.import_traces:
        pairs = [pair.split("=", 1) for pair in args.fields.split(",")] if args.fields else []
        if any(len(pair) != 2 for pair in pairs):
            raise CliError(f"--fields {args.fields!r}: expected name=column pairs separated by commas")
        source = str(Path(args.import_traces).resolve()) if Path(args.import_traces).exists() else args.import_traces
        extra["teacher"].update(backend="import", import_source=source, import_fields=dict(pairs))
        if given(args, "problems.source") is None and not args.problems_file:
            # the trace file brings its problems: the synthetic generator's would only sit there untraced
            extra["problems"]["source"] = "files"
    backend = extra["teacher"].get("backend") or given(args, "teacher.backend")
    if args.model:
        if backend == "hf":
            extra["teacher"]["hf"] = {"model": args.model}
        else:
            extra["teacher"]["endpoint"] = {"model": args.model}
    if args.base_url:
        extra["teacher"].setdefault("endpoint", {})["base_urls"] = args.base_url
    if args.validate_labels:
        key = given(args, "teacher.endpoint.api_key_env")
        extra["labeller"].update(
            validate_with_llm=True,
            endpoint={
                "base_urls": args.base_url,
                "model": args.label_model or args.model,
                **({"api_key_env": key} if key else {}),
            },
        )
    return {k: v for k, v in extra.items() if v}


def cmd_data(args: argparse.Namespace) -> None:
    """Run the data stages (problems -> traces -> steps -> labels) into the warehouse, without Dagster."""
    extra = data_overrides(args)
    print(f"# {settings(args, extra).describe()}")
    run(args, [s.name for s in stages.of_command("data")], extra=extra)
    print(f"warehouse: {store_of(args).warehouse_path}")


# --- pack, train ------------------------------------------------------------------------------------------------------


def cmd_pack(args: argparse.Namespace) -> None:
    """Pack the shards; the handle as JSON on stdout (the summary and the fill check on stderr)."""
    _, result = run(args, ["packed_shards"], log=to_stderr)
    handle = result.outputs["packed_shards"]
    document = {k: getattr(handle, k) for k in ("base_model", "tokenizer_hash", "manifests", "stats", "budget")}
    print(json.dumps({**document, "handle": str(result.handles["packed_shards"])}, indent=2))


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["scaffold", "baseline", "both"], default="both")
    p.add_argument("--shards-run", default=None, help="the run whose packed shards to train on (default: the newest)")


ARMS = {"scaffold": "student_model", "baseline": "baseline_model"}  # --kind: the stage of each arm


def cmd_train(args: argparse.Namespace) -> None:
    shards = newest_handle(args, "packed_shards", args.shards_run)
    names = list(ARMS.values()) if args.kind == "both" else [ARMS[args.kind]]
    _, result = run(args, names, inputs={"packed_shards": shards}, log=to_stderr)
    for name in names:
        model = result.outputs[name]
        print(
            f"trained {model.kind} for {model.steps} steps (resumed from {model.resumed_from}): loss "
            f"{model.first_loss:.3f} -> {model.final_loss:.3f}, {model.tokens_per_s:,.0f} tokens/s\n"
            f"registered: {model.model_uri} (MLflow run {model.mlflow_run_id})\nmodel: {model.path}"
        )


# --- eval, promote ----------------------------------------------------------------------------------------------------


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="scaffold student: champion / challenger / version (default: newest)")
    p.add_argument("--baseline", default=None, help="baseline version (default: the newest trained baseline)")
    p.add_argument("--no-baseline", action="store_true", help="score the student (and base model) only")
    p.add_argument(
        "--suite-file",
        action="append",
        default=[],
        metavar="[SUITE=]FILE",
        help="a suite's data file in its public format (JSONL/JSON/Parquet), e.g. --suite gsm8k --suite-file my.jsonl; "
        "repeat as SUITE=FILE for several suites (default: eval.suite_files, else <home>/benchmarks/<public name>)",
    )
    p.add_argument("--samples", action="store_true", help="list where the per-sample answers were written")


def suite_file_overrides(args: argparse.Namespace) -> dict:
    """`--suite-file SUITE=FILE` (repeatable), or `--suite-file FILE` when one file suite is scored."""
    from scaffold_lib.evaluation.suites import SUITES, from_warehouse

    files: dict[str, str] = {}
    for named in args.suite_file:
        suite, _, path = named.partition("=")
        if not path or suite not in SUITES:  # a bare path: the one file suite being scored
            suites = given(args, "eval.suites") or settings(args).config.eval.suites
            candidates = [s for s in suites if not from_warehouse(s)]
            if len(candidates) != 1:
                raise CliError(
                    f"--suite-file {named!r}: say which suite it is for (--suite-file SUITE=FILE); "
                    f"file suites scored: {candidates or 'none (add --suite gsm8k, …)'}"
                )
            suite, path = candidates[0], named
        if not Path(path).is_file():
            raise CliError(f"--suite-file {named!r}: {path}: no such file")
        files[suite] = str(Path(path).resolve())
    return {"eval": {"suite_files": files}} if files else {}


def cmd_eval(args: argparse.Namespace) -> None:
    """Score the newest trained pair (or --model/--baseline versions) and store the scores, as the asset does."""
    from scaffold_lib.evaluation.suites import SuiteDataError
    from scaffold_lib.store.handles import all_handles
    from scaffold_lib.student.handles import ShardsHandle

    extra = suite_file_overrides(args)
    student = model_handle(args, "student_model", args.model)
    inputs = {"student_model": student}
    if not args.no_baseline:
        inputs["baseline_model"] = model_handle(args, "baseline_model", args.baseline)
    shards = [
        h
        for h in all_handles(args.home, "packed_shards", ShardsHandle)
        if student.manifest_hash in h.manifests.values()
    ]
    if not shards:
        raise CliError(f"no packed shards record for manifest {student.manifest_hash} in {args.home}/handles")
    inputs["packed_shards"] = shards[-1]
    try:
        _, result = run(args, ["benchmark_scores"], inputs=inputs, extra=extra, log=to_stderr)
    except SuiteDataError as exc:
        raise CliError(str(exc)) from exc
    evaluation = result.outputs["benchmark_scores"]
    print(evaluation.comparison_table + "\n\n" + evaluation.score_table)
    for suite, count in evaluation.quarantined.items():
        print(
            f"{suite}: {count} rows of its file quarantined (the warehouse's quarantine table, stage 'suite:{suite}')"
        )
    if args.samples:
        print("per-sample answers:\n" + "\n".join(f"  {k}: {v}" for k, v in evaluation.samples.items()))


def promote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", default=None)
    p.add_argument("--reason", default="manual promotion")
    p.add_argument("--who", default=None, help="recorded on the version (default: the OS user)")


def cmd_promote(args: argparse.Namespace) -> None:
    """The promotion rule, as the model_promotion asset applies it, on the newest evaluation; or, with --version, the
    champion alias moved by hand (a rollback)."""
    from scaffold_lib.store import registry

    if args.version is None:
        hint = ", or give --version to move the alias by hand"
        evaluation = newest_handle(args, "benchmark_scores", hint=hint)
        who = args.who or "scaffold promote"
        _, result = run(args, ["model_promotion"], inputs={"benchmark_scores": evaluation}, log=to_stderr, who=who)
        outcome = result.outputs["model_promotion"]
        print(f"promotion of v{evaluation.version}: {'yes' if outcome.promoted else 'no'} — {outcome.reason}")
        return
    version = registered_version(args, args.version)
    cfg = store_of(args).registry
    with registry.promotion_lock(cfg):  # a rollback must not interleave with a scheduled promotion
        registry.set_champion(cfg, version, args.reason, who=args.who)
    print(f"champion of {cfg.model_name} is now version {version} ({args.reason})")


# --- the experiment, the whole pipeline, any other stage --------------------------------------------------------------


def cmd_experiment(args: argparse.Namespace) -> None:
    """The data stages, then both arms over seeds, τ (and β) chosen on validation, test scored once, paired tests."""
    from scaffold_lib.runner import new_run_id

    print(f"# {settings(args).describe()}")
    names = [s.name for s in (*stages.of_command("data"), *stages.of_command("experiment"))]
    _, result = run(args, names, run_id=new_run_id("experiment"), stage_log=print)
    report = result.outputs["experiment_report"]
    print("\n" + report.report)
    print(f"report: {report.report_path}\nτ plot: {report.plot_path}\n{report.minutes:.1f} min")


def cmd_run(args: argparse.Namespace) -> None:
    """The whole pipeline in this process, without Dagster."""
    from scaffold_lib.runner import summary

    resolved = settings(args)
    print(f"# {resolved.describe()}")
    _, result = run(args, [s.name for s in stages.PIPELINE])
    header = f"Reasoning Scaffolding ({resolved.preset}): run {result.run_id}"
    promotion = result.outputs["model_promotion"]
    print("\n" + summary(store_of(args), result.outputs["benchmark_scores"], promotion.champion, header))


def cmd_stages(args: argparse.Namespace) -> None:
    """A command of the table without an entry of its own: its stages, on the newest handles of their inputs."""
    chosen = stages.of_command(args.command)
    produced = {s.name for s in chosen}
    needed = {name for s in chosen for name in s.inputs if name not in produced}
    run(args, [s.name for s in chosen], inputs={name: newest_handle(args, name) for name in needed})


@dataclass(frozen=True)
class StageCommand:
    help: str
    run: Callable[[argparse.Namespace], None]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


COMMANDS: dict[str, StageCommand] = {
    "data": StageCommand("run the data stages into the DuckDB warehouse (no Dagster)", cmd_data, data_arguments),
    "pack": StageCommand("prepare the backbone's tokenizer and write the packed shards", cmd_pack),
    "train": StageCommand(
        "train the scaffold student and/or the CoT-SFT baseline; registers each version", cmd_train, train_arguments
    ),
    "eval": StageCommand(
        "score the newest trained pair (or given versions) and store the scores", cmd_eval, eval_arguments
    ),
    "promote": StageCommand(
        "apply the promotion rule to the newest evaluation, or move the champion alias by hand (--version, e.g. to "
        "roll back)",
        cmd_promote,
        promote_arguments,
    ),
    "experiment": StageCommand(
        "does scaffolding beat CoT-SFT? both arms over seeds, τ/β chosen on validation, test scored once, paired "
        "tests, error analysis",
        cmd_experiment,
    ),
}
RUN = StageCommand(
    "the whole pipeline in this process (no Dagster): data, shards, both arms, scores, promotion", cmd_run
)


def command(name: str) -> StageCommand:
    """The stage command `name`, or the generic one for a command the table names without an entry here."""
    return COMMANDS.get(name) or StageCommand(stages.of_command(name)[0].description.split(". ")[0], cmd_stages)
