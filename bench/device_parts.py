"""The parts of the device check, run by `bench/device_check.py` (which makes pydantic importable first). Imports
nothing that imports duckdb, mlflow, dagster or datasets: the GPU machine has none of them. See docs/gpu.md.

- data: the experiment bed's data as the pipeline makes it (synthetic problems, the programmatic teacher, segmentation,
  keyword labels, the embedded tokenizer, scaffold and CoT-SFT examples, packed rows), with the bed's settings read
  from a preset; shared by every part;
- attention: loss and gradients of each attention kernel against a masked reference on packed rows, a control that
  attends across examples (the check must be able to fail), and one training step of each arm;
- training: tokens/s of our trainer against HF `Trainer` on the same data, and MFU;
- decoding: scaffolded decoding against HF `generate`;
- bed: both arms trained on the bed, validation and test Pass@1 scored with the pipeline's decoders and scorer.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.utils import logging as hf_logging

from scaffold_lib.config import load_preset
from scaffold_lib.data.problems import SPLITS, SplitConfig
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import KeywordLabellerConfig, label_steps
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher, ProgrammaticTeacherConfig
from scaffold_lib.evaluation.config import DecodeConfig, EvalConfig
from scaffold_lib.evaluation.decoding import ScaffoldDecoder, plain_generate_batch
from scaffold_lib.evaluation.metrics import evaluate_plain, evaluate_scaffold, suite_run
from scaffold_lib.evaluation.suites import HELDOUT, EvalItem
from scaffold_lib.student.attention import PACKED_DOCUMENTS
from scaffold_lib.student.config import EMBEDDED, PackConfig, StudentConfig, TrainConfig
from scaffold_lib.student.examples import STEP_SEPARATOR, Formatter, signal_tags, training_corpus
from scaffold_lib.student.gpu_attention import FLEX_DOCUMENTS, document_attention, document_ids, flex_supported
from scaffold_lib.student.model import ScaffoldStudent, build_embedded_base, count_parameters, load_tokenizer
from scaffold_lib.student.shards import pack_rows, rows_table, rows_tensors
from scaffold_lib.student.training import micro_batch_indices, train

KINDS = ("scaffold", "baseline")
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
# a ~76 M-parameter Qwen2 body (the embedded tokenizer's vocabulary adds under 1 M): wide enough for the GPU's matrix
# units, small enough that the bed trains both arms in a few minutes
GPU_SIZE = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}
TINY_SIZE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# peak dense bf16 tensor throughput (TFLOP/s) by device name, from NVIDIA's datasheets (SXM parts; sparsity excluded)
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)
GOALS = {"training_ratio": 1.5, "mfu": 0.30, "decoding_ratio": 1.0, "bed_wall_s": 300.0}
# relative difference of the loss and of the whole gradient from the masked reference: float32 on the CPU (measured
# there: 1e-7 for both kernels), bf16 autocast on CUDA. Under CPU bf16 autocast (4 layers, 30 steps) the kernels were
# 4e-6 (loss) and 2.5e-3 (gradient) from the reference, attention across examples 5e-3 and 1.0: the bounds leave
# room for GPU kernels that round the attention weights to bf16, and stay far below what a lost mask does
TOLERANCE = {"cpu": {"loss_rel": 1e-5, "grad_rel": 1e-4}, "cuda": {"loss_rel": 2e-3, "grad_rel": 3e-2}}


@dataclass(frozen=True)
class Scale:
    """How big each part runs: the full check on CUDA, or tiny on the CPU."""

    problems: int
    gpu_size: dict
    attention_rows: int  # packed rows in the equality check
    attention_warm_steps: int  # training before it, so the logits depend on what each token attends to
    throughput_rows: int  # rows per step in the throughput runs
    warm_steps: int  # untimed steps first (CUDA start-up, kernel compilation)
    measured_steps: int
    decode_questions: int
    decode_batch: int
    decode_tokens: int
    bed_steps: int
    bed_rows: int
    bed_learning_rate: float | None  # None: the preset's (the embedded student's from-scratch rate)
    validation_limit: int | None  # None: the preset's
    test_limit: int | None
    eval_batch: int
    decode_caps: dict = field(default_factory=dict)  # the bed's decoding caps over the preset's


# one batch shape (64 rows) on CUDA: the compiled attention kernel is specialised to a shape, and each new one costs
# a compilation (tens of seconds)
FULL = Scale(
    problems=50_000,
    gpu_size=GPU_SIZE,
    attention_rows=64,
    attention_warm_steps=30,
    throughput_rows=64,
    warm_steps=5,
    measured_steps=30,
    decode_questions=64,
    decode_batch=64,
    decode_tokens=128,
    bed_steps=250,
    bed_rows=64,
    bed_learning_rate=1e-3,  # 3e-3, the tiny student's rate, is too high for ~76 M parameters from scratch
    validation_limit=None,
    test_limit=None,
    eval_batch=256,
)
TINY = Scale(
    problems=300,
    gpu_size=TINY_SIZE,
    attention_rows=1,  # a row of 512 holds several examples: enough to tell a document mask from none
    attention_warm_steps=3,
    throughput_rows=1,
    warm_steps=1,
    measured_steps=2,
    decode_questions=8,
    decode_batch=8,
    decode_tokens=16,
    bed_steps=10,
    bed_rows=2,
    bed_learning_rate=None,
    validation_limit=8,
    test_limit=8,
    eval_batch=8,
    decode_caps={"max_steps": 4, "max_tokens": 48},  # the micro preset's: an untrained student writes to the cap
)


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


# --- the bed's settings from a preset -----------------------------------------------------------------------------


@dataclass
class Bed:
    """The experiment bed's settings, from a preset: what the pipeline would run with it."""

    preset: str
    generator: GeneratorConfig
    split: SplitConfig
    teacher: ProgrammaticTeacherConfig
    teacher_splits: list[str]  # of the splits the bed makes (train, validation, test)
    segmenter: str
    labeller: KeywordLabellerConfig
    student: StudentConfig
    pack: PackConfig
    include_incorrect: bool
    train: TrainConfig
    decode: DecodeConfig
    test_limit: int | None
    validation_limit: int | None


