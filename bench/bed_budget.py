"""Is the timeline bed's in-step arithmetic a budget problem? The bed's criterion (a), step execution, for both arms
trained for more epochs on the same traces, with their validation Pass@1 beside it: if (a) and Pass@1 climb with
epochs, the bed's errors are under-training, and a longer budget makes the in-step work learnable.

    python -m bench.bed_budget --home /tmp/exp3 --epochs 6 9        # an instance the experiment has run on

Needs an instance whose data stages have run (`scaffold --preset experiment experiment` leaves one). Each arm is
trained with seed 0 at each epoch count on the instance's shards (the experiment preset otherwise; the models land in
its MLflow registry like any other), then measured on validation only: (a) teacher-forced, as the experiment's
diagnostics measure it, and Pass@1 (the scaffold with its predicted signals, τ = 0). Test is never scored.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from scaffold_lib.config import load_preset
from scaffold_lib.evaluation import bed
from scaffold_lib.evaluation.evaluate import heldout_items, load_for_eval
from scaffold_lib.experiment_context import Context
from scaffold_lib.store.store import Store
from scaffold_lib.student.pack import pack_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="an instance whose data stages have run")
    parser.add_argument("--preset", default="experiment", help="the configuration the instance was built with")
    parser.add_argument("--epochs", type=float, nargs="+", default=[6.0, 9.0], help="epoch counts to train")
    parser.add_argument("--limit", type=int, default=400, help="validation items")
    args = parser.parse_args()

    cfg = load_preset(args.preset).config
    store = Store.at(args.home)
    run_id = f"bed-budget-{uuid.uuid4()}"
    shards = pack_shards(store, cfg.shards, cfg.student, run_id)
    items = heldout_items(store.warehouse, "validation", args.limit)
    rows = []
    for epochs in args.epochs:
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
        ctx = Context(store, run_cfg, run_id, "bed-budget", {"study": "bed_budget"}, print, False)
        started = time.perf_counter()
        student = ctx.train(shards, "scaffold", 0, cfg.train.beta)
        baseline = ctx.train(shards, "baseline", 0, cfg.train.beta)
        evaluation = ctx.predicted(student, baseline, shards, "validation", args.limit, 0.0, export_samples=False)
        accuracy = {r["variant"]: r["accuracy"] for r in evaluation.rows}
        for arm, handle in (("scaffold", student), ("cot_sft", baseline)):
            model, fmt = load_for_eval(handle.path)
            execution = bed.step_execution(model, fmt, items)
            rows.append(
                {
                    "epochs": epochs,
                    "arm": arm,
                    "steps": handle.steps,
                    "validation_pass_at_1": accuracy["predicted" if arm == "scaffold" else "cot_sft"],
                    **execution,
                }
            )
        print(f"{epochs:g} epochs: {time.perf_counter() - started:.0f} s", flush=True)
    print("| epochs | arm | steps | result exact | operands exact | validation Pass@1 |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['epochs']:g} | {r['arm']} | {r['steps']} | {100 * r['result_exact']:.1f} % | "
            f"{100 * r['operands_exact']:.1f} % | {100 * r['validation_pass_at_1']:.1f} % |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
