"""The promotion stage: the evaluated challenger takes the `champion` alias when every blocking gate passed, none of
its training problems overlaps the promotion suite, and its score there beats the current champion's (same eval
config) by the configured margin; otherwise the refusal and its reason are recorded on the version. Decided under the
registry's promotion lock, so two racing promotions leave the better model on top."""

from __future__ import annotations

from collections.abc import Sequence

from scaffold_lib.evaluation.config import PromotionConfig
from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.store import registry, scores
from scaffold_lib.store.handles import PromotionOutcome
from scaffold_lib.store.store import Store


def promote_challenger(
    store: Store,
    evaluation: EvaluationHandle,
    cfg: PromotionConfig,
    failed_gates: Sequence[str] = (),
    who: str = "scaffold",
) -> PromotionOutcome:
    """Move `champion` to the evaluated student when every gate passed and its score on the promotion suite beats the
    current champion's (same eval config) by the margin; otherwise record why on the version."""
    wh, reg = store.warehouse, store.registry
    config_hash = evaluation.eval_config_hashes.get(cfg.suite)
    failed = list(failed_gates)
    if config_hash is None:
        failed.append(f"the evaluation did not score the promotion suite {cfg.suite!r}")
    contaminated = evaluation.contamination.get(cfg.suite, {}).get("trained_on", 0)
    if contaminated:
        failed.append(
            f"{contaminated} training problems of v{evaluation.version} overlap the promotion suite "
            f"{cfg.suite!r} (decontamination.action = 'exclude' leaves them out)"
        )

    def accuracy(version: str) -> float | None:
        return scores.best_accuracy(wh, reg.model_name, version, cfg.variant, config_hash)

    outcome = registry.promote_if_better(reg, evaluation.version, accuracy, cfg.margin, failed, who=who)
    registry.append_description(
        reg,
        evaluation.version,
        f"Promotion: {'yes' if outcome.promoted else 'no'} — {outcome.reason}\n\n{evaluation.comparison_table}",
    )
    return outcome
