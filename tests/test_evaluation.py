"""Scoring on hand-made generations: signal fidelity, answer consistency, Wilson intervals, the eval-config hash
and the score table. No model needed."""

from __future__ import annotations

import math

import pytest

from scaffold_lib.evaluation.config import DecodeConfig, EvalConfig
from scaffold_lib.evaluation.decoding import GeneratedStep, Generation
from scaffold_lib.evaluation.metrics import (
    IncomparableScores,
    ScoreRow,
    answer_consistency,
    comparison_table_markdown,
    score,
    score_table_markdown,
    signal_fidelity,
    suite_run,
    wilson_interval,
)
from scaffold_lib.evaluation.suites import EvalItem


def eval_config_hash(cfg: EvalConfig, suite: str = "heldout", budget: dict | None = None) -> str:
    return suite_run(cfg, suite, budget).config_hash


def gen(*steps: tuple[str, str], answer: str | None = None, answer_text: str = "") -> Generation:
    return Generation([GeneratedStep(sig, text, None) for sig, text in steps], answer_text, answer)


# --- signal fidelity ---------------------------------------------------------------------------------------


def test_signal_fidelity_compares_labeller_with_conditioning_signal():
    faithful = gen(("contrast_concession", "However, the distractor does not matter."))
    unfaithful = gen(("addition_elaboration", "However, the distractor does not matter."))
    assert signal_fidelity([faithful]) == 1.0
    assert signal_fidelity([unfaithful]) == 0.0
    assert signal_fidelity([faithful, unfaithful]) == 0.5
    mixed = gen(
        ("conclusion_summary", "Therefore, Ava has 12 apples."),
        ("reasoning_analysis", "So 3 + 4 = 7."),
        ("examples_illustration", "Wait, that is wrong."),
    )
    assert signal_fidelity([mixed]) == pytest.approx(2 / 3)
    # steps, not generations, are the unit: 3 of 4 steps faithful
    assert signal_fidelity([mixed, faithful]) == pytest.approx(3 / 4)


def test_signal_fidelity_counts_unlabelled_steps_against_their_fallback():
    # no opening keyword: the labeller's fallback (reasoning_analysis) is what the step is compared with
    assert signal_fidelity([gen(("reasoning_analysis", "17 apples in all."))]) == 1.0
    assert signal_fidelity([gen(("opinion_recall", "17 apples in all."))]) == 0.0


def test_signal_fidelity_without_steps_is_none():
    assert signal_fidelity([]) is None
    assert signal_fidelity([gen(answer="3"), Generation()]) is None


# --- answer consistency ------------------------------------------------------------------------------------


def test_answer_consistency_uses_last_number_of_last_conclusion():
    consistent = gen(
        ("reasoning_analysis", "So 3 + 4 = 7."), ("conclusion_summary", "Therefore, 7 * 2 = 14 apples."), answer="14"
    )
    inconsistent = gen(("conclusion_summary", "Thus the count is 14."), answer="15")
    # the last conclusion counts, not an earlier one
    later = gen(
        ("conclusion_summary", "Thus it is 9."),
        ("reasoning_analysis", "Wait, 9 + 1 = 10."),
        ("conclusion_summary", "Therefore, Ava has 1,000 coins."),
        answer="1000",
    )
    assert answer_consistency([consistent]) == 1.0
    assert answer_consistency([inconsistent]) == 0.0
    assert answer_consistency([later]) == 1.0
    assert answer_consistency([consistent, inconsistent, later]) == pytest.approx(2 / 3)


def test_answer_consistency_skips_what_it_cannot_check():
    no_conclusion = gen(("reasoning_analysis", "So 3 + 4 = 7."), answer="7")
    no_answer = gen(("conclusion_summary", "Thus the count is 7."), answer=None)
    no_number = gen(("conclusion_summary", "Thus we are done."), answer="7")
    assert answer_consistency([no_conclusion, no_answer, no_number]) is None
    assert answer_consistency([no_conclusion, gen(("conclusion_summary", "Thus 7."), answer="7.0")]) == 1.0


# --- Wilson interval ---------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    # Wikipedia-style check: 81 of 263, z = 1.96 -> (0.2553, 0.3662)
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 7), (50, 100), (99, 100)])
def test_wilson_interval_contains_the_rate_and_narrows_with_n(k, n):
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo10, hi10 = wilson_interval(10 * k, 10 * n)
    assert hi10 - lo10 < hi - lo
    # symmetric in successes and failures
    flo, fhi = wilson_interval(n - k, n)
    assert flo == pytest.approx(1 - hi) and fhi == pytest.approx(1 - lo)
    assert math.isfinite(lo) and math.isfinite(hi)


# --- eval-config hash and score table ---------------------------------------------------------------------


