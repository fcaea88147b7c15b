"""Training throughput: our packed trainer vs HF `Trainer` on padded batches, same tiny model and examples.

Metric: non-pad tokens per second (tokens of real examples the model ran forward+backward on).
Baseline (same run): `transformers.Trainer` with dynamic padding to the longest example of each batch
(`DataCollatorForSeq2Seq`), same backbone, batch of 8 examples, CPU.

    .venv/bin/python -m bench.bench_training [--steps 40]     # a module: it imports bench.common
"""

import argparse
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from bench.common import tiny_student
from scaffold_lib.student.attention import PACKED_DOCUMENTS
from scaffold_lib.student.config import PackConfig, TrainConfig
from scaffold_lib.student.model import ScaffoldStudent
from scaffold_lib.student.shards import pack_rows
from scaffold_lib.student.training import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--row-len", type=int, default=1024)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    base, tokenizer, fmt, items = tiny_student()
    examples = [fmt.baseline(i, q, s) for i, q, s, _ in items]
    lengths = [len(e) for e in examples]
    print(f"{len(examples)} examples, mean {sum(lengths) / len(lengths):.0f} tokens, threads {torch.get_num_threads()}")

    # ours: packed rows, attention within each example (per-example position ids)
    rows, stats = pack_rows(examples, PackConfig(row_len=args.row_len))
    data = {
        k: torch.stack([torch.as_tensor(r[k], dtype=torch.long) for r in rows])
        for k in ("input_ids", "labels", "signal_ids", "position_ids")
    }
    data["signal_positions"] = torch.full((len(rows), 1), -1, dtype=torch.long)
    data["signal_targets"] = torch.zeros((len(rows), 1), dtype=torch.long)
    rows_per_batch = max(1, round(8 * sum(lengths) / len(lengths) / args.row_len))  # ~8 examples per batch
    ours_tokens = args.steps * rows_per_batch * args.row_len * stats.fill_ratio
    ours = {}
    for attention in (PACKED_DOCUMENTS, "sdpa"):  # the default on CPU, and the masked SDPA it replaced
        model = ScaffoldStudent.from_pretrained(base, kind="baseline")
        cfg = TrainConfig(
            kind="baseline",
            max_steps=args.steps,
            batch_size=rows_per_batch,
            warmup_steps=2,
            learning_rate=3e-3,
            attn_implementation=attention,
        )
        start = time.perf_counter()
        train(model, data, cfg, progress=False)
        ours[attention] = (time.perf_counter() - start, ours_tokens / (time.perf_counter() - start))

    # baseline: HF Trainer, padded batches of 8 examples
    ds = Dataset.from_dict(
        {"input_ids": [e.input_ids.tolist() for e in examples], "labels": [e.input_ids.tolist() for e in examples]}
    )
    hf_model = AutoModelForCausalLM.from_pretrained(base)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    targs = TrainingArguments(
        output_dir="/tmp/bench-hf-trainer",
        per_device_train_batch_size=8,
        max_steps=args.steps,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=hf_model, args=targs, train_dataset=ds, data_collator=collator)
    counted = {"tokens": 0}
    original = trainer.training_step

    def counting_step(model, inputs, *a, **kw):
        counted["tokens"] += int(inputs["attention_mask"].sum())
        return original(model, inputs, *a, **kw)

    trainer.training_step = counting_step
    start = time.perf_counter()
    trainer.train()
    hf_s = time.perf_counter() - start
    hf = counted["tokens"] / hf_s

    for attention, (seconds, rate) in ours.items():
        print(
            f"ours, {attention} (packed rows of {args.row_len}, {rows_per_batch} rows/step, fill "
            f"{100 * stats.fill_ratio:.2f} %): {ours_tokens:,.0f} non-pad tokens in {seconds:.1f} s = {rate:,.0f} tokens/s"
        )
    print(
        f"HF Trainer (padded batches of 8):  {counted['tokens']:,} non-pad tokens in {hf_s:.1f} s = {hf:,.0f} tokens/s"
    )
    print(
        f"ratio ours / HF Trainer: {ours[PACKED_DOCUMENTS][1] / hf:.2f}x with {PACKED_DOCUMENTS} "
        f"({ours['sdpa'][1] / hf:.2f}x with masked sdpa); goal >= 1.0x"
    )


if __name__ == "__main__":
    main()
