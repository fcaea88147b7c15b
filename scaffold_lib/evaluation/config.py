"""The evaluation stages' settings: the `decontamination`, `eval` and `promotion` sections of `PipelineConfig`, and
the decoding settings `eval` nests.

Pydantic only: the configuration is read without importing torch or transformers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from scaffold_lib.evaluation.suites import HELDOUT

SCAFFOLD_VARIANTS = ("predicted", "golden", "random", "summaries_only")
BUDGET_SLACK = 1.25  # decoding caps are the training data's 99th percentiles with this much room


class DecontaminationConfig(BaseModel):
    """Which benchmark suites training problems are checked against, and what happens to an overlap."""

    suites: list[str] | None = Field(None, description="default: every benchmark suite whose file is present")
    ngram: int = Field(8, ge=3, description="words in a shared n-gram (lm-eval: 13, open-r1: 8)")
    action: Literal["exclude", "report"] = Field(
        "exclude",
        description="exclude: overlapping problems are not "
        "trained on; report: trained on, and promotion "
        "on that suite is blocked",
    )
    splits: list[str] = Field(
        default_factory=lambda: ["train", "validation"],
        description="problems of these splits are checked (what trains or tunes the model)",
    )
    suites_dir: str | None = Field(None, description="default <home>/benchmarks")


class DecodeConfig(BaseModel):
    """Scaffolded decoding. The token caps default to the training data's distribution (99th percentile of a step,
    an answer step and a whole reply, with 25 % room), and the baseline gets the same total budget."""

    tau: float = Field(0.96, ge=0.0, le=1.0, description="confidence needed to write another step (paper: 0.96)")
    max_steps: int | None = Field(None, ge=0, description="steps before the answer is forced; default: from the data")
    max_step_tokens: int | None = Field(None, ge=1, description="default: from the training data")
    max_answer_tokens: int | None = Field(None, ge=1, description="default: from the training data")
    max_tokens: int | None = Field(
        None, ge=1, description="new tokens over the whole generation, both arms; default: from the training data"
    )
    seed: int = 0

    def resolved(self, budget: dict[str, int] | None) -> DecodeConfig:
        """Caps left unset are filled from the training data's token budget (see `ShardsHandle.budget`)."""
        budget = budget or {}

        def cap(value: int | None, key: str, fallback: int) -> int:
            if value is not None:
                return value
            return max(1, int(budget[key] * BUDGET_SLACK + 0.999)) if budget.get(key) else fallback

        return self.model_copy(
            update={
                "max_steps": cap(self.max_steps, "steps_p99", 16),
                "max_step_tokens": cap(self.max_step_tokens, "step_tokens_p99", 64),
                "max_answer_tokens": cap(self.max_answer_tokens, "answer_tokens_p99", 64),
                "max_tokens": cap(self.max_tokens, "reply_tokens_p99", 512),
            }
        )


class EvalConfig(BaseModel):
    """What is evaluated and how: suites, which split of the warehouse's held-out problems, variants, decoding."""

    suites: list[str] = Field(
        default_factory=lambda: [HELDOUT],
        description="heldout (the warehouse's held-out "
        "problems) and/or gsm8k, math500, strategyqa, csqa, truthfulqa_mc1 (files)",
        json_schema_extra={"flag": "suite"},
    )
    split: Literal["validation", "test"] = Field(
        "test", description="the held-out split scored as `heldout`: tune on validation, report test once"
    )
    variants: list[str] = Field(default_factory=lambda: list(SCAFFOLD_VARIANTS))
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    limit: int | None = Field(None, ge=1, description="evaluate on the first N items of each suite only")
    batch_size: int = Field(32, ge=1, description="questions decoded together")
    include_base: bool = Field(True, description="also score the untuned backbone (the table's first row)")
    export_samples: bool = Field(True, description="write per-sample answers (lm-evaluation-harness style JSONL)")
    suites_dir: str | None = Field(None, description="where suite files are looked for; default <home>/benchmarks")
    suite_files: dict[str, str] = Field(
        default_factory=dict,
        description="suite -> its data file (JSONL/JSON/Parquet in the public format), e.g. {gsm8k = 'my.jsonl'}; "
        "a suite not named here is read from suites_dir under its public file name",
    )
    lenient: bool = Field(
        True, description="quarantine a suite file's bad rows (file, line, field) instead of refusing the file"
    )


class PromotionConfig(BaseModel):
    """When a challenger takes the `champion` alias."""

    margin: float = Field(0.0, description="Pass@1 a challenger must add over the champion")
    suite: str = Field(HELDOUT, description="the suite whose score decides")
    variant: str = Field("predicted", description="the variant whose score decides")
