"""The experiment's comparisons with the item as the unit: per item, correctness over the seeds, the arms paired over
items (bootstrap interval, sign-flip test), and McNemar per seed as the secondary analysis (step 5 of
`scaffold_lib.experiment`)."""

from __future__ import annotations

import numpy as np

from scaffold_lib.evaluation.handles import EvaluationHandle
from scaffold_lib.evaluation.stats import item_comparison, paired_comparison
from scaffold_lib.evaluation.suites import HELDOUT
from scaffold_lib.experiment_context import Context
from scaffold_lib.experiment_report import COMPARISONS, PRIMARY
from scaffold_lib.store.scores import item_correctness
from scaffold_lib.store.store import Store


def item_matrix(
    store: Store, evaluations: dict[int, EvaluationHandle], a: str, b: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """[items, seeds] correctness of variants `a` and `b` over the items both answered under every seed."""
    by = {v: {} for v in (a, b)}
    for seed, evaluation in evaluations.items():
        for r in item_correctness(store.warehouse, evaluation.evaluation_id, [a, b]):
            by[r["variant"]].setdefault(r["doc_id"], {})[seed] = r["correct"]
    seeds = sorted(evaluations)
    items = sorted(d for d in by[a] if d in by[b] and len(by[a][d]) == len(by[b][d]) == len(seeds))
    if not items:
        return None
    return tuple(np.array([[by[v][d][s] for s in seeds] for d in items], dtype=bool) for v in (a, b))


def compare(ctx: Context, tests: dict[str, dict[int, EvaluationHandle]]) -> tuple[dict, dict, list[str]]:
    """(comparisons "suite:a-b" -> ItemComparison dict, variant -> seed -> test Pass@1, McNemar lines per seed of the
    primary comparison)."""
    exp = ctx.cfg.experiment
    comparisons, mcnemar = {}, []
    for suite, evaluations in tests.items():
        pairs = COMPARISONS if suite == HELDOUT else (PRIMARY, ("golden", "predicted"))
        for a, b in pairs:
            matrices = item_matrix(ctx.store, evaluations, a, b)
            if matrices is None:
                continue
            comparisons[f"{suite}:{a}-{b}"] = item_comparison(*matrices, exp.bootstrap).as_dict()
            if suite == HELDOUT and (a, b) == PRIMARY:
                mcnemar = [
                    f"- seed {seed}: "
                    + paired_comparison(matrices[0][:, j], matrices[1][:, j], exp.bootstrap, seed).line(a, b)
                    for j, seed in enumerate(sorted(evaluations))
                ]
    per_seed: dict[str, dict[int, float]] = {}
    for seed, evaluation in tests[HELDOUT].items():
        for r in evaluation.rows:
            per_seed.setdefault(r["variant"], {})[seed] = r["accuracy"]
    return comparisons, per_seed, mcnemar