def load_bed(preset: str) -> Bed:
    """The bed's settings as `scaffold_lib.config.load_preset` resolves `preset` (a name or a preset .toml)."""
    cfg = load_preset(preset).config
    if cfg.problems.source != "synthetic" or cfg.teacher.backend not in ("auto", "programmatic"):
        raise ValueError(f"preset {preset}: the bed runs the synthetic problems and the programmatic teacher")
    if cfg.student.base_model != EMBEDDED:
        raise ValueError(f"preset {preset}: the bed trains the embedded student from scratch")
    return Bed(
        preset=preset,
        generator=cfg.problems.synthetic,
        split=cfg.problems.split,
        teacher=cfg.teacher.programmatic,
        teacher_splits=[name for name in cfg.teacher.splits if name in SPLITS],
        segmenter=cfg.segmentation.for_teacher(ProgrammaticTeacher(cfg.teacher.programmatic).identity),
        labeller=cfg.labeller,
        student=cfg.student,
        pack=cfg.shards.pack,
        include_incorrect=cfg.shards.include_incorrect,
        train=cfg.train,
        decode=cfg.eval.decode,
        test_limit=cfg.eval.limit,
        validation_limit=cfg.experiment.validation_limit,
    )


# --- the reference and the control attention ----------------------------------------------------------------------
MASKED_REFERENCE = "masked_reference"
ROW_CAUSAL = "row_causal"