def test_eval_config_hash_tracks_what_makes_scores_comparable():
    base = EvalConfig()
    h = eval_config_hash(base)
    assert eval_config_hash(EvalConfig()) == h  # stable
    assert eval_config_hash(base.model_copy(update={"batch_size": 3})) == h  # speed knob only
    assert eval_config_hash(base.model_copy(update={"variants": ["golden"]})) == h  # variants are the table's rows
    for change in ({"tau": 0.5}, {"max_steps": 3}, {"max_tokens": 64}, {"max_step_tokens": 8}):
        other = base.model_copy(update={"decode": DecodeConfig(**change)})
        assert eval_config_hash(other) != h, change
    assert eval_config_hash(base, "gsm8k") != h
    assert eval_config_hash(base.model_copy(update={"split": "validation"})) != h  # tuning scores are not test scores
    assert eval_config_hash(base.model_copy(update={"limit": 10})) != h
    # caps left to the data are resolved from the training budget, and the hash names the resolved caps
    budget = {"step_tokens_p99": 40, "answer_tokens_p99": 20, "reply_tokens_p99": 300, "steps_p99": 9}
    assert eval_config_hash(base, budget=budget) != h
    run = suite_run(base, "heldout", budget)
    assert (run.decode.max_step_tokens, run.decode.max_answer_tokens, run.decode.max_tokens, run.decode.max_steps) == (
        50,
        25,
        375,
        12,
    )
    pinned = base.model_copy(update={"decode": DecodeConfig(max_tokens=100)})
    assert suite_run(pinned, "heldout", budget).decode.max_tokens == 100  # a cap set by hand is kept


def test_score_rows_and_table():
    cfg = EvalConfig()
    run = suite_run(cfg, "heldout")
    items = [EvalItem(f"d{i}", f"q{i}", str(i)) for i in range(4)]
    gens = [
        gen(("conclusion_summary", "Therefore, it is 0."), answer="0", answer_text="The answer is 0."),
        gen(("reasoning_analysis", "So it is 1."), answer="1"),
        gen(answer="5"),
        gen(answer=None),
    ]
    row, records = score(run, "predicted", items, gens, next_acc=0.8)
    assert (row.n, row.accuracy) == (4, 0.5)
    assert (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(2, 4))
    assert row.signal_fidelity == 1.0 and row.answer_consistency == 1.0 and row.mean_steps == 0.5
    assert row.eval_config_hash == run.config_hash and row.next_signal_acc == 0.8
    assert (row.benchmark, row.split) == ("heldout", "test")
    assert [r.correct for r in records] == [True, True, False, False]
    assert records[0].response == "Therefore, it is 0.\n\nThe answer is 0."
    assert records[0].signals == ["conclusion_summary"]
    base_row, _ = score(run, "cot_sft", items, gens, None)
    assert base_row.signal_fidelity is None and base_row.answer_consistency is None

    table = score_table_markdown([{**row.as_row(), "model": "scaffold-student/3"}, base_row.as_row()])
    lines = table.splitlines()
    assert lines[0].startswith("| model | suite | variant | n | Pass@1")
    assert len(lines) == 4
    assert lines[2] == (
        "| scaffold-student/3 | heldout (test) | predicted | 4 | 50.0 % (15–85) | 80.0 % | 100.0 % | 100.0 % | 0.5 |"
    )
    assert lines[3] == "|  | heldout (test) | cot_sft | 4 | 50.0 % (15–85) | – | – | – | 0.5 |"
    assert isinstance(row, ScoreRow)


def _score_row(benchmark: str, variant: str, k: int, n: int, config_hash: str = "h1") -> dict:
    lo, hi = wilson_interval(k, n)
    return {
        "benchmark": benchmark,
        "variant": variant,
        "n": n,
        "accuracy": k / n,
        "ci_low": lo,
        "ci_high": hi,
        "eval_config_hash": config_hash,
    }


def test_comparison_table_has_a_row_per_variant_and_a_column_per_suite():
    rows = [
        _score_row("gsm8k", "predicted", 30, 100),
        _score_row("gsm8k", "cot_sft", 25, 100),
        _score_row("gsm8k", "base", 2, 100),
        _score_row("csqa", "predicted", 40, 50, "h2"),
        _score_row("csqa", "golden", 10, 20, "h2"),
    ]
    lines = comparison_table_markdown(rows).splitlines()
    assert lines[0] == "| variant | csqa | gsm8k |"
    # rows in the paper's order; a variant missing for a suite is a dash (golden needs traces of the eval set)
    assert [line.split(" |")[0] for line in lines[2:6]] == ["| base", "| cot_sft", "| golden", "| predicted"]
    assert lines[3] == "| cot_sft | – | 25.0 % (n=100, 18–34) |"
    assert lines[5] == "| predicted | 80.0 % (n=50, 67–89) | 30.0 % (n=100, 22–40) |"
    assert lines[-1] == "Pass@1 (n, 95 % Wilson interval); eval config csqa: h2, gsm8k: h1"


def test_comparison_table_refuses_mixed_eval_configs_in_one_column():
    rows = [_score_row("gsm8k", "predicted", 30, 100, "h1"), _score_row("gsm8k", "cot_sft", 25, 100, "h9")]
    with pytest.raises(IncomparableScores, match=r"gsm8k: scores with different eval configs \['h1', 'h9'\]"):
        comparison_table_markdown(rows)
