"""β sweep: scaffold students at several β against the CoT-SFT baseline, same traces and budget.

Uses the library's stage functions directly (no Dagster): problems -> programmatic teacher -> steps -> labels ->
packed shards (rows of 512) -> students (400 steps of 8 rows) -> Pass@1 on the first 150 held-out problems,
greedy, τ = 0.

    .venv/bin/python bench/sweep_beta.py [--betas 0.0,0.1,0.3] [--steps 400] [--out /tmp/sweep]
"""

import argparse
import shutil
import time
from pathlib import Path

from scaffold_lib.evaluation.decoding import DecodeConfig
from scaffold_lib.student.stages import ShardsConfig, build_packed_shards, eval_items, train_student
from scaffold_lib.evaluation.metrics import EvalConfig, evaluate_baseline, evaluate_scaffold, score_table_markdown
from scaffold_lib.student.model import ScaffoldStudent, StudentConfig, load_tokenizer
from scaffold_lib.data.problems import GeneratorConfig, generate_problems
from scaffold_lib.student.shards import PackConfig
from scaffold_lib.data.stages import generate_teacher_traces, label_signals, segment_traces, store_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher
from scaffold_lib.student.training import TrainConfig
from scaffold_lib.store.warehouse import Warehouse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--betas", default="0.0,0.1,0.3")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--problems", type=int, default=2500)
    parser.add_argument("--eval", type=int, default=150)
    parser.add_argument("--out", default="/tmp/scaffold-sweep")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wh = Warehouse(out / "warehouse.duckdb")
    store_problems(wh, generate_problems(GeneratorConfig(n_problems=args.problems, min_ops=2, max_ops=2, max_number=10,
                                                         distractor_prob=0.2)))
    print(generate_teacher_traces(wh, ProgrammaticTeacher()).summary())
    segment_traces(wh)
    print(label_signals(wh).summary())
    student = StudentConfig(hidden_size=192, num_attention_heads=6, intermediate_size=512)
    shards = build_packed_shards(wh, out, ShardsConfig(student=student, pack=PackConfig(row_len=512)))
    items = eval_items(wh)[: args.eval]
    decode = DecodeConfig(tau=0.0)
    rows = []
    runs = [("baseline", None)] + [("scaffold", float(b)) for b in args.betas.split(",")]
    for kind, beta in runs:
        cfg = TrainConfig(kind=kind, beta=beta if beta is not None else 0.3, max_steps=args.steps, batch_size=8)
        start = time.perf_counter()
        trained = train_student(wh, out, shards.base_model, shards.manifests[kind], cfg, progress=False)
        label = "CoT-SFT baseline" if kind == "baseline" else f"scaffold β={beta}"
        print(f"{label}: {time.perf_counter() - start:.0f} s, {trained.result.tokens_per_s:,.0f} tokens/s, "
              f"loss {trained.result.losses[0]:.3f} -> {trained.result.final_loss:.3f}", flush=True)
        model = ScaffoldStudent.from_pretrained(trained.path)
        evaluate = evaluate_baseline if kind == "baseline" else evaluate_scaffold
        scores, _ = evaluate(model, load_tokenizer(trained.path), items,
                             EvalConfig(variants=["predicted", "golden", "random"], decode=decode), progress=False)
        rows += [{**r.as_row(), "model": label} for r in scores]
    print(score_table_markdown(rows))


if __name__ == "__main__":
    main()
