"""The `scaffold` command: each stage of the method usable from a shell. `scaffold --help` lists them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scaffold_lib.core import paths


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
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
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
    from scaffold_lib.data.segmentation import segment
    from scaffold_lib.data.signals import KeywordFileError, LabellerConfig, label_steps

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

    from scaffold_lib.data.problems import FieldMap, GeneratorConfig, ProblemFileError, generate_problems, load_problem_file
    from scaffold_lib.data.endpoint import EndpointConfigError
    from scaffold_lib.data.stages import generate_teacher_traces, label_signals, segment_traces, store_problems
    from scaffold_lib.store.warehouse import Warehouse

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
    try:
        reports.append(generate_teacher_traces(wh, _teacher(args)))
        reports.append(segment_traces(wh))
        reports.append(label_signals(wh))
        if args.validate_labels:
            from scaffold_lib.data.label_validation import LabelValidator, ValidatorConfig
            from scaffold_lib.data.stages import validate_signal_labels

            endpoint = _endpoint(args, args.label_model or args.model, temperature=0.0, max_tokens=64)
            validator = LabelValidator(ValidatorConfig(endpoint=endpoint), args.journal_dir)
            reports.append(validate_signal_labels(wh, validator))
    except (EndpointConfigError, ProblemFileError) as exc:
        raise CliError(str(exc)) from exc
    for r in reports:
        print(r.summary())
    print(f"warehouse: {wh.path}")


def _endpoint(args: argparse.Namespace, model: str | None, **overrides):
    import os

    from pydantic import SecretStr, ValidationError

    from scaffold_lib.data.endpoint import EndpointConfig

    if not args.base_url or not model:
        raise CliError("an endpoint needs --base-url and --model")
    try:
        return EndpointConfig(base_urls=args.base_url, model=model, concurrency=args.concurrency,
                              api_key=SecretStr(os.environ.get(args.api_key_env, "EMPTY")),
                              **{"max_tokens": args.max_tokens, "temperature": args.temperature, **overrides})
    except ValidationError as exc:
        raise CliError(str(exc)) from exc


def _teacher(args: argparse.Namespace):
    from scaffold_lib.data.llm_teachers import EndpointTeacher, PromptConfig
    from scaffold_lib.data.teachers import ProgrammaticTeacher
    from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap

    if args.import_traces:
        pairs = [pair.split("=", 1) for pair in args.fields.split(",")] if args.fields else []
        if any(len(pair) != 2 for pair in pairs):
            raise CliError(f"--fields {args.fields!r}: expected name=column pairs separated by commas")
        try:
            fields = TraceFieldMap(**dict(pairs))
        except ValueError as exc:
            raise CliError(f"--fields: {exc}") from exc
        return ImportedTeacher(args.import_traces, fields)
    if args.teacher == "openai":
        return EndpointTeacher(_endpoint(args, args.model), PromptConfig(samples=args.samples), args.journal_dir)
    return ProgrammaticTeacher()


def _registry(args: argparse.Namespace):
    from scaffold_lib.store import registry

    return registry.sqlite_config(paths.dagster_home(), model_name=args.model_name)


def _model_dir(args: argparse.Namespace, ref: str) -> Path:
    """A local directory, or a registry reference (champion / challenger / version number) downloaded from MLflow."""
    from scaffold_lib.store import registry

    if Path(ref).exists():
        return Path(ref)
    try:
        return registry.download_model(_registry(args), ref)
    except Exception as exc:  # MLflow raises several types; the user needs one line
        raise CliError(f"--model {ref!r} is neither a directory nor a registered version/alias: {exc}") from exc


def _version(args: argparse.Namespace, ref: str) -> str:
    from scaffold_lib.store import registry

    try:
        return registry.resolve_version(_registry(args), ref)
    except LookupError as exc:
        raise CliError(str(exc)) from exc


def cmd_pack(args: argparse.Namespace) -> None:
    from scaffold_lib.student.stages import ShardsConfig, build_packed_shards
    from scaffold_lib.student.shards import PackConfig
    from scaffold_lib.store.warehouse import Warehouse

    try:
        report = build_packed_shards(Warehouse(args.warehouse), args.artifacts,
                                     ShardsConfig(pack=PackConfig(row_len=args.row_len)))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps({"base_model": report.base_model, "manifests": report.manifests, "stats": report.stats}, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from scaffold_lib.student.stages import train_student
    from scaffold_lib.student.training import TrainConfig
    from scaffold_lib.store.warehouse import Warehouse

    cfg = TrainConfig(kind=args.kind, beta=args.beta, max_steps=args.steps, batch_size=args.batch_size,
                      learning_rate=args.lr, checkpoint_every=args.checkpoint_every, seed=args.seed)
    wh = Warehouse(args.warehouse)
    manifest = args.manifest or wh.scalar("SELECT manifest_hash FROM shards WHERE kind = ? ORDER BY created_at DESC "
                                          "LIMIT 1", [args.kind])
    if manifest is None:
        raise CliError(f"no {args.kind} shards in {wh.path}: run `scaffold pack` first")
    try:
        trained = train_student(wh, args.artifacts, args.base_model, manifest, cfg)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    r = trained.result
    print(f"trained {args.kind} for {cfg.max_steps} steps (resumed from {r.resumed_from}): loss {r.losses[0]:.3f} -> "
          f"{r.final_loss:.3f}, {r.tokens_per_s:,.0f} tokens/s\nmodel: {trained.path}")


def cmd_eval(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.decoding import DecodeConfig
    from scaffold_lib.student.stages import eval_items
    from scaffold_lib.evaluation.metrics import (EvalConfig, evaluate_baseline, evaluate_scaffold, export_samples,
                                         score_table_markdown)
    from scaffold_lib.student.model import ScaffoldStudent, load_tokenizer
    from scaffold_lib.evaluation.suites import SYNTHETIC, SuiteDataError, get_suite
    from scaffold_lib.store.warehouse import Warehouse

    model_dir = _model_dir(args, args.model)
    model = ScaffoldStudent.from_pretrained(model_dir)
    try:
        suite = get_suite(args.suite)
        cfg = EvalConfig(benchmark=suite.name, limit=args.limit, decode=DecodeConfig(tau=args.tau),
                         variants=args.variants.split(",") if args.variants else EvalConfig().variants)
        items = (eval_items(Warehouse(args.warehouse), "test") if suite.name == SYNTHETIC
                 else suite.load(args.suite_file, data_dir=paths.dagster_home() / "benchmarks", limit=args.limit))
    except SuiteDataError as exc:
        raise CliError(str(exc)) from exc
    if not items:
        raise CliError(f"no held-out problems in {args.warehouse}: run the data stages first")
    evaluate = evaluate_scaffold if model.kind == "scaffold" else evaluate_baseline
    rows, records = evaluate(model, load_tokenizer(model_dir), items, cfg)
    print(score_table_markdown([{**r.as_row(), "model": str(args.model)} for r in rows]))
    if args.samples:
        print(f"per-sample answers: {export_samples(records, args.samples)}")


def cmd_ask(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.decoding import DecodeConfig, ScaffoldDecoder, plain_generate
    from scaffold_lib.student.model import ScaffoldStudent, load_tokenizer

    model_dir = _model_dir(args, args.model)
    model, tokenizer = ScaffoldStudent.from_pretrained(model_dir), load_tokenizer(model_dir)
    if model.kind == "scaffold":
        gen = ScaffoldDecoder(model, tokenizer, DecodeConfig(tau=args.tau)).generate(args.question)
    else:
        gen = plain_generate(model, tokenizer, args.question)
    print(gen.render())
    print(f"\nanswer: {gen.answer}")


def cmd_lineage(args: argparse.Namespace) -> None:
    from scaffold_lib.store import lineage
    from scaffold_lib.store.warehouse import Warehouse

    wh = Warehouse(args.warehouse)
    if args.trace:
        rows = lineage.models_of_trace(wh, args.trace)
        print(f"trace {args.trace} reached {len(rows)} model version(s):")
        for r in rows:
            print(f"  {r['model_name']} v{r['version']} ({r['kind']}), mlflow run {r['mlflow_run_id']}, "
                  f"dagster run {r['dagster_run_id']}")
        return
    version = _version(args, args.model)
    summary = lineage.model_summary(wh, args.model_name, version)
    print(f"{summary['model']}: trained on {summary['traces']} teacher traces of {summary['problems']} problems "
          f"in {summary['shards']} shards")
    for t in lineage.traces_of_model(wh, args.model_name, version)[: args.show]:
        print(f"  trace {t['trace_id']}  problem {t['problem_id']}  ({t['source']}/{t['split']}, {t['teacher']})")
    for s in summary["scores"]:
        print(f"  score {s['benchmark']}/{s['variant']}: {100 * s['accuracy']:.1f} % of {s['n']} "
              f"(eval config {s['eval_config_hash']})")


def cmd_promote(args: argparse.Namespace) -> None:
    from scaffold_lib.store import registry

    version = _version(args, args.version)
    cfg = _registry(args)
    with registry.promotion_lock(cfg):  # a rollback must not interleave with a scheduled promotion
        registry.set_champion(cfg, version, args.reason, who=args.who)
    print(f"champion of {args.model_name} is now version {version} ({args.reason})")


def cmd_scores(args: argparse.Namespace) -> None:
    from scaffold_lib.evaluation.metrics import IncomparableScores, comparison_table_markdown, score_table_markdown
    from scaffold_lib.store.warehouse import Warehouse

    version = _version(args, args.model)
    wh = Warehouse(args.warehouse)
    # the newest evaluation of this version per suite, with the baseline and base rows scored alongside it
    rows = wh.query("""
        SELECT s.* FROM benchmark_scores s JOIN (
            SELECT DISTINCT ON (benchmark) evaluation_id FROM benchmark_scores
            WHERE model_name = ? AND version = ? AND evaluation_id IS NOT NULL
            ORDER BY benchmark, created_at DESC) latest USING (evaluation_id)
        ORDER BY s.benchmark, s.variant""", [args.model_name, version])
    if not rows:
        raise CliError(f"no scores for {args.model_name} v{version}: materialise benchmark_scores")
    try:
        print(comparison_table_markdown(rows))
    except IncomparableScores as exc:
        raise CliError(str(exc)) from exc
    print()
    print(score_table_markdown([{**r, "model": f"{r['model_name']} v{r['version']}"} for r in rows]))


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
    p.add_argument("--teacher", choices=["programmatic", "openai"], default="programmatic",
                   help="openai = any OpenAI-compatible endpoint (vLLM, SGLang, Ollama, OpenAI)")
    p.add_argument("--base-url", action="append", default=[], help="endpoint /v1 URL; repeat to spread the load")
    p.add_argument("--model", default=None, help="model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--samples", type=int, default=1, help="traces per problem")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--journal-dir", default=str(paths.dagster_home() / "journals"),
                   help="completions are journalled here, so an interrupted run resumes")
    p.add_argument("--import-traces", default=None, help="take traces from this JSONL/Parquet file or HF dataset")
    p.add_argument("--fields", default=None, help="import columns, e.g. question=problem,thinking=generation,answer=final")
    p.add_argument("--validate-labels", action="store_true", help="have an LLM confirm/correct the keyword labels")
    p.add_argument("--label-model", default=None, help="model for label validation (default: --model)")
    p.set_defaults(func=cmd_data)

    warehouse = argparse.ArgumentParser(add_help=False)
    warehouse.add_argument("--warehouse", default=str(paths.default_warehouse()), help="DuckDB file")
    warehouse.add_argument("--artifacts", default=str(paths.dagster_home() / "artifacts"), help="shards, models")
    warehouse.add_argument("--model-name", default="scaffold-student", help="registered model name in MLflow")

    p = sub.add_parser("pack", parents=[warehouse], help="build the tokenizer/base model and the packed shards")
    p.add_argument("--row-len", type=int, default=1024)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("train", parents=[warehouse], help="train the scaffold student or the CoT-SFT baseline")
    p.add_argument("--base-model", required=True, help="the base_model `scaffold pack` printed (or a hub id/path)")
    p.add_argument("--kind", choices=["scaffold", "baseline"], default="scaffold")
    p.add_argument("--manifest", default=None, help="shard manifest hash (default: the newest of this kind)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--beta", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[warehouse], help="score a model on the held-out split")
    p.add_argument("--model", required=True, help="model directory, or champion / challenger / version number")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated: predicted,golden,random,summaries_only")
    p.add_argument("--samples", default=None, help="write per-sample answers (JSONL) here")
    p.add_argument("--suite", default="synthetic-arith",
                   help="synthetic-arith (the warehouse's held-out split), gsm8k, math500, strategyqa, csqa, truthfulqa_mc1")
    p.add_argument("--suite-file", default=None, help="the suite's data file (default: $DAGSTER_HOME/benchmarks/<file>)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ask", parents=[warehouse], help="answer one question, printing signal-tagged steps")
    p.add_argument("question")
    p.add_argument("--model", default="champion", help="model directory, or champion / challenger / version")
    p.add_argument("--tau", type=float, default=0.5)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("lineage", parents=[warehouse], help="which traces trained a model / which models used a trace")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="champion / challenger / version number")
    group.add_argument("--trace", help="a trace_id")
    p.add_argument("--show", type=int, default=10, help="how many traces to list")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("promote", parents=[warehouse], help="move the champion alias (e.g. to roll back)")
    p.add_argument("--version", required=True)
    p.add_argument("--reason", default="manual promotion")
    p.add_argument("--who", default=None, help="recorded on the version (default: the OS user)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("scores", parents=[warehouse], help="print the score table of a model version")
    p.add_argument("--model", default="champion")
    p.set_defaults(func=cmd_scores)
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
