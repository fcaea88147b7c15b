"""The experiment's statistics checked against known values, and the experiment runner end to end at micro size:
both arms over two seeds, τ chosen on validation, test scored once, rows in DuckDB, a parent MLflow run with the
training runs as children, and the same numbers when the same configuration runs again on a fresh instance."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from scaffold_lib.config import load_preset, preset_names
from scaffold_lib.evaluation.stats import calibration, mcnemar_exact, paired_comparison
from scaffold_lib.experiment import run_experiment
from scaffold_lib.experiment_report import execution_gap_note, registered_verdict, seed_spread_note
from scaffold_lib.runner import run_data_stages
from scaffold_lib.store import registry
from scaffold_lib.store.store import Store


def test_mcnemar_is_the_two_sided_binomial_test_of_the_discordant_pairs():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    # 10 discordant pairs all one way: 2 * 0.5**10
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(157, 133) == pytest.approx(binomtest(157, 290, 0.5).pvalue)
    assert mcnemar_exact(3, 12) == mcnemar_exact(12, 3)


def test_paired_comparison_counts_discordant_items_and_brackets_the_difference():
    a = [True] * 30 + [False] * 10 + [True] * 5 + [False] * 55
    b = [True] * 30 + [True] * 10 + [False] * 5 + [False] * 55
    c = paired_comparison(a, b, n_boot=2000)
    assert (c.n, c.a_only, c.b_only) == (100, 5, 10)
    assert c.accuracy_a == pytest.approx(0.35) and c.accuracy_b == pytest.approx(0.40)
    assert c.difference == pytest.approx(-0.05)
    assert c.ci_low < -0.05 < c.ci_high and c.ci_high < 0.05
    assert c.p_value == pytest.approx(binomtest(5, 15, 0.5).pvalue)
    same = paired_comparison(a, a, n_boot=500)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_comparison(a, b[:-1])


def test_the_registered_decision_rule_reads_the_primary_interval_against_the_smallest_effect():
    def verdict(low, high):
        return registered_verdict({"ci_low": low, "ci_high": high}, 0.03)

    assert "**better**" in verdict(0.001, 0.05) and "**worse**" in verdict(-0.05, -0.001)
    assert "**equivalent within ±3 points**" in verdict(-0.018, 0.014)
    assert "**inconclusive**" in verdict(-0.01, 0.04) and "**inconclusive**" in verdict(-0.03, 0.01)  # edge: not inside


def test_seeds_that_disagree_more_than_the_item_interval_is_wide_are_flagged():
    primary = {"ci_low": -0.018, "ci_high": 0.014}
    apart = {"predicted": {0: 0.189, 1: 0.151}, "cot_sft": {0: 0.149, 1: 0.194}}
    note = seed_spread_note(apart, primary)
    assert "-4.3 to +4.0 points" in note and "3.2 points" in note
    close = {"predicted": {0: 0.170, 1: 0.172}, "cot_sft": {0: 0.171, 1: 0.170}}
    assert seed_spread_note(close, primary) == ""
    assert seed_spread_note({"predicted": {0: 0.2}, "cot_sft": {0: 0.1}}, primary) == ""  # one seed: nothing to compare


def test_a_scaffold_that_executes_the_teachers_calculations_worse_than_cot_sft_is_flagged():
    # the timeline bed at 6 epochs, validation (bench/bed_budget.py): β = 0.3 against CoT-SFT, then β = 0 (tags only)
    cot = {"calculations": 1232, "result_exact": 0.920, "operands_exact": 0.968}
    note = execution_gap_note({"scaffold": {"result_exact": 0.905, "operands_exact": 0.877}, "cot_sft": cot})
    assert "operands 9.1 points fewer exact" in note and "results" not in note.split(":")[1]
    assert execution_gap_note({"scaffold": {"result_exact": 0.9002, "operands_exact": 0.9627}, "cot_sft": cot}) == ""
    both = execution_gap_note({"scaffold": {"result_exact": 0.688, "operands_exact": 0.832}, "cot_sft": cot})
    assert "results 23.2 points" in both and "operands 13.6 points" in both
    assert execution_gap_note({"scaffold": {"result_exact": None, "operands_exact": None}, "cot_sft": cot}) == ""
    assert execution_gap_note({"cot_sft": cot}) == ""


@pytest.mark.parametrize(
    ("preset", "version", "epochs", "beta", "injection", "grid"),
    [("experiment-v2", 2, 3.0, 0.3, "input", ["input", "output"]), ("experiment", 3, 6.0, 0.1, "input", [])],
)
def test_the_registered_experiments_presets_stay_as_registered(preset, version, epochs, beta, injection, grid):
    """docs/preregistration.md fixes these before each run; `scaffold --preset P experiment` reproduces a run only
    while they hold (a change is a new preset version, not an edit)."""
    resolved = load_preset(preset)
    cfg = resolved.config
    assert preset in preset_names() and resolved.preset_version == version
    assert (cfg.train.epochs, cfg.train.beta, cfg.student.signal_injection) == (epochs, beta, injection)
    assert cfg.experiment.injections == grid and cfg.experiment.seeds == [0, 1] and cfg.experiment.taus == [0.0, 0.9]
    assert cfg.problems.synthetic.n_problems == 8000 and cfg.problems.synthetic.style == "timeline"


def test_calibration_bins_and_expected_calibration_error():
    # 10 predictions at confidence 0.95, 9 right; 10 at 0.55, 3 right
    conf = [0.95] * 10 + [0.55] * 10
    hits = [True] * 9 + [False] + [True] * 3 + [False] * 7
    calib = calibration(conf, hits)
    filled = [b for b in calib.bins if b["n"]]
    assert [(b["n"], b["accuracy"]) for b in filled] == [(10, pytest.approx(0.3)), (10, pytest.approx(0.9))]
    assert calib.ece == pytest.approx(0.5 * abs(0.3 - 0.55) + 0.5 * abs(0.9 - 0.95))
    assert calibration([0.75] * 4, [True, True, True, False]).ece == pytest.approx(0.0)
    assert "ECE = " in calib.markdown()


MICRO_EXPERIMENT = {
    "problems": {"ood": {"n_problems": 3}},
    "experiment": {
        "seeds": [0, 1],
        "taus": [0.0, 0.9],
        "injections": ["output", "input"],
        "fractions": [0.5],
        "validation_limit": 4,
        "test_limit": 4,
        "ood_limit": 3,
        "bootstrap": 200,
    },
    "eval": {"variants": ["predicted", "golden", "random"], "include_base": False},
}


def _experiment(home) -> tuple[Store, object]:
    resolved = load_preset("micro", MICRO_EXPERIMENT)
    store = Store.at(home)
    result = run_data_stages(store, resolved.config, "experiment-micro", log=lambda _: None)
    return store, run_experiment(store, resolved.config, result.run_id, preset="micro", log=lambda _: None)


@pytest.mark.slow
def test_the_experiment_tunes_on_validation_tests_once_compares_items_and_repeats_exactly(tmp_path):
    store, result = _experiment(tmp_path / "a")
    assert result.tau in (0.0, 0.9) and result.injection in ("output", "input")
    assert [t["injection"] for t in result.diagnostics["tuning"]] == ["output", "input"]
    assert set(result.per_seed) >= {"predicted", "golden", "random", "cot_sft"}
    assert all(set(by_seed) == {0, 1} for by_seed in result.per_seed.values())
    # the item is the unit: every comparison pairs the same 4 test items (3 per OOD suite), averaged over both seeds
    primary = result.primary
    assert primary["n_items"] == 4 and primary["n_seeds"] == 2 and 0.0 < primary["p_value"] <= 1.0
    assert math.isclose(primary["difference"], primary["accuracy_a"] - primary["accuracy_b"])
    assert {"heldout:golden-predicted", "heldout:predicted-random"} <= set(result.comparisons)
    for suite in ("ood_longer", "ood_distractor", "ood_shuffled"):
        assert result.comparisons[f"{suite}:predicted-cot_sft"]["n_items"] == 3
    diagnostics = result.diagnostics
    assert diagnostics["step_execution"]["scaffold"]["calculations"] > 0
    assert set(diagnostics["next_signal"]) >= {
        "position_only",
        "position_and_previous",
        "cot_sft_implicit",
        "signal_head",
    }
    assert [p["fraction"] for p in result.efficiency] == [0.5, 1.0]
    half, full = result.efficiency
    assert 0 < half["scaffold_tokens"] < full["scaffold_tokens"] and 0 < half["cot_sft_tokens"] < full["cot_sft_tokens"]

    wh = store.warehouse
    rows = wh.query(
        "SELECT seed, purpose, variant, tau, n FROM experiment_scores WHERE experiment_id = ? ORDER BY ALL",
        [result.experiment_id],
    )
    validation = [r for r in rows if r["purpose"] == "validation"]
    test = [r for r in rows if r["purpose"] == "test"]
    assert {r["variant"] for r in validation} == {"predicted"}
    assert {(r["seed"], r["tau"]) for r in validation} >= {(s, t) for s in (0, 1) for t in (0.0, 0.9)}
    assert {r["tau"] for r in test} == {result.tau}  # test is scored once, with the τ chosen on validation
    assert {(r["seed"], r["variant"]) for r in test} == {
        (s, v) for s in (0, 1) for v in ("predicted", "golden", "random", "cot_sft")
    }
    assert all(r["n"] == 4 for r in test)
    assert {r["purpose"] for r in rows} >= {"ood_longer", "ood_distractor", "ood_shuffled", "fraction-0.5"}

    client = registry.client(store.registry)
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.experiment_id = '{result.experiment_id}' AND tags.kind = 'experiment'",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [parents[0].info.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    # two injections tuned (the chosen one is the first seed's student), the other seed's scaffold, two baselines,
    # and both arms at half the data
    assert len(children) == 2 + 1 + 2 + 2
    assert "report.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    report = (tmp_path / "a" / "artifacts" / "experiments" / result.experiment_id / "report.md").read_text()
    assert "the item as the unit" in report and "McNemar" in report and "step execution" in report
    assert "Decision rule: " in report

    # the same configuration on a fresh instance: the same numbers
    _, again = _experiment(tmp_path / "b")
    assert (again.tau, again.injection) == (result.tau, result.injection)
    assert again.per_seed == result.per_seed
    assert again.comparisons == result.comparisons