def masked_reference_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs
):
    """Plain attention with an explicit block-diagonal causal mask (a query sees the keys of its own example up to
    itself), scores and softmax in float32 with autocast off: what every kernel is compared with."""
    groups = query.shape[1] // key.shape[1]
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), repeat_kv(key, groups).float(), repeat_kv(value, groups).float()
        length = q.shape[2]
        docs = document_ids(position_ids.expand(q.shape[0], -1))
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        allowed = (docs[:, None, :, None] == docs[:, None, None, :]) & causal
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        probs = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
        out = probs @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def row_causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention over the whole row, examples not kept apart: what a lost document mask computes. The check
    must tell it from the reference, or it could not fail."""
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), is_causal=True, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED_REFERENCE, masked_reference_attention)
AttentionInterface.register(ROW_CAUSAL, row_causal_attention)


# --- shared state --------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    scale: Scale
    bed: Bed
    workdir: Path
    chosen: str | None  # the attention the trainer is given on packed rows
    peak_tflops: float | None
    peak_source: str
    times: dict[str, float] = field(default_factory=dict)  # the bed's data stages, seconds
    tokenizer: object = None
    fmt: Formatter | None = None
    data: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # packed rows per arm
    n_tokens: dict[str, np.ndarray] = field(default_factory=dict)  # non-pad tokens per row
    fill: dict[str, float] = field(default_factory=dict)
    hf_examples: list[dict] = field(default_factory=list)  # the CoT-SFT examples as HF Trainer takes them
    budget: dict[str, int] = field(default_factory=dict)
    items: dict[str, list[EvalItem]] = field(default_factory=dict)
    data_summary: dict = field(default_factory=dict)
    bases: dict[str, Path] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        # the trainer's own precision: bf16 autocast on CUDA, float32 on the CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sizes(self, name: str) -> dict:
        return {"embedded": StudentConfig().model_dump(include=set(SIZE_KEYS)), "gpu": self.scale.gpu_size}[name]

    def base(self, name: str) -> Path:
        """The backbone of size `name` ("embedded": StudentConfig's defaults; "gpu"), freshly initialised, with the
        bed's tokenizer: the same examples fit every size."""
        if name not in self.bases:
            self.bases[name] = resized_base(self.bases["preset"], self.sizes(name), self.workdir / f"base-{name}")
        return self.bases[name]

    def batch(self, kind: str, rows: int) -> dict[str, torch.Tensor]:
        """The first `rows` packed rows on the device, signal positions made flat over the batch (as the trainer
        does)."""
        b = {k: v[:rows].to(self.device) for k, v in self.data[kind].items()}
        seq = b["input_ids"].size(1)
        offsets = torch.arange(rows, device=self.device)[:, None] * seq
        b["signal_positions"] = torch.where(b["signal_positions"] >= 0, b["signal_positions"] + offsets, -1)
        return b

    def train_config(self, kind: str, **update) -> TrainConfig:
        settings = {
            "kind": kind,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "attn_implementation": self.chosen,
            "device": self.device.type,
            "log_every": 1,
            **update,
        }
        return TrainConfig(**settings)


def resized_base(base: Path, sizes: dict, out: Path, seed: int = 0) -> Path:
    """`base`'s architecture and tokenizer at other sizes, initialised anew and saved as a normal checkpoint."""
    config = AutoConfig.from_pretrained(base)
    # derived settings are left out so the new sizes derive them again
    settings = {k: v for k, v in config.to_dict().items() if k not in ("layer_types", "head_dim")}
    config = type(config).from_dict({**settings, **sizes})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def _seconds(since: float) -> float:
    return round(time.perf_counter() - since, 3)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- data ----------------------------------------------------------------------------------------------------------


def prepare_data(ctx: Context) -> dict:
    """Problems -> teacher traces -> steps -> labels -> tokenizer -> examples -> packed rows, as the pipeline's
    stages make them, in memory."""
    bed, times = ctx.bed, ctx.times
    t = time.perf_counter()
    problems = generate_problems(bed.generator.model_copy(update={"n_problems": ctx.scale.problems}), bed.split)
    times["problems"] = _seconds(t)
    t = time.perf_counter()
    teacher = ProgrammaticTeacher(bed.teacher)
    result = teacher.generate([p for p in problems if p.split in bed.teacher_splits])
    times["teacher"] = _seconds(t)
    t = time.perf_counter()
    by_id = {p.problem_id: p for p in problems}
    traces = []
    for tr in result.traces:
        steps = segment(tr.text, bed.segmenter)
        if steps:  # the pipeline quarantines a trace with no step
            labels = [label.signal for label in label_steps(steps, bed.labeller)]
            traces.append((tr, by_id[tr.problem_id], steps, labels))
    times["segment_label"] = _seconds(t)
    training = sorted(
        (x for x in traces if x[1].split == "train" and (x[0].is_correct or bed.include_incorrect)),
        key=lambda x: x[0].trace_id,
    )
    t = time.perf_counter()
    tags = signal_tags()
    corpus = [training_corpus(p.question, steps, labels, tags) for _, p, steps, labels in training]
    ctx.bases["preset"] = build_embedded_base(
        bed.student, corpus, ctx.workdir / "base-preset", [STEP_SEPARATOR, *tags.values()]
    )
    ctx.tokenizer = load_tokenizer(ctx.bases["preset"])
    ctx.fmt = Formatter(ctx.tokenizer, tags)
    times["tokenizer"] = _seconds(t)
    t = time.perf_counter()
    encoded = ctx.fmt.encode([(p.question, steps) for _, p, steps, _ in training])
    stats = {}
    for kind in KINDS:
        examples = [
            ctx.fmt.build(tr.trace_id, q, ids, labels if kind == "scaffold" else None)
            for (tr, _, _, labels), (q, ids) in zip(training, encoded)
        ]
        if kind == "scaffold":
            ctx.budget = token_budget(encoded[:5_000], examples[:5_000])
        else:
            ctx.hf_examples = [hf_example(e) for e in examples]
        rows, pack_stats = pack_rows(examples, bed.pack)
        ctx.data[kind] = rows_tensors(rows_table(rows))
        ctx.n_tokens[kind] = np.asarray([r["n_tokens"] for r in rows], dtype=np.int64)
        ctx.fill[kind] = pack_stats.fill_ratio
        stats[kind] = {"rows": pack_stats.rows, "tokens": pack_stats.tokens, "fill": round(pack_stats.fill_ratio, 4)}
    times["examples_pack"] = _seconds(t)
    ctx.items = heldout_items(traces, problems, ctx)
    splits = {s: sum(p.split == s for p in problems) for s in SPLITS}
    summary = {
        "problems": len(problems),
        "splits": splits,
        "traces": len(result.traces),
        "teacher_correct": round(sum(tr.is_correct for tr in result.traces) / max(1, len(result.traces)), 4),
        "training_traces": len(training),
        "segmenter": bed.segmenter,
        "vocab": len(ctx.tokenizer),
        "row_len": bed.pack.row_len,
        "packed": stats,
        "budget": ctx.budget,
        "eval_items": {s: len(v) for s, v in ctx.items.items()},
        "seconds": dict(times),
    }
    ctx.data_summary = summary
    say(
        f"bed data ({bed.preset}): {len(problems):,} problems {splits}, {len(result.traces):,} traces "
        f"({100 * summary['teacher_correct']:.1f} % correct), {len(training):,} training traces",
        f"  tokenizer {len(ctx.tokenizer)} tokens; packed rows of {bed.pack.row_len}: "
        + ", ".join(f"{k} {v['rows']:,} rows, fill {100 * v['fill']:.1f} %" for k, v in stats.items()),
        "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()),
    )
    return summary


def hf_example(example) -> dict:
    """A CoT-SFT example as HF's causal LMs take it: labels unshifted (the model shifts them), -100 on the question."""
    labels = np.full(len(example.input_ids), -100, dtype=np.int64)
    labels[1:] = example.labels[:-1]
    return {"input_ids": example.input_ids.tolist(), "labels": labels.tolist()}


def token_budget(encoded: list, examples: list) -> dict[str, int]:
    """The decoding caps' source, as the pack stage computes it: 99th percentiles of a step, an answer step and a
    whole reply in tokens (tags and separators included), and of the steps per trace."""
    step, answer, reply, steps = [], [], [], []
    for (_, ids), e in zip(encoded, examples):
        step += [len(i) + 2 for i in ids[:-1]]
        answer.append(len(ids[-1]) + 2)
        reply.append(len(e.input_ids) - int((e.labels == -100).sum()) + 1)
        steps.append(len(ids))

    def p99(values: list[int]) -> int:
        return int(np.percentile(values, 99)) if values else 0

    return {
        "step_tokens_p99": p99(step),
        "answer_tokens_p99": p99(answer),
        "reply_tokens_p99": p99(reply),
        "steps_p99": p99(steps),
    }


def heldout_items(traces: list, problems: list, ctx: Context) -> dict[str, list[EvalItem]]:
    """Validation and test problems as the evaluation stage takes them: in problem-id order, with the teacher's steps
    and signals as golden (its correct trace first)."""
    golden = {}
    for tr, _, steps, labels in sorted(traces, key=lambda x: (not x[0].is_correct, x[0].trace_id)):
        golden.setdefault(tr.problem_id, (steps, labels))
    limits = {
        "validation": ctx.scale.validation_limit or ctx.bed.validation_limit,
        "test": ctx.scale.test_limit or ctx.bed.test_limit,
    }
    items = {}
    for split, limit in limits.items():
        chosen = sorted((p for p in problems if p.split == split), key=lambda p: p.problem_id)[:limit]
        items[split] = [
            EvalItem(
                p.problem_id,
                p.question,
                p.answer,
                p.answer_type,
                golden[p.problem_id][1] if p.problem_id in golden else None,
                golden[p.problem_id][0] if p.problem_id in golden else None,
            )
            for p in chosen
        ]
    return items


# --- (a) attention: loss and gradients against the masked reference -----------------------------------------------


def attention_candidates(device: torch.device, chosen: str | None) -> list[str]:
    """Every kernel that can run packed rows here, the trainer's choice first."""
    names = [chosen or "sdpa", PACKED_DOCUMENTS, "sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attention_2")
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        names.append(FLEX_DOCUMENTS)  # on the CPU forward only: FlexAttention has no CPU backward
    return list(dict.fromkeys(names))


def loss_and_grads(
    model: ScaffoldStudent, batch: dict, attention: str, ctx: Context, beta: float, grads: bool = True
) -> tuple[float, torch.Tensor | None]:
    """The trainer's loss, (1 - β)·token loss + β·signal loss, each over its own count, with `attention`; and the
    gradient of every parameter, flattened."""
    config = model.decoder.config
    own = config._attn_implementation
    config._attn_implementation = attention
    model.zero_grad(set_to_none=True)
    try:
        with torch.set_grad_enabled(grads), ctx.autocast(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FlexAttention's "not compiled" notice on the CPU
            out = model(**batch)
            loss = (1 - beta) * out["token_loss_sum"] / out["token_count"] + beta * out["signal_loss_sum"] / out[
                "signal_count"
            ]
        if not grads:
            return float(loss), None
        loss.backward()
        loss = loss.detach()
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in model.parameters()]
        )
        return float(loss), flat
    finally:
        config._attn_implementation = own
        model.zero_grad(set_to_none=True)


