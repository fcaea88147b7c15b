"""Why does the scaffold student under-learn digits? Train the arms and their ablations on the same traces and track
the token loss per class (digits, tags, other text) on validation and training traces as training goes.

    python bench/ablate_scaffold.py --work /tmp/ablate                       # the issue-27 pilot's data and budget
    python bench/ablate_scaffold.py --work /tmp/ablate --variants cot_sft scaffold no_embedding

The data are the first bed (preset `plain`) at the pilot's size (10,000 problems, teacher slips and wrong traces
off), built once in `--work` by the pipeline's own stages; every variant starts from the same prepared backbone with the
same seed. A variant is the scaffold arm with one thing changed:

- `scaffold`: as the pipeline trains it (`--injection`, tag tokens in the text, β from the preset)
- `no_embedding`: signal embedding off (injection `none`); tags and the signal loss kept
- `no_tags`: tag tokens out of the text; the embedding (output) and the signal loss kept
- `input` / `both`: the embedding added to the input embeddings (and to the output)
- `untied`: the scaffold arm with an LM head of its own (a copy of the tied embedding at the start)
- `cot_sft`: the baseline (plain CoT, token loss only)
- `beta_only` / `tags_only` / `embedding_only`: plain CoT text plus one scaffold component (the signal loss, the tag
  tokens, the output signal embedding), to tell their effects apart

`--stop-at N` ends each run at step N of the full schedule (its curve up to N is the full run's).

Prints a table per evaluation step and writes everything to `--work/ablation.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scaffold_lib.config import load_preset
from scaffold_lib.core.devices import spread_malloc_arenas
from scaffold_lib.runner import run_data_stages
from scaffold_lib.store.store import Store
from scaffold_lib.store.training_data import training_traces
from scaffold_lib.student.examples import Formatter, text_format
from scaffold_lib.student.model import ScaffoldStudent, load_tokenizer
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.shards import pack_rows, rows_table, rows_tensors
from scaffold_lib.student.token_classes import token_loss_by_class, vocabulary_classes
from scaffold_lib.student.training import train

PILOT = {
    "problems": {"synthetic": {"n_problems": 10_000}},
    "teacher": {"programmatic": {"slip_prob": 0.0, "wrong_fraction": 0.0}},
    "train": {"max_steps": 1400},
}


@dataclass(frozen=True)
class Variant:
    kind: str = "scaffold"
    injection: str = "output"
    tags: bool = True
    untied: bool = False
    beta: float | None = None  # None: the preset's


VARIANTS = {
    "cot_sft": Variant(kind="baseline"),
    "scaffold": Variant(),
    "no_embedding": Variant(injection="none"),
    "no_tags": Variant(tags=False),
    "input": Variant(injection="input"),
    "both": Variant(injection="both"),
    "untied": Variant(untied=True),
    # one scaffold component at a time on top of plain CoT text (through the scaffold code path)
    "beta_only": Variant(injection="none", tags=False),
    "tags_only": Variant(injection="none", beta=0.0),
    "embedding_only": Variant(tags=False, beta=0.0),
}


class Stop(Exception):
    """Raised from the logging hook to end a run early: the curve up to there is the full run's."""


def rows_of(traces: list[dict], fmt: Formatter, kind: str, pack) -> dict[str, torch.Tensor]:
    examples = [
        fmt.scaffold(t["trace_id"], t["question"], t["steps"], t["signals"])
        if kind == "scaffold"
        else fmt.baseline(t["trace_id"], t["question"], t["steps"])
        for t in traces
    ]
    rows, _ = pack_rows(examples, pack)
    return rows_tensors(rows_table(rows))


def untie(model: ScaffoldStudent) -> None:
    backbone = model.backbone
    head = backbone.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    backbone.config.tie_word_embeddings = False


