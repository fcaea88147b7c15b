"""`make demo`: materialise every asset on the embedded default in one Dagster run against $DAGSTER_HOME, then
print where everything is, the score table and the champion.

    python -m pipelines.demo [--size micro|demo] [--steps N]
"""

import argparse
import os
import sys
import time
from pathlib import Path

SIZES = {
    # micro: seconds, for the end-to-end test; demo: the README's main command (minutes on 2 CPU cores)
    "micro": {"problems": {"n_problems": 60}, "train": {"max_steps": 8, "batch_size": 2, "checkpoint_every": 4},
              "eval": {"limit": 6, "max_tokens": 120}, "shards": {"row_len": 512, "min_fill": 0.5}},
    # two-operation problems over small numbers: a 1.7 M-parameter student learns them in a few CPU minutes
    "demo": {"problems": {"n_problems": 2500, "min_ops": 2, "max_ops": 2, "max_number": 10, "distractor_prob": 0.2},
             # β = 0.1: best of the sweep in docs/results.md at this scale (the library default stays 0.3)
             "train": {"max_steps": 350, "batch_size": 8, "checkpoint_every": 50, "beta": 0.1},
             "eval": {"limit": 150, "tau": 0.0},
             # ~1.8k examples of 120-380 tokens fill 512-token rows to ~94 % (the 1M-length bench: 99.9 %); rows of
             # 512 train ~2x faster than rows of 1024 on CPU, where attention is computed over the whole row
             "shards": {"row_len": 512, "min_fill": 0.93}},
}


def run_config(size: str, steps: int | None = None) -> dict:
    s = SIZES[size]
    train = {**s["train"], **({"max_steps": steps} if steps else {})}
    return {"ops": {
        "problems": {"config": s["problems"]},
        "packed_shards": {"config": s["shards"]},
        "student_model": {"config": train},
        "baseline_model": {"config": train},
        "benchmark_scores": {"config": s["eval"]},
    }}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps per student (override)")
    args = parser.parse_args(argv)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(__file__).resolve().parent.parent / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)

    import dagster as dg

    from pipelines.definitions import defs
    from scaffold_lib.store import registry
    from scaffold_lib.core.paths import default_warehouse
    from scaffold_lib.store.warehouse import Warehouse

    definitions = defs()
    job = definitions.resolve_job_def("full_pipeline")
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, run_config=run_config(args.size, args.steps),
                                        raise_on_error=False)
    elapsed = time.perf_counter() - started
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        print(f"\nThe pipeline run {result.run_id} failed at {failed}; open the Dagster UI (make ui) for the logs.",
              file=sys.stderr)
        return 1
    wh = Warehouse(default_warehouse())
    reg = registry.sqlite_config(home)
    counts = wh.counts()
    scores = wh.query("SELECT * FROM benchmark_scores WHERE dagster_run_id = ? ORDER BY model_name, variant",
                      [result.run_id])
    from scaffold_lib.evaluation.metrics import comparison_table_markdown, score_table_markdown

    print(f"\nReasoning Scaffolding demo: run {result.run_id} finished in {elapsed / 60:.1f} min\n")
    print("Stage tables (DuckDB " + str(wh.path) + "):")
    for table in ("problems", "teacher_traces", "segmented_steps", "signal_labels", "shards", "model_versions",
                  "benchmark_scores", "quarantine"):
        print(f"  {table:<18} {counts[table]:>7} rows")
    print("\nThe comparison table (Pass@1 on the held-out split):\n")
    print(comparison_table_markdown(scores))
    print("\nProcess metrics:\n")
    print(score_table_markdown([{**r, "model": f"{r['model_name']} v{r['version']}"} for r in scores]))
    champion = registry.alias_version(reg, registry.CHAMPION)
    print(f"\nChampion: models:/{reg.model_name}@champion = version {champion or 'none'} (MLflow {reg.tracking_uri})")
    print("Open the UIs with `make ui`: Dagster on http://127.0.0.1:3000, MLflow on http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