def part_attention(ctx: Context) -> dict:
    tol = TOLERANCE["cuda" if ctx.cuda else "cpu"]
    beta = ctx.bed.train.beta
    names = attention_candidates(ctx.device, ctx.chosen)
    report: dict = {
        "chosen": ctx.chosen,
        "precision": "bf16 autocast" if ctx.cuda else "float32",
        "tolerance": tol,
        "rows": ctx.scale.attention_rows,
        "row_len": ctx.bed.pack.row_len,
        "models": {},
        "train_steps": {},
    }
    say(f"attention on packed rows: the trainer's choice {ctx.chosen!r}; compared: {', '.join(names)}")
    ok = True
    for size in ("embedded", "gpu"):
        torch.manual_seed(0)
        model = ScaffoldStudent.from_pretrained(ctx.base(size), kind="scaffold")
        # a few steps first: at initialisation every logit is near zero and the loss hardly depends on attention
        # (with transformers' masked SDPA, so a kernel that fails to build fails in its own row below)
        warm = ctx.train_config(
            "scaffold",
            max_steps=ctx.scale.attention_warm_steps,
            batch_size=ctx.scale.throughput_rows,
            attn_implementation="sdpa",
        )
        train(model, ctx.data["scaffold"], warm, progress=False)
        batch = ctx.batch("scaffold", ctx.scale.attention_rows)
        ref_loss, ref_grad = loss_and_grads(model, batch, MASKED_REFERENCE, ctx, beta)
        rows = {}
        for name in [*names, ROW_CAUSAL]:
            backward = name != FLEX_DOCUMENTS or flex_supported(ctx.device)
            if not backward and size != "gpu":
                continue  # FlexAttention's CPU reference is slow: its forward is checked at the small size only
            try:
                loss, grad = loss_and_grads(model, batch, name, ctx, beta, grads=backward)
            except Exception as exc:  # e.g. a kernel that does not compile here: recorded, the others still run
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "within_tolerance": False}
                say(f"    {name}: FAILED {rows[name]['error'][:300]}")
                continue
            row = {"loss": loss, "loss_rel": abs(loss - ref_loss) / abs(ref_loss)}
            if grad is not None:
                row["grad_rel"] = float((grad - ref_grad).norm() / ref_grad.norm())
                row["grad_cos"] = float(F.cosine_similarity(grad.double(), ref_grad.double(), dim=0))
            within = row["loss_rel"] <= tol["loss_rel"] and row.get("grad_rel", 0.0) <= tol["grad_rel"]
            row["within_tolerance"] = within
            rows[name] = row
        control = rows.pop(ROW_CAUSAL)
        detected = "error" not in control and not control["within_tolerance"]
        size_ok = all(r["within_tolerance"] for r in rows.values()) and detected
        ok &= size_ok
        report["models"][size] = {
            "parameters": count_parameters(model.backbone),
            "reference_loss": ref_loss,
            "kernels": rows,
            "control_row_causal": control,
            "control_detected": detected,
            "ok": size_ok,
        }
        say(f"  {size} ({count_parameters(model.backbone) / 1e6:.1f} M parameters): reference loss {ref_loss:.6f}")
        for name, r in [*rows.items(), (f"{ROW_CAUSAL} (control: must differ)", control)]:
            if "error" in r:
                continue
            grad = f", grad rel {r['grad_rel']:.2e} (cos {r['grad_cos']:.6f})" if "grad_rel" in r else ", forward only"
            say(
                f"    {name:<40} loss {r['loss']:.6f} rel {r['loss_rel']:.2e}{grad}  within tol: {r['within_tolerance']}"
            )
        del model, ref_grad
        _free()
    report["ok"] = ok
    failed = [m["kernels"].get(ctx.chosen or "sdpa", {}) for m in report["models"].values()]
    if ctx.chosen != "sdpa" and not all(k.get("within_tolerance") for k in failed):
        # the later parts still measure something: with transformers' masked SDPA, checked above as well
        report["fallback"] = {"from": ctx.chosen, "to": "sdpa"}
        say(f"  the trainer's choice {ctx.chosen!r} failed the check: the next parts train with 'sdpa'")
        ctx.chosen = "sdpa"
    # one training step of each arm through the trainer, at the GPU size, with the chosen attention
    for kind in KINDS:
        torch.manual_seed(0)
        model = ScaffoldStudent.from_pretrained(ctx.base("gpu"), kind=kind)
        t = time.perf_counter()
        result = train(
            model,
            ctx.data[kind],
            ctx.train_config(kind, max_steps=1, batch_size=ctx.scale.throughput_rows),
            progress=False,
        )
        step = {
            "loss": result.losses[0],
            "token_loss": result.token_losses[0],
            "signal_loss": result.signal_losses[0],
            "label_tokens": result.train_tokens,
            "seconds": _seconds(t),
            "finite": all(math.isfinite(x) for x in result.losses),
        }
        report["train_steps"][kind] = step
        say(
            f"  one {kind} step (gpu size, {ctx.scale.throughput_rows} rows): loss {step['loss']:.4f}, "
            f"{step['label_tokens']:,} label tokens, {step['seconds']:.1f} s"
        )
        del model
        _free()
    report["ok"] = ok and all(s["finite"] for s in report["train_steps"].values())
    say(f"  loss and gradients equal to the masked reference: {'yes' if ok else 'NO'}")
    return report


