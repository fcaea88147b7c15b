"""What the labels in the warehouse add up to, as the paper reports them: keyword coverage (paper: 74 %), rule
coverage, the fallback's share, LLM agreement (paper: 87 %), counts per signal and labeller, and coverage per problem
source (GSM8K-style worked solutions open differently from R1 traces)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scaffold_lib.data.signals import FALLBACK, KEYWORD_MATCHED, LLM_AGREE, LLM_OVERRIDE, PATTERN, SIGNALS, Label
from scaffold_lib.store import data_tables

if TYPE_CHECKING:
    from scaffold_lib.store.store import Store


@dataclass
class LabelStats:
    """Counts like the paper reports them: keyword coverage (paper: 74 %), per-signal counts, fallback share."""

    steps: int = 0
    by_labeller: Counter = field(default_factory=Counter)
    by_signal: Counter = field(default_factory=Counter)

    def add(self, label: Label) -> None:
        self.steps += 1
        self.by_labeller[label.labeller] += 1
        self.by_signal[label.signal] += 1

    @property
    def keyword_coverage(self) -> float:
        """Share of steps an opening keyword labelled (the paper's figure: 74 %)."""
        return sum(self.by_labeller[k] for k in KEYWORD_MATCHED) / self.steps if self.steps else 0.0

    @property
    def rule_coverage(self) -> float:
        """Share of steps a keyword or a pattern labelled (the steps not left to the fallback or the final rule)."""
        return self.keyword_coverage + (self.by_labeller[PATTERN] / self.steps if self.steps else 0.0)

    @property
    def fallback_share(self) -> float:
        return self.by_labeller[FALLBACK] / self.steps if self.steps else 0.0

    @property
    def llm_agreement(self) -> float | None:
        """Share of LLM-checked keyword labels the LLM confirmed (paper: 87 %); None before any was checked."""
        checked = self.by_labeller[LLM_AGREE] + self.by_labeller[LLM_OVERRIDE]
        return self.by_labeller[LLM_AGREE] / checked if checked else None

    def as_dict(self) -> dict:
        agreement = self.llm_agreement
        return {
            "steps": self.steps,
            "keyword_coverage": round(self.keyword_coverage, 4),
            "rule_coverage": round(self.rule_coverage, 4),
            "fallback_share": round(self.fallback_share, 4),
            "llm_agreement": None if agreement is None else round(agreement, 4),
            "by_labeller": dict(self.by_labeller),
            "by_signal": {s: self.by_signal.get(s, 0) for s in SIGNALS},
        }


def label_statistics(store: Store) -> dict:
    stats = LabelStats()
    for r in data_tables.label_counts(store.warehouse):
        stats.steps += r["n"]
        stats.by_signal[r["signal"]] += r["n"]
        stats.by_labeller[r["labeller"]] += r["n"]
    return stats.as_dict()


def coverage_by_source(store: Store) -> dict[str, dict[str, float]]:
    """Keyword, keyword+pattern and fallback shares per problem source (GSM8K-style worked solutions open
    differently from R1 traces)."""
    rows = data_tables.coverage_by_source(store.warehouse, KEYWORD_MATCHED, (*KEYWORD_MATCHED, PATTERN), FALLBACK)
    return {
        r["source"]: {
            "keyword_coverage": round(r["keyword"], 4),
            "rule_coverage": round(r["rules"], 4),
            "fallback_share": round(r["fallback"], 4),
        }
        for r in rows
    }


def signal_distribution_markdown(by_signal: dict[str, int]) -> str:
    total = sum(by_signal.values()) or 1
    lines = ["| signal | steps | share |", "|---|---:|---:|"]
    lines += [f"| {s} | {by_signal.get(s, 0)} | {by_signal.get(s, 0) / total:.1%} |" for s in SIGNALS]
    return "\n".join(lines)
