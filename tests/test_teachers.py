"""The programmatic teacher (varied, deterministic, wrong on purpose at the configured rate, failures recorded)
and answer extraction."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from scaffold_lib.data.problems import Problem
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher, ProgrammaticTeacherConfig
from support.stages import FOREIGN

CORRECTIONS = ("Wait", "Actually", "But that is not right")


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return generate_problems(GeneratorConfig(n_problems=300, seed=0))


def teach(problems, **cfg):
    return ProgrammaticTeacher(ProgrammaticTeacherConfig(**cfg)).generate(problems)


def final_number(text: str) -> str:
    """The number the last step of a trace states (independent of answers.py)."""
    last = segment(text)[-1]
    return re.findall(r"-?\d+", last)[-1]


def test_v1_traces_vary(problems):
    result = teach(problems, style="v1", signal_noise=0.15)
    assert len(result.traces) == len(problems) and not result.failures
    texts = [t.text for t in result.traces]
    assert len(set(texts)) == len(texts)
    openings = Counter(segment(t)[0].split()[0] for t in texts)
    assert len(openings) >= 4  # not one template for the first step
    assert max(openings.values()) < 0.5 * len(texts)
    # the opening words of the steps form many different "shapes" across traces
    shapes = {tuple(step.split()[0].strip(",:*").lower() for step in segment(t)) for t in texts}
    assert len(shapes) > 0.5 * len(texts)
    step_openers = Counter(step.split()[0].strip(",:*").lower() for t in texts for step in segment(t))
    assert len(step_openers) >= 20
    finals = Counter(re.sub(r"-?\d+", "N", segment(t)[-1]) for t in texts)
    assert len(finals) >= 3
    # traces are multi-step, R1-like
    lengths = [len(segment(t)) for t in texts]
    assert min(lengths) >= 4 and max(lengths) >= 8


def test_deterministic_for_a_seed(problems):
    a, b = teach(problems[:80], seed=3), teach(problems[:80], seed=3)
    assert [t.as_row() for t in a.traces] == [t.as_row() for t in b.traces]
    c = teach(problems[:80], seed=4)
    differ = sum(x.text != y.text for x, y in zip(a.traces, c.traces))
    assert differ > 60


def test_trace_of_a_problem_does_not_depend_on_its_batch(problems):
    alone = teach([problems[17]]).traces[0]
    in_batch = teach(problems[:40]).traces[17]
    assert alone == in_batch


@pytest.mark.parametrize("wrong_fraction", [0.2, 0.5])
@pytest.mark.parametrize("style", ["flow", "v1"])
def test_roughly_wrong_fraction_of_traces_are_incorrect(problems, wrong_fraction, style):
    traces = teach(problems, style=style, wrong_fraction=wrong_fraction, mistake_prob=0.0, slip_prob=0.0).traces
    gold = {p.problem_id: p.answer for p in problems}
    wrong = [t for t in traces if not t.is_correct]
    share = len(wrong) / len(traces)
    # a slip can vanish again through a later integer division, so the share may be a little lower
    assert wrong_fraction - 0.1 < share < wrong_fraction + 0.06, share
    for t in wrong:
        assert t.final_answer is not None and t.final_answer != gold[t.problem_id]
        assert final_number(t.text) == t.final_answer
    for t in traces:
        if t.is_correct:
            assert t.final_answer == gold[t.problem_id] == final_number(t.text)


def test_wrong_fraction_zero_gives_all_correct(problems):
    traces = teach(problems, wrong_fraction=0.0).traces
    gold = {p.problem_id: p.answer for p in problems}
    assert all(t.is_correct for t in traces)
    assert all(t.final_answer == gold[t.problem_id] == final_number(t.text) for t in traces)


def test_v1_corrected_mistakes_still_end_correct(problems):
    traces = teach(problems[:150], style="v1", wrong_fraction=0.0, mistake_prob=1.0).traces
    gold = {p.problem_id: p.answer for p in problems}
    corrected = [t for t in traces if any(step.startswith(CORRECTIONS) for step in segment(t.text))]
    assert len(corrected) == len(traces)  # every trace has one corrected slip
    kinds = Counter(next(c for c in CORRECTIONS for s in segment(t.text) if s.startswith(c)) for t in corrected)
    assert set(kinds) == set(CORRECTIONS)
    for t in corrected:
        assert t.is_correct and t.final_answer == gold[t.problem_id]


def test_no_mistakes_when_disabled(problems):
    traces = teach(problems[:100], style="v1", wrong_fraction=0.0, mistake_prob=0.0).traces
    traces += teach(problems[:100], wrong_fraction=0.0, slip_prob=0.0).traces
    assert not any(
        step.startswith(CORRECTIONS[2]) or step.startswith("Actually") for t in traces for step in segment(t.text)
    )


def test_trace_ids(problems):
    p, q = problems[0], problems[1]
    base = ProgrammaticTeacher()
    assert base.trace_id_for(p) == ProgrammaticTeacher().trace_id_for(p)
    assert base.trace_id_for(p) != base.trace_id_for(q)
    assert base.trace_id_for(p) != base.trace_id_for(p, sample=1)
    for change in ({"seed": 1}, {"wrong_fraction": 0.3}, {"mistake_prob": 0.5}, {"elaboration_prob": 0.1}):
        other = ProgrammaticTeacher(ProgrammaticTeacherConfig(**change))
        assert other.trace_id_for(p) != base.trace_id_for(p), change
    trace = base.generate([p]).traces[0]
    assert trace.trace_id == base.trace_id_for(p)
    assert trace.problem_id == p.problem_id and trace.teacher == base.identity
    assert trace.prompt_tokens > len(p.question.split()) and trace.completion_tokens == len(trace.text.split())


def test_non_synthetic_problem_is_a_failure_record(problems):
    teacher = ProgrammaticTeacher()
    result = teacher.generate([problems[0], FOREIGN, problems[1]])
    assert [t.problem_id for t in result.traces] == [problems[0].problem_id, problems[1].problem_id]
    assert len(result.failures) == 1
    failure = result.failures[0]
    assert failure.problem_id == FOREIGN.problem_id
    assert failure.trace_id == teacher.trace_id_for(FOREIGN)
    assert "synthetic" in failure.error
    assert set(failure.as_row()) == {"trace_id", "problem_id", "teacher", "error"}


# --- the flow style: the next step depends on the state of the solution -------------------------------------

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")
APPLY = {"+": lambda a, n: a + n, "-": lambda a, n: a - n, "*": lambda a, n: a * n, "/": lambda a, n: a // n}


def test_flow_a_wait_step_follows_exactly_the_wrong_steps(problems):
    traces = teach(problems, wrong_fraction=0.0, slip_prob=0.3).traces
    waits = slips = 0
    for t in traces:
        steps = segment(t.text)
        for before, after in zip(steps, steps[1:]):
            eq = EQUATION.search(before)
            wrong = (
                eq is not None
                and not before.startswith(("Wait", "Hmm"))
                and APPLY[eq[2]](int(eq[1]), int(eq[3])) != int(eq[4])
            )
            assert wrong == after.startswith("Wait"), (before, after)
            waits += after.startswith("Wait")
            slips += wrong
        assert t.is_correct
    assert waits == slips > 50


def test_flow_checks_products_and_quotients_and_summarises_long_problems():
    long = generate_problems(GeneratorConfig(n_problems=200, seed=3, min_ops=4, max_ops=4))
    for t in teach(long, wrong_fraction=0.0, slip_prob=0.0).traces:
        steps = segment(t.text)
        for before, after in zip(steps, steps[1:]):
            if EQUATION.search(before) and EQUATION.search(before)[2] in "*/" and not before.startswith("Hmm"):
                assert after.startswith("Hmm, let me check"), (before, after)
        ops = sum(1 for s in steps if EQUATION.search(s) and not s.startswith(("Hmm", "Wait")))
        assert ops == 4 and sum(s.startswith("So far") for s in steps) == 1  # after operation 2 of 4


def test_flow_signals_follow_the_problem_not_chance(problems):
    """With no random flips, the signal of every step is decided by the solution: an addition step elaborates, the
    other operations are analysis, a distractor is a contrast, a check is an opinion, a summary a conclusion."""
    from scaffold_lib.data.signals import label_steps

    for t in teach(problems, wrong_fraction=0.0, slip_prob=0.0).traces:
        steps = segment(t.text)
        for step, label in zip(steps[1:-2], label_steps(steps)[1:-2]):
            eq = EQUATION.search(step)
            if step.startswith(("But", "However")):
                expected = "contrast_concession"
            elif step.startswith("Hmm"):
                expected = "opinion_recall"
            elif step.startswith("So far"):
                expected = "conclusion_summary"
            else:
                expected = "addition_elaboration" if eq and eq[2] == "+" else "reasoning_analysis"
            assert label.signal == expected, (step, label)