# --- (b) training throughput against HF Trainer, and MFU -----------------------------------------------------------


def our_throughput(ctx: Context, size: str, kind: str) -> dict:
    """Non-pad tokens per second of our trainer over the measured steps (after the warm ones)."""
    warm, measured, rows = ctx.scale.warm_steps, ctx.scale.measured_steps, ctx.scale.throughput_rows
    torch.manual_seed(0)
    model = ScaffoldStudent.from_pretrained(ctx.base(size), kind=kind)
    clock: dict[int, float] = {}
    cfg = ctx.train_config(kind, max_steps=warm + measured, batch_size=rows, warmup_steps=warm)
    # the trainer reads each step's loss (a device sync), so a timestamp after a step is the step's end
    train(
        model, ctx.data[kind], cfg, on_log=lambda step, _: clock.__setitem__(step, time.perf_counter()), progress=False
    )
    n_tokens = ctx.n_tokens[kind]
    tokens = sum(
        int(n_tokens[micro_batch_indices(len(n_tokens), rows, cfg.seed, s).numpy()].sum())
        for s in range(warm, warm + measured)
    )
    seconds = clock[warm + measured] - clock[warm]
    params = count_parameters(model.backbone)
    del model
    _free()
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": tokens / seconds, "parameters": params}


class _Clock(TrainerCallback):
    """Times HF Trainer's steps: a device sync and a timestamp at the end of the marked steps only."""

    def __init__(self, marks: tuple[int, ...], sync: Callable[[], None]) -> None:
        self.marks, self.sync, self.times = marks, sync, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.marks:
            self.sync()
            self.times[state.global_step] = time.perf_counter()


