"""What the evaluation stage hands on: one evaluation of a student and its baseline (`EvaluationHandle`: ids, the
score rows, the tables), and how scored models are named."""

from __future__ import annotations

from pydantic import BaseModel, Field

UNTUNED = "untuned"  # the version name of the backbone's score rows (it is no registered version)


def model_label(name: str, version: str) -> str:
    """How a scored model is named in tables and lists: `scaffold-student v3`, `base:embedded (untuned)`."""
    return f"{name} (untuned)" if version == UNTUNED else f"{name} v{version}"


class EvaluationHandle(BaseModel):
    """One evaluation of a student (and its baseline): ids, the rows, the tables."""

    evaluation_id: str
    model_name: str
    version: str
    baseline: str | None  # "<name> v<version>"
    suites: list[str]
    split: str
    eval_config_hashes: dict[str, str]
    rows: list[dict]
    items: dict[str, int]  # suite -> items scored (paired: every variant answered these)
    dropped_without_golden: dict[str, int] = Field(default_factory=dict)
    # suite -> {"overlapping": training problems sharing an n-gram with it, "trained_on": of those, in the student's shards}
    contamination: dict[str, dict] = Field(default_factory=dict)
    samples: dict[str, str] = Field(default_factory=dict)
    # suite -> rows of its file quarantined (eval.lenient), each in the warehouse's `quarantine` table with file and line
    quarantined: dict[str, int] = Field(default_factory=dict)
    comparison_table: str
    score_table: str

    def summary(self) -> str:
        return (
            f"benchmark_scores: {len(self.rows)} score rows of v{self.version} ({', '.join(self.suites)}, {self.split})"
        )
