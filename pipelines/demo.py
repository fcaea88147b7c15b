"""`make demo`: the whole pipeline on a preset (default `demo`: the embedded default) in one Dagster run against
$DAGSTER_HOME, then where everything is, the score table and the champion.

    python -m pipelines.demo [--preset demo|micro|…]

The instance is set to the preset first (`$DAGSTER_HOME/scaffold.toml`), so the asset configs' defaults — what the
launchpad shows and what schedules and sensors run with — are the demo's.
"""

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="demo", help="a named preset (scaffold presets)")
    args = parser.parse_args(argv)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(__file__).resolve().parent.parent / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)

    import dagster as dg

    from scaffold_lib.config import instance_settings, save_instance_settings
    from scaffold_lib.evaluation.stages import EvaluationHandle
    from scaffold_lib.pipeline import summary
    from scaffold_lib.store import registry
    from scaffold_lib.store.handles import load_handle
    from scaffold_lib.store.store import Store

    current, overrides = instance_settings(home)
    if current != args.preset or not (home / "scaffold.toml").exists():
        save_instance_settings(home, args.preset, overrides if current == args.preset else {})
        print(f"{home}: this instance now runs preset {args.preset!r} (was {current!r})")

    from pipelines.definitions import defs

    job = defs().resolve_job_def("full_pipeline")
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    elapsed = time.perf_counter() - started
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        print(
            f"\nThe pipeline run {result.run_id} failed at {failed}; open the Dagster UI (make ui) for the logs.",
            file=sys.stderr,
        )
        return 1
    store = Store.at(home)
    evaluation = load_handle(home, "benchmark_scores", EvaluationHandle, result.run_id)
    champion = registry.alias_version(store.registry, registry.CHAMPION)
    print(
        "\n"
        + summary(
            store,
            evaluation,
            champion,
            f"Reasoning Scaffolding demo ({args.preset}): run {result.run_id} finished in {elapsed / 60:.1f} min",
        )
    )
    print("Open the UIs with `make ui`: Dagster on http://127.0.0.1:3000, MLflow on http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