def hf_throughput(ctx: Context, size: str) -> dict:
    """HF `Trainer` on the same CoT-SFT examples and device: batches padded to their longest example
    (`DataCollatorForSeq2Seq`), as many examples per step as our packed rows hold, bf16 on CUDA, its defaults else."""
    warm, measured = ctx.scale.warm_steps, ctx.scale.measured_steps
    lengths = [len(e["input_ids"]) for e in ctx.hf_examples]
    per_step = ctx.scale.throughput_rows * ctx.bed.pack.row_len * ctx.fill["baseline"]
    batch = max(1, round(per_step / (sum(lengths) / len(lengths))))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ctx.base(size), dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(ctx.workdir / "hf-trainer"),
        per_device_train_batch_size=batch,
        max_steps=warm + measured,
        learning_rate=1e-3,
        warmup_steps=warm,
        bf16=ctx.cuda,
        use_cpu=not ctx.cuda,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(ctx.tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=ctx.hf_examples, data_collator=collator)
    clock = _Clock((warm, warm + measured), ctx.sync)
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line is not ours to print
    counted = {"calls": 0, "tokens": 0, "positions": 0}
    original = trainer.training_step

    def counting_step(model, inputs, *a, **kw):  # inputs are still on the host here: counting costs no sync
        counted["calls"] += 1
        if counted["calls"] > warm:
            counted["tokens"] += int(inputs["attention_mask"].sum())
            counted["positions"] += int(inputs["attention_mask"].numel())
        return original(model, inputs, *a, **kw)

    trainer.training_step = counting_step
    trainer.train()
    seconds = clock.times[warm + measured] - clock.times[warm]
    del trainer, model
    _free()
    return {
        "tokens": counted["tokens"],
        "padded_positions": counted["positions"],
        "examples_per_step": batch,
        "seconds": round(seconds, 4),
        "tokens_per_s": counted["tokens"] / seconds,
    }


def part_training(ctx: Context) -> dict:
    report: dict = {
        "attention": ctx.chosen,
        "rows_per_step": ctx.scale.throughput_rows,
        "row_len": ctx.bed.pack.row_len,
        "warm_steps": ctx.scale.warm_steps,
        "measured_steps": ctx.scale.measured_steps,
        "peak_tflops_bf16": ctx.peak_tflops,
        "peak_source": ctx.peak_source,
        "mfu_formula": "6 x parameters x non-pad tokens/s / peak (attention score FLOPs not counted)",
        "sizes": {},
    }
    say(
        f"training throughput (non-pad tokens/s, {ctx.scale.measured_steps} steps after {ctx.scale.warm_steps} warm "
        f"ones; peak {ctx.peak_tflops} TFLOP/s: {ctx.peak_source})"
    )
    for size in ("embedded", "gpu"):
        ours = our_throughput(ctx, size, "baseline")
        ours_scaffold = our_throughput(ctx, size, "scaffold")
        hf = hf_throughput(ctx, size)
        params = ours["parameters"]
        mfu = 6 * params * ours["tokens_per_s"] / (ctx.peak_tflops * 1e12) if ctx.peak_tflops else None
        mfu_scaffold = (
            6 * params * ours_scaffold["tokens_per_s"] / (ctx.peak_tflops * 1e12) if ctx.peak_tflops else None
        )
        row = {
            "parameters": params,
            "ours_baseline": ours,
            "ours_scaffold": ours_scaffold,
            "hf_trainer": hf,
            "ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
            "ratio_scaffold": ours_scaffold["tokens_per_s"] / hf["tokens_per_s"],
            "mfu": mfu,
            "mfu_scaffold": mfu_scaffold,
        }
        report["sizes"][size] = row
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        say(
            f"  {size} ({params / 1e6:.1f} M): ours (CoT-SFT arm, packed) {ours['tokens_per_s']:,.0f} tokens/s, "
            f"scaffold arm {ours_scaffold['tokens_per_s']:,.0f}; HF Trainer ({hf['examples_per_step']} padded "
            f"examples/step) {hf['tokens_per_s']:,.0f}",
            f"    ratio ours / HF Trainer {row['ratio']:.2f}x (scaffold arm {row['ratio_scaffold']:.2f}x); MFU {pct(mfu)} "
            f"(scaffold arm {pct(mfu_scaffold)})",
        )
    return report


# --- (c) scaffolded decoding against generate ------------------------------------------------------------------------


def part_decoding(ctx: Context) -> dict:
    """Both decoders write the whole budget: scaffolded decoding with forced signals (steps of up to 32 tokens; an
    untrained head could answer at once) and plain greedy `generate`, on the same questions and batches."""
    n, size_b, budget = ctx.scale.decode_questions, ctx.scale.decode_batch, ctx.scale.decode_tokens
    pool = [i.question for split in ("validation", "test") for i in ctx.items[split]]
    questions = [pool[i % len(pool)] for i in range(n)]
    batches = [questions[i : i + size_b] for i in range(0, n, size_b)]
    golden = [["reasoning_analysis"] * budget] * size_b
    cfg = DecodeConfig(tau=0.0, max_steps=budget, max_step_tokens=32, max_tokens=budget, max_answer_tokens=1)
    report: dict = {"questions": n, "batch": size_b, "new_tokens_each": budget, "sizes": {}}
    say(
        f"decoding: {n} questions, batch {size_b}, {budget} new tokens each (model in float32, as the pipeline decodes)"
    )
    for size in ("embedded", "gpu"):
        torch.manual_seed(0)
        model = ScaffoldStudent.from_pretrained(ctx.base(size), kind="scaffold").to(ctx.device).eval()
        decoder = ScaffoldDecoder(model, ctx.tokenizer, cfg, ctx.fmt)
        decoder.generate_batch(questions[:2], "golden", golden[:2])  # warm: CUDA context and kernels
        plain_generate_batch(model, ctx.tokenizer, questions[:2], 4, ctx.fmt)
        ctx.sync()
        t = time.perf_counter()
        gens = [g for b in batches for g in decoder.generate_batch(b, "golden", golden[: len(b)])]
        ctx.sync()
        scaffold_s = time.perf_counter() - t
        generated = sum(g.new_tokens for g in gens)
        tags = sum(len(ctx.fmt.tag_ids[s.signal]) for g in gens for s in g.steps) + len(gens) * len(
            ctx.fmt.tag_ids["response_generation"]
        )
        t = time.perf_counter()
        plain = sum(
            g.new_tokens for b in batches for g in plain_generate_batch(model, ctx.tokenizer, b, budget, ctx.fmt)
        )
        ctx.sync()
        plain_s = time.perf_counter() - t
        row = {
            "parameters": count_parameters(model.backbone),
            "scaffold": {"generated": generated, "tags_fed": tags, "seconds": round(scaffold_s, 4)},
            "generate": {"generated": plain, "seconds": round(plain_s, 4)},
            "scaffold_reply_tokens_per_s": (generated + tags) / scaffold_s,
            "scaffold_generated_tokens_per_s": generated / scaffold_s,
            "generate_tokens_per_s": plain / plain_s,
        }
        row["ratio_reply"] = row["scaffold_reply_tokens_per_s"] / row["generate_tokens_per_s"]
        row["ratio_generated"] = row["scaffold_generated_tokens_per_s"] / row["generate_tokens_per_s"]
        report["sizes"][size] = row
        say(
            f"  {size}: scaffolded {generated:,} generated + {tags:,} tags in {scaffold_s:.2f} s; generate {plain:,} "
            f"in {plain_s:.2f} s; ratio {row['ratio_reply']:.2f}x per reply token, {row['ratio_generated']:.2f}x per "
            "generated token"
        )
        del model, decoder
        _free()
    return report


