"""The student stages' settings: the `shards`, `student` and `train` sections of `PipelineConfig`.

Pydantic only: the configuration is read without importing torch or transformers (`scaffold --help`, a machine
without a GPU stack), and every module that trains or packs takes its settings from here.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

EMBEDDED = "embedded"  # the tiny Qwen2 student built from a config (`StudentConfig.base_model`)
SignalInjection = Literal["output", "input", "both", "none"]
EMBEDDED_LR, PRETRAINED_LR = 3e-3, 5e-5  # from scratch vs fine-tuning (3e-3 wrecks a pretrained model in 30 steps)


class PackConfig(BaseModel):
    row_len: int = Field(512, ge=8)
    rows_per_shard: int = Field(256, ge=1)
    too_long: Literal["split", "drop"] = "split"
    seed: int = 0


class StudentConfig(BaseModel):
    """Which backbone the student starts from: "embedded" (a tiny Qwen2 built from these sizes with a tokenizer
    trained on the traces), a hub id or a local model directory (`scaffold import-model` makes one from a GGUF)."""

    base_model: str = EMBEDDED
    # sizes of the embedded default (about 2 M parameters)
    vocab_size: int = Field(768, ge=260)
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0
    signal_injection: SignalInjection = Field(
        "input",
        description="where the scaffold student adds its signal embedding: input (the input embedding of every token "
        "of the step), output (the last hidden state before the LM head: a fixed per-signal bias on the logits, which "
        "left the first bed's student 30 points behind CoT-SFT, docs/results.md), both, or none (the tag token only)",
    )
    chat_template: bool | None = Field(
        None,
        description="wrap the question in the tokenizer's chat template; "
        "default: when the backbone is a pretrained model that has one",
    )


class ShardsConfig(BaseModel):
    """How training traces become packed Parquet shards."""

    pack: PackConfig = Field(default_factory=PackConfig)
    include_incorrect: bool = Field(False, description="train on traces whose answer is wrong too")
    storage_url: str | None = Field(
        None,
        description="where shards go: a folder or an fsspec URL (s3://bucket/"
        "shards, with s3fs installed); default <artifacts>/shards",
    )
    min_fill: float = Field(0.99, ge=0, le=1, description="the blocking fill check's threshold")
    wrong_arithmetic: Literal["mask", "exclude", "keep"] = Field(
        "mask",
        description="a step stating a wrong calculation (a teacher's slip, e.g. '5 + 3 = 9') is no training target "
        "(mask), its trace is left out (exclude), or it is trained on like any step (keep)",
    )


class TrainConfig(BaseModel):
    """One training run; both arms (scaffold student and CoT-SFT baseline) use the same settings but `kind`."""

    kind: Literal["scaffold", "baseline"] = "scaffold"
    beta: float = Field(0.3, ge=0.0, le=1.0, description="weight of the signal loss")
    learning_rate: float | None = Field(
        None,
        gt=0,
        description=f"default: {EMBEDDED_LR} for the embedded student "
        f"trained from scratch, {PRETRAINED_LR} for a pretrained one",
    )
    weight_decay: float = 0.01
    warmup_steps: int | None = Field(
        None, ge=0, description="default: a tenth of the steps, at most 20 (from scratch) or 50 (pretrained)"
    )
    max_steps: int = Field(
        200,
        ge=1,
        description="optimiser steps when epochs is 0; with epochs > 0 (the demo) the steps follow from the rows: "
        "--set train.epochs=0 to count steps",
        json_schema_extra={"flag": "steps"},
    )
    epochs: float = Field(
        0.0,
        ge=0,
        description="passes over the arm's packed rows: when > 0, each arm's max_steps is derived from its own rows, so "
        "both arms see every trace equally often (the scaffold's tag tokens make its rows more numerous); 0: max_steps",
    )
    batch_size: int = Field(8, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = Field(0, ge=0, description="0 = no checkpoints")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory for large students, ~30 % more compute"
    )
    attn_implementation: str | None = Field(
        None,
        description="attention while training on packed rows; default: attention within each packed example: "
        "packed_documents on the CPU; on CUDA flash_attention_2 when flash-attn is installed, else flex_documents "
        "(FlexAttention, compute capability 8.0+), else sdpa",
    )
    fsdp: bool = Field(
        False,
        description="under torchrun: shard parameters, gradients and optimizer state over the "
        "ranks (FSDP2) instead of replicating them (DDP), for large students",
    )
    compile: bool = Field(False, description="torch.compile the forward pass (GPUs; first steps pay the compile)")
    compile_backend: str = "inductor"
    lora_r: int = Field(
        0,
        ge=0,
        description="0 = full fine-tune (the paper); > 0 = LoRA adapters of this rank "
        "(peft) on the backbone, signal head and embedding fully trained",
    )
    lora_alpha: int = 16
    lora_dropout: float = Field(0.0, ge=0, le=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    keep_checkpoints: int = 2
    log_every: int = 10
    launcher: Literal["inprocess", "torchrun"] = Field(
        "inprocess", description="torchrun: a DDP (or FSDP) job of `nproc` processes"
    )
    nproc: int = Field(1, ge=1, description="processes per node under torchrun (GPUs, or CPU processes on gloo)")

    data_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="train on this share of the packed rows (a random subset of the traces: rows are packed in a "
        "seeded random order), for sample-efficiency curves",
    )

    def rows_used(self, rows: int) -> int:
        return max(1, math.ceil(self.data_fraction * rows))

    def for_rows(self, rows: int) -> TrainConfig:
        """The config with max_steps derived from `epochs` over the rows it trains on (unchanged without epochs)."""
        if not self.epochs:
            return self
        per_step = self.batch_size * self.grad_accum * (self.nproc if self.launcher == "torchrun" else 1)
        return self.model_copy(update={"max_steps": max(1, math.ceil(self.epochs * self.rows_used(rows) / per_step))})

    def resolved(self, pretrained: bool) -> TrainConfig:
        """The config with the backbone-dependent defaults filled in (what is recorded and trained with)."""
        lr = self.learning_rate or (PRETRAINED_LR if pretrained else EMBEDDED_LR)
        warmup = (
            self.warmup_steps
            if self.warmup_steps is not None
            else min(50 if pretrained else 20, max(1, self.max_steps // 10))
        )
        return self.model_copy(update={"learning_rate": lr, "warmup_steps": warmup})
