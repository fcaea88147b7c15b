"""The queries of the score tables (`benchmark_scores`, `item_scores`, `experiment_scores`): what promotion compares,
what the paired comparisons and the error analysis read, and the table `scaffold scores` prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaffold_lib.store.warehouse import Warehouse


def best_accuracy(wh: Warehouse, model_name: str, version: str, variant: str, eval_config_hash: str) -> float | None:
    """A version's best Pass@1 of `variant` under one eval config (None when it was never scored so)."""
    return wh.scalar(
        "SELECT max(accuracy) FROM benchmark_scores WHERE model_name = ? AND version = ? "
        "AND variant = ? AND eval_config_hash = ?",
        [model_name, version, variant, eval_config_hash],
    )


def latest_scores(wh: Warehouse, model_name: str, version: str) -> list[dict]:
    """The newest evaluation of a version per suite and split, with the baseline and base rows scored alongside it."""
    return wh.query(
        """
        SELECT s.* FROM benchmark_scores s JOIN (
            SELECT DISTINCT ON (benchmark, split) evaluation_id FROM benchmark_scores
            WHERE model_name = ? AND version = ? AND evaluation_id IS NOT NULL
            ORDER BY benchmark, split, created_at DESC) latest USING (evaluation_id)
        ORDER BY s.benchmark, s.variant""",
        [model_name, version],
    )


def item_correctness(wh: Warehouse, evaluation_id: str, variants: Sequence[str]) -> list[dict]:
    """Whether each item was answered right (`variant`, `doc_id`, `correct`) by these variants of one evaluation."""
    return wh.query(
        "SELECT variant, doc_id, correct FROM item_scores WHERE evaluation_id = ? AND list_contains(?, variant)",
        [evaluation_id, list(variants)],
    )


def answers_with_questions(wh: Warehouse, evaluation_ids: Sequence[str], variants: Sequence[str]) -> list[dict]:
    """Every answer of these variants in these evaluations, with its problem's question (the variant as `arm`)."""
    return wh.query(
        """
        SELECT i.variant AS arm, p.question, i.response, i.extracted, i.stopped_by, i.correct
        FROM item_scores i JOIN problems p ON p.problem_id = i.doc_id
        WHERE list_contains(?, i.evaluation_id) AND list_contains(?, i.variant)""",
        [list(evaluation_ids), list(variants)],
    )


def suite_overlap(wh: Warehouse, suite: str, model_name: str, version: str) -> dict:
    """Problems recorded as overlapping a suite (`overlapping`), and how many of those trained a version
    (`trained_on`)."""
    return wh.query(
        """
        SELECT count(DISTINCT c.problem_id) AS overlapping,
               count(DISTINCT CASE WHEN ms.shard_id IS NOT NULL THEN c.problem_id END) AS trained_on
        FROM contamination c
        LEFT JOIN teacher_traces t USING (problem_id)
        LEFT JOIN shard_members m USING (trace_id)
        LEFT JOIN model_shards ms ON ms.shard_id = m.shard_id AND ms.model_name = ? AND ms.version = ?
        WHERE c.suite = ?""",
        [model_name, version, suite],
    )[0]