# --- (d) the experiment bed at GPU scale -----------------------------------------------------------------------------


def part_bed(ctx: Context) -> dict:
    bed, scale = ctx.bed, ctx.scale
    times = dict(ctx.times)
    decode = bed.decode.model_copy(update=scale.decode_caps)
    report: dict = {
        "preset": bed.preset,
        "student": {**ctx.sizes("gpu"), "signal_injection": bed.student.signal_injection},
        "data": ctx.data_summary,
        "decode": decode.resolved(ctx.budget).model_dump(),
        "arms": {},
    }
    say(f"bed ({bed.preset}): both arms at the GPU size, {scale.bed_steps} steps of {scale.bed_rows} rows each")
    for kind in KINDS:
        update = {
            "kind": kind,
            "max_steps": scale.bed_steps,
            "batch_size": scale.bed_rows,
            "attn_implementation": ctx.chosen,
            "device": ctx.device.type,
            "checkpoint_every": 0,
        }
        if scale.bed_learning_rate:
            update["learning_rate"] = scale.bed_learning_rate
        cfg = bed.train.model_copy(update=update).resolved(pretrained=False)
        torch.manual_seed(cfg.seed)
        model = ScaffoldStudent.from_pretrained(ctx.base("gpu"), kind=kind, injection=bed.student.signal_injection)
        t = time.perf_counter()
        result = train(model, ctx.data[kind], cfg, progress=False)
        times[f"train_{kind}"] = _seconds(t)
        arm = {
            "steps": len(result.losses),
            "first_loss": result.losses[0],
            "final_loss": result.final_loss,
            "tokens_per_s": result.tokens_per_s,
            "label_tokens": result.train_tokens,
            "train_seconds": times[f"train_{kind}"],
            "learning_rate": cfg.learning_rate,
            "beta": cfg.beta if kind == "scaffold" else None,
        }
        report["arms"][kind] = arm
        say(
            f"  {kind}: loss {arm['first_loss']:.3f} -> {arm['final_loss']:.3f} in {arm['steps']} steps "
            f"({arm['train_seconds']:.1f} s, {arm['tokens_per_s']:,.0f} label tokens/s)"
        )
        t = time.perf_counter()
        try:
            for split in ("validation", "test"):
                arm[split] = score_split(ctx, model, kind, split, decode)
        except Exception:  # the arm's training figures stay in the report; the part fails below
            arm["scoring_error"] = traceback.format_exc()
            say(f"  {kind}: scoring FAILED", arm["scoring_error"])
        times[f"eval_{kind}"] = arm["eval_seconds"] = _seconds(t)
        if "test" in arm:
            say(
                f"  {kind}: Pass@1 validation {100 * arm['validation']['pass_at_1']:.1f} % (n={arm['validation']['n']}), "
                f"test {100 * arm['test']['pass_at_1']:.1f} % (n={arm['test']['n']}); scoring {arm['eval_seconds']:.1f} s"
            )
        del model
        _free()
    report["seconds"] = times
    report["wall_s"] = round(sum(times.values()), 3)
    say(f"  bed wall time {report['wall_s']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    failed = [k for k, arm in report["arms"].items() if "scoring_error" in arm]
    if failed:
        raise PartFailed(f"scoring failed for {', '.join(failed)}", report)
    return report


def score_split(ctx: Context, model: ScaffoldStudent, kind: str, split: str, decode: DecodeConfig) -> dict:
    """Pass@1 on a held-out split with the evaluation stage's functions: scaffolded decoding with the student's own
    signals for the scaffold arm, greedy `generate` within the same token budget for CoT-SFT."""
    run = suite_run(
        EvalConfig(split=split, variants=["predicted"], decode=decode, batch_size=ctx.scale.eval_batch),
        HELDOUT,
        ctx.budget,
    )
    if kind == "scaffold":
        rows, _ = evaluate_scaffold(model, ctx.fmt, ctx.items[split], run, progress=False)
    else:
        rows, _ = evaluate_plain(model, ctx.fmt, ctx.items[split], run, progress=False)
    row = rows[0]
    return {
        "variant": row.variant,
        "n": row.n,
        "pass_at_1": row.accuracy,
        "ci": [row.ci_low, row.ci_high],
        "next_signal_acc": row.next_signal_acc,
        "mean_steps": row.mean_steps,
    }


class PartFailed(RuntimeError):
    """A part that failed after measuring something: what it measured goes into the report beside the error."""

    def __init__(self, message: str, partial: dict) -> None:
        super().__init__(message)
        self.partial = partial


PARTS: dict[str, Callable[[Context], dict]] = {
    "attention": part_attention,
    "training": part_training,
    "decoding": part_decoding,
    "bed": part_bed,
}


# --- the run ---------------------------------------------------------------------------------------------------------


def environment(device: torch.device, carried: list[str]) -> dict:
    import inspect

    from transformers import Qwen2Model

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "device": device.type,
        "from_wheels": carried,
        # the KV-cache keyword of the decoder's forward: `cache` in recent transformers, `past_key_values` before
        "cache_keyword": "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "cuda": torch.version.cuda,
        }
    return env


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "none assumed on the CPU: MFU is not reported"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} dense bf16 from NVIDIA's datasheet (sparsity excluded)"
    return None, f"unknown for {name!r}: pass --peak-tflops"