def main() -> None:
    spread_malloc_arenas()  # one long process runs the data stages, packing and training, as the CLI would
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (data are built once and reused)")
    ap.add_argument("--variants", nargs="+", default=["cot_sft", "scaffold", "no_embedding", "no_tags", "input"])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the pilot's 1,400)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-traces", type=int, default=300, help="validation and training traces scored")
    ap.add_argument("--beta", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="ablation.json", help="results file in --work (one per concurrent process)")
    ap.add_argument("--stop-at", type=int, default=None, help="end each run at this step of the full schedule")
    args = ap.parse_args()
    resolved = load_preset("plain", PILOT)
    cfg = resolved.config
    train_cfg = cfg.train.model_copy(
        update={
            "max_steps": args.steps or cfg.train.max_steps,
            "seed": args.seed,
            "checkpoint_every": 0,
            **({"beta": args.beta} if args.beta is not None else {}),
        }
    ).resolved(pretrained=False)
    store = Store.at(Path(args.work).resolve())
    out_file = store.home / args.out
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    if not store.warehouse_path.exists():
        run_data_stages(store, cfg, "ablation-data", print)
    shards = pack_shards(store, cfg.shards, cfg.student, "ablation-pack")
    base = shards.base_model
    tokenizer = load_tokenizer(base)
    tags = text_format(base)["tags"]
    classes = vocabulary_classes(tokenizer, tags)
    train_traces, _ = training_traces(store.warehouse, ("train",))
    val_traces, _ = training_traces(store.warehouse, ("validation",))
    val_traces, seen_traces = val_traces[: args.eval_traces], train_traces[: args.eval_traces]
    print(
        f"{len(train_traces)} training traces, {len(val_traces)} validation traces scored; {train_cfg.max_steps} steps"
    )
    formats = {True: Formatter(tokenizer, tags), False: Formatter(tokenizer, {s: "" for s in tags})}
    for name in args.variants:
        v = VARIANTS[name]
        beta = train_cfg.beta if v.beta is None else v.beta
        stop = f"-stop{args.stop_at}" if args.stop_at else ""
        key = f"{name}-seed{args.seed}-steps{train_cfg.max_steps}-beta{beta}{stop}"
        if key in results:
            print(f"{key}: done before, skipped")
            continue
        fmt = formats[v.tags]
        data = rows_of(train_traces, fmt, v.kind, cfg.shards.pack)
        evals = {
            "validation": rows_of(val_traces, fmt, v.kind, cfg.shards.pack),
            "train": rows_of(seen_traces, fmt, v.kind, cfg.shards.pack),
        }
        torch.manual_seed(train_cfg.seed)
        model = ScaffoldStudent.from_pretrained(base, kind=v.kind, injection=v.injection)
        if v.untied:
            untie(model)
        curve: list[dict] = []

        def on_log(step: int, metrics: dict, model=model, evals=evals, curve=curve, name=name) -> None:
            if step % args.eval_every and step not in (train_cfg.max_steps, args.stop_at):
                return
            point = {"step": step, "train_loss": metrics["token_loss"]}
            for split, rows in evals.items():
                point[split] = token_loss_by_class(model, rows, classes)
            curve.append(point)
            v_, t_ = point["validation"], point["train"]
            print(
                f"{name:>13} step {step:>5}: digit loss val {v_['digit']['loss']:.4f} (acc {v_['digit']['accuracy']:.4f})"
                f" train {t_['digit']['loss']:.4f}; text val {v_['text']['loss']:.4f} train {t_['text']['loss']:.4f}",
                flush=True,
            )
            if step == args.stop_at:
                raise Stop

        t0 = time.perf_counter()
        steps = args.stop_at or train_cfg.max_steps
        try:
            train(
                model, data, train_cfg.model_copy(update={"kind": v.kind, "beta": beta}), on_log=on_log, progress=False
            )
        except Stop:
            pass
        results[key] = {
            "variant": name,
            **vars(v),
            "rows": int(data["input_ids"].size(0)),
            "steps": steps,
            "epochs": steps * train_cfg.batch_size / data["input_ids"].size(0),
            "beta": beta,
            "minutes": (time.perf_counter() - t0) / 60,
            "curve": curve,
            "config": train_cfg.model_dump() | {"beta": beta},
        }
        out_file.write_text(json.dumps(results, indent=2))
        print(f"{key}: {results[key]['minutes']:.1f} min, {results[key]['epochs']:.2f} epochs", flush=True)
    print_table(results)


def print_table(results: dict) -> None:
    print(
        "\n| variant | epochs | val digit loss | val digit acc | val text loss | train digit loss | train text loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        last = r["curve"][-1]
        v, t = last["validation"], last["train"]
        print(
            f"| {key} | {r['epochs']:.2f} | {v['digit']['loss']:.4f} | {100 * v['digit']['accuracy']:.2f} % | "
            f"{v['text']['loss']:.4f} | {t['digit']['loss']:.4f} | {t['text']['loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
