"""Is the timeline bed's in-step arithmetic a budget problem? The bed's criterion (a), step execution, for both arms
trained for more epochs on the same traces, with their validation Pass@1 beside it: if (a) and Pass@1 climb with
epochs, the bed's errors are under-training, and a longer budget makes the in-step work learnable.

    python -m bench.bed_budget --home H --preset experiment-v2 --epochs 3 6     # an instance the experiment ran on
    python -m bench.bed_budget --home H --preset experiment-v2 --epochs 6 --arms scaffold --injection none
    python -m bench.bed_budget --home H --preset experiment-v2 --epochs 6 --arms scaffold --beta 0.1

Needs an instance whose data stages have run (`scaffold --preset experiment-v2 experiment` leaves one). Each arm is
trained with seed 0 at each epoch count on the instance's shards (the experiment preset otherwise; the models land in
its MLflow registry like any other), then measured on validation only: (a) teacher-forced, as the experiment's
diagnostics measure it, and Pass@1 (the scaffold with its predicted signals and with the teacher's, τ = 0; with
--beta 0 the signal head is untrained and only the teacher's signals say what the steps can do). Test is never scored.
`scaffold --home H --preset experiment-v2 data` builds the data stages of a fresh instance in seconds.
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

# arm -> (the kind it trains as, the variant its validation Pass@1 is scored under)
ARMS = {"scaffold": ("scaffold", "predicted"), "cot_sft": ("baseline", "cot_sft")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="an instance whose data stages have run")
    parser.add_argument("--preset", default="experiment", help="the configuration the instance was built with")
    parser.add_argument("--epochs", type=float, nargs="+", default=[6.0, 9.0], help="epoch counts to train")
    parser.add_argument("--limit", type=int, default=400, help="validation items")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument(
        "--injection",
        choices=["input", "output", "both", "none"],
        help="the scaffold's signal injection (default: the preset's)",
    )
    parser.add_argument("--beta", type=float, help="the signal loss weight (default: the preset's)")
    args = parser.parse_args()
    if "scaffold" not in args.arms:
        parser.error("--arms needs scaffold: the baseline is scored beside it")

    cfg = load_preset(args.preset).config
    beta = cfg.train.beta if args.beta is None else args.beta
    store = Store.at(args.home)
    run_id = f"bed-budget-{uuid.uuid4()}"
    shards = pack_shards(store, cfg.shards, cfg.student, run_id)
    if args.injection:
        shards = shards.model_copy(update={"signal_injection": args.injection})
    items = heldout_items(store.warehouse, "validation", args.limit)
    rows = []
    for epochs in args.epochs:
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
        ctx = Context(store, run_cfg, run_id, "bed-budget", {"study": "bed_budget"}, print, False)
        started = time.perf_counter()
        arms = {arm: ctx.train(shards, ARMS[arm][0], 0, beta) for arm in args.arms}
        student, baseline = arms.get("scaffold"), arms.get("cot_sft")
        # golden too: with --beta 0 the signal head is untrained, and the teacher's signals show what the steps can do
        evaluation = ctx.predicted(
            student, baseline, shards, "validation", args.limit, 0.0, ("predicted", "golden"), export_samples=False
        )
        accuracy = {r["variant"]: r["accuracy"] for r in evaluation.rows}
        for arm, handle in arms.items():
            model, fmt = load_for_eval(handle.path)
            execution = bed.step_execution(model, fmt, items)
            rows.append(
                {
                    "epochs": epochs,
                    "arm": arm,
                    "steps": handle.steps,
                    "validation_pass_at_1": accuracy[ARMS[arm][1]],
                    **({"golden_pass_at_1": accuracy["golden"]} if arm == "scaffold" else {}),
                    **execution,
                }
            )
        print(f"{epochs:g} epochs: {time.perf_counter() - started:.0f} s", flush=True)
    print("| epochs | arm | steps | result exact | operands exact | validation Pass@1 | with the teacher's signals |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['epochs']:g} | {r['arm']} | {r['steps']} | {100 * r['result_exact']:.1f} % | "
            f"{100 * r['operands_exact']:.1f} % | {100 * r['validation_pass_at_1']:.1f} % | "
            + (f"{100 * r['golden_pass_at_1']:.1f} % |" if "golden_pass_at_1" in r else "– |")
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