def judge(report: dict) -> dict:
    """The issue's goals, judged on a CUDA run only (a tiny CPU run checks that every part works, not its speed)."""
    parts = report["parts"]
    goals: dict = {"loss_equality": parts.get("attention", {}).get("ok")}
    if report["mode"] != "full":
        return goals | {"speed_goals": "not judged: tiny CPU run"}
    training = parts.get("training", {}).get("sizes", {}).get("gpu")
    if training:
        goals["training_ratio_gpu_size"] = training["ratio"] >= GOALS["training_ratio"]
        goals["mfu_gpu_size"] = training["mfu"] is not None and training["mfu"] >= GOALS["mfu"]
    decoding = parts.get("decoding", {}).get("sizes")
    if decoding:
        goals["decoding_ratio"] = min(r["ratio_reply"] for r in decoding.values()) >= GOALS["decoding_ratio"]
    if "bed" in parts:
        goals["bed_wall_time"] = parts["bed"]["wall_s"] <= GOALS["bed_wall_s"]
    return goals


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out)


def run(args, carried: list[str]) -> int:
    started = time.perf_counter()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading and saving bars; what the check prints is its own
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    scale = FULL if cuda else TINY
    if args.problems:
        scale = replace(scale, problems=args.problems)
    if args.bed_steps:
        scale = replace(scale, bed_steps=args.bed_steps)
    deadline = args.deadline_s if args.deadline_s is not None else (300.0 if cuda else None)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    report: dict = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "full" if cuda else "tiny",
        "environment": environment(device, carried),
        "preset": args.preset,
        "scale": scale.__dict__,
        "goals_wanted": GOALS,
        "parts": {},
        "errors": {},
        "skipped": [],
    }
    env = report["environment"]
    say(
        f"device check ({report['mode']}): {env.get('gpu', 'CPU')} | python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']} | {env['cpus']} CPUs"
        + (f" | from wheels: {', '.join(carried)}" if carried else "")
    )
    if not cuda and not args.tiny:
        say("no CUDA device: running the tiny CPU version of every part")
    write(report, args.out)
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(device, scale, load_bed(args.preset), workdir, document_attention(device), peak, peak_source)
        run_parts(ctx, parts, report, args.out, started, deadline)
    report["goals"] = judge(report)
    report["wall_s"] = _seconds(started)
    report["ok"] = not report["errors"] and report["goals"].get("loss_equality") is not False
    write(report, args.out)
    say(
        "goals: "
        + ", ".join(
            f"{k} {'met' if v is True else 'NOT met' if v is False else v}" for k, v in report["goals"].items()
        ),
        f"errors: {', '.join(report['errors']) or 'none'}; skipped: {', '.join(report['skipped']) or 'none'}",
        f"wall time {report['wall_s']:.1f} s; report: {args.out}",
    )
    return 0 if report["ok"] else 1


def run_parts(ctx: Context, parts: list[str], report: dict, out: Path, started: float, deadline: float | None) -> None:
    """The data, then each part in turn; a failing part is recorded and the next one runs. The report is rewritten
    after each, so a run killed by a timeout still leaves what it finished."""
    try:
        report["data"] = prepare_data(ctx)
    except Exception:
        report["errors"]["data"] = traceback.format_exc()
        say(report["errors"]["data"])
        parts = []
    for part in parts:
        elapsed = time.perf_counter() - started
        if deadline is not None and elapsed > deadline:
            report["skipped"].append(part)
            say(f"{part}: skipped, {elapsed:.0f} s already spent (deadline {deadline:.0f} s)")
            continue
        t = time.perf_counter()
        try:
            report["parts"][part] = PARTS[part](ctx) | {"part_seconds": _seconds(t)}
        except Exception as exc:
            if isinstance(exc, PartFailed):
                report["parts"][part] = exc.partial | {"part_seconds": _seconds(t)}
            report["errors"][part] = traceback.format_exc()
            say(f"{part} FAILED:", report["errors"][part])
        finally:
            _free()
            report["wall_s"] = _seconds(started)
            write(report, out)
