"""The pilot a pre-registration needs: both arms trained on a bed, scored on the VALIDATION split only (test stays
untouched for the confirmatory run), the bed's diagnostics, and the number of test items a 3-point difference needs
at 80 % power for 1, 2 and 3 seeds (from the pilot's item-level variance between and within items).

    python bench/power_pilot.py --work /tmp/pilot --preset experiment --seeds 0 1
    python bench/power_pilot.py --work /tmp/pilot --preset experiment --set train.epochs=4 --injection input

Prints a summary and writes `--work/pilot.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scaffold_lib.config import load_preset, parse_assignments
from scaffold_lib.core.devices import spread_malloc_arenas
from scaffold_lib.evaluation.stats import item_comparison, required_items
from scaffold_lib.evaluation.suites import HELDOUT
from scaffold_lib.experiment import Context, diagnose_bed, item_matrix
from scaffold_lib.runner import run_data_stages
from scaffold_lib.store.store import Store
from scaffold_lib.student.pack import pack_shards


def main() -> None:
    spread_malloc_arenas()  # one long process runs the data stages, packing and training, as the CLI would
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch instance folder (data are built once and reused)")
    ap.add_argument("--preset", default="experiment")
    ap.add_argument("--set", action="append", default=[], help="override a setting, e.g. train.epochs=4")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--injection", default=None, help="the scaffold student's signal injection (default: preset's)")
    ap.add_argument("--effect", type=float, default=0.03, help="smallest effect of interest (Pass@1 difference)")
    ap.add_argument("--validation-limit", type=int, default=None)
    args = ap.parse_args()
    overrides = parse_assignments(args.set)
    if args.injection:
        overrides.setdefault("student", {})["signal_injection"] = args.injection
    cfg = load_preset(args.preset, overrides).config
    store = Store.at(Path(args.work).resolve())
    started = time.perf_counter()
    if not store.warehouse_path.exists():
        run_data_stages(store, cfg, "pilot-data", print)
    shards = pack_shards(store, cfg.shards, cfg.student, "pilot")
    ctx = Context(store, cfg, "pilot", "pilot", {}, print, progress=False)
    limit = args.validation_limit or cfg.experiment.validation_limit
    evaluations, models = {}, {}
    for seed in args.seeds:
        student = ctx.train(shards, "scaffold", seed, cfg.train.beta)
        baseline = ctx.train(shards, "baseline", seed, cfg.train.beta)
        models[seed] = (student, baseline)
        evaluations[seed] = ctx.evaluate(
            student,
            baseline,
            shards,
            suites=[HELDOUT],
            split="validation",
            limit=limit,
            variants=["predicted", "golden"],
            include_base=False,
            export_samples=False,
        )
        rows = {r["variant"]: r["accuracy"] for r in evaluations[seed].rows}
        print(f"seed {seed}: validation {rows}; steps {student.steps}/{baseline.steps}", flush=True)
    a, b = item_matrix(store, evaluations, "predicted", "cot_sft")
    first = args.seeds[0]
    diagnostics = diagnose_bed(ctx, *models[first])
    summary = {
        "preset": args.preset,
        "overrides": overrides,
        "seeds": args.seeds,
        "validation": item_comparison(a, b).as_dict(),
        "per_seed": {s: {r["variant"]: r["accuracy"] for r in e.rows} for s, e in evaluations.items()},
        "required_items": {k: required_items(a, b, args.effect, seeds=k) for k in (1, 2, 3)},
        "steps": {s: {"scaffold": m[0].steps, "cot_sft": m[1].steps} for s, m in models.items()},
        "tokens": {s: {"scaffold": m[0].train_tokens, "cot_sft": m[1].train_tokens} for s, m in models.items()},
        "diagnostics": {k: v for k, v in diagnostics.items() if k != "calibration"},
        "minutes": (time.perf_counter() - started) / 60,
    }
    (store.home / "pilot.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
