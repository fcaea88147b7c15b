"""The timeline bed: dated facts told out of order and solved day by day, its out-of-distribution suites drawn from
test skeletons only, wrong calculations kept off the training target, and the bed's diagnostics (step execution,
next-signal predictors, token loss per class) on models whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from scaffold_lib.data.problems import SplitConfig
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import label_steps
from scaffold_lib.data.synthetic import (
    DAYS,
    GeneratorConfig,
    OODConfig,
    generate_problems,
    ood_problems,
    parse_question,
    skeleton_of,
    solve,
)
from scaffold_lib.data.teachers import ProgrammaticTeacher, ProgrammaticTeacherConfig
from scaffold_lib.evaluation import bed
from scaffold_lib.evaluation.suites import EvalItem
from scaffold_lib.student.config import TrainConfig
from scaffold_lib.student.examples import false_calculation
from scaffold_lib.student.token_classes import DIGIT, TAG, TEXT, token_loss_by_class, vocabulary_classes
from scaffold_lib.student.training import train
from student_kit import TinyWorld, tiny_world

TIMELINE = GeneratorConfig(
    style="timeline", n_problems=300, min_ops=2, max_ops=3, max_number=10, distractor_prob=0.5, max_distractors=1
)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> TinyWorld:
    return tiny_world(tmp_path_factory)


def test_timeline_problems_are_dated_told_out_of_order_and_solved_in_order_of_days():
    problems = generate_problems(TIMELINE)
    out_of_order = 0
    for p in problems:
        parsed = parse_question(p.question)
        assert parsed is not None, p.question
        days = [DAYS.index(s.day) for s in parsed.steps]
        assert days == list(range(days[0], days[0] + len(days)))  # consecutive days, in order once parsed
        assert parsed.steps[0].kind == "start" and str(solve(parsed)) == p.answer
        told = [DAYS.index(d) for d in (s.split(",")[0].removeprefix("On ") for s in p.question.split(". ")[:-1])]
        out_of_order += told != sorted(told)
    assert out_of_order > len(problems) / 3  # one moved fact: most problems, not all, are told out of order
    # the skeleton ignores the telling: a problem and its reordering are the same exercise, in the same split
    p = next(p for p in problems if "A friend" not in p.question)
    sentences = p.question.split(". ")
    reordered = ". ".join(sentences[:-1][::-1] + sentences[-1:])
    assert skeleton_of(reordered) == skeleton_of(p.question) == p.group_id


def test_the_teacher_takes_the_days_in_order_and_every_trace_is_right():
    problems = generate_problems(TIMELINE.model_copy(update={"n_problems": 60}))
    teacher = ProgrammaticTeacher(ProgrammaticTeacherConfig(slip_prob=0, wrong_fraction=0, illustrate_products=True))
    signals_seen = set()
    for trace in teacher.generate(problems).traces:
        assert trace.is_correct
        steps = segment(trace.text)
        days = [d for s in steps for d in DAYS if f"on {d}" in s]
        assert days == sorted(days, key=DAYS.index) and days
        assert not any(false_calculation(s) for s in steps)
        signals_seen |= {label.signal for label in label_steps(steps)}
    # a product is illustrated, a quotient checked, a distractor set aside, a long problem summed up
    assert {"examples_illustration", "opinion_recall", "contrast_concession", "conclusion_summary"} <= signals_seen


def test_ood_suites_come_from_test_skeletons_and_differ_from_training_as_named():
    split = SplitConfig()
    ood = ood_problems(TIMELINE, OODConfig(n_problems=40), split)
    by_suite = {name: [p for p in ood if p.split == name] for name in ("ood_longer", "ood_distractor", "ood_shuffled")}
    train_groups = {p.group_id for p in generate_problems(TIMELINE) if p.split == "train"}
    for name, problems in by_suite.items():
        assert len(problems) == 40, name
        assert not {p.group_id for p in problems} & train_groups, name
        for p in problems:
            assert str(solve(parse_question(p.question))) == p.answer
    ops = [
        sum(s.kind not in ("start", "distractor") for s in parse_question(p.question).steps)
        for p in by_suite["ood_longer"]
    ]
    assert min(ops) > TIMELINE.max_ops
    distractors = [
        sum(s.kind == "distractor" for s in parse_question(p.question).steps) for p in by_suite["ood_distractor"]
    ]
    assert min(distractors) > TIMELINE.max_distractors
    starts_first = [
        parse_question(p.question).steps[0].sentence == p.question.split(". ")[0] + "."
        for p in by_suite["ood_shuffled"]
    ]
    assert sum(starts_first) < len(starts_first) / 2  # in training the start is always told first
    with pytest.raises(ValueError, match="a timeline holds 7 days"):
        GeneratorConfig(style="timeline", max_ops=5, max_distractors=2)


def test_a_false_calculation_is_found_and_masked_out_of_the_loss(world):
    assert false_calculation("So 5 + 3 = 9.") and false_calculation("2 * 3 * 4 = 12")
    assert not false_calculation("So 5 + 3 = 8.") and not false_calculation("10 / 3 = 3.33")
    assert not false_calculation("Wait, 5 + 3 is 8, not 9. Let me fix that.")
    assert not false_calculation("$1,200 x 3 = $3,600") and false_calculation("$1,200 x 3 = $3,500")
    t = world.traces[0]
    fmt = world.fmt
    q_ids = fmt.question_ids(t.question)
    step_ids = [fmt.tokenizer(s, add_special_tokens=False)["input_ids"] for s in t.steps]
    plain = fmt.build(t.trace_id, q_ids, step_ids, t.signals)
    masked = fmt.build(t.trace_id, q_ids, step_ids, t.signals, [i == 1 for i in range(len(t.steps))])
    lost = np.flatnonzero((plain.labels != -100) & (masked.labels == -100))
    # exactly step 1's text and its separator stop being targets; its tag and every other token stay
    start = bed._step_offsets(fmt, len(q_ids), step_ids, t.signals)[1]
    assert lost.tolist() == list(range(start - 1, start + len(step_ids[1]) + len(fmt.sep_ids) - 1))
    assert (masked.signal_targets == plain.signal_targets).all()


def test_token_loss_by_class_separates_digits_tags_and_text(world):
    classes = vocabulary_classes(world.tokenizer, world.tags)
    digits = [i for i in range(len(classes)) if world.tokenizer.decode([i]).strip() in list("0123456789")]
    assert len(digits) == 10 and all(classes[i] == DIGIT for i in digits)
    assert all(classes[ids[0]] == TAG for ids in world.fmt.tag_ids.values())
    assert classes[world.tokenizer.convert_tokens_to_ids("So")] == TEXT
    model = world.student()
    data = world.data_copy("scaffold")
    before = token_loss_by_class(model, data, classes)
    labels = data["labels"][data["labels"] != -100]
    assert before["digit"]["tokens"] == int(np.isin(labels.numpy(), digits).sum())
    assert sum(v["tokens"] for v in before.values()) == len(labels)
    train(model, data, TrainConfig(max_steps=30, batch_size=2, learning_rate=1e-2, warmup_steps=2), progress=False)
    after = token_loss_by_class(model, data, classes)
    assert all(after[c]["loss"] < before[c]["loss"] for c in ("text", "digit", "tag"))
    model.train()
    token_loss_by_class(model, data, classes)
    assert model.training  # measured in eval mode, then left as it was


def test_structure_predictors_and_the_head_on_known_flows():
    flows = [["a", "b", "c"], ["a", "b", "c"], ["a", "b", "c"], ["a", "e", "d"], ["a", "e", "d"]]
    items = [
        EvalItem("x", "q", "1", "number", ["a", "b", "c"], ["s"] * 3),
        EvalItem("y", "q", "1", "number", ["a", "e", "d"], ["s"] * 3),
    ]
    acc = bed.structure_accuracy(flows, items)
    # position: a, b, c -> 3 of 3 on x, 1 of 3 on y; position + previous: after e comes d -> 2 of 3 on y
    assert acc["boundaries"] == 6
    assert acc["position_only"] == pytest.approx(4 / 6)
    assert acc["position_and_previous"] == pytest.approx(5 / 6)


@pytest.mark.slow
def test_step_execution_and_implicit_signals_of_students_that_memorised_their_traces(world):
    from test_decoding import memorise

    t = world.traces[0]
    item = EvalItem("d0", t.question, t.answer, "number", t.signals, t.steps)
    scaffold = memorise(world, "scaffold")
    executed = bed.step_execution(scaffold, world.fmt, [item])
    assert executed["calculations"] == sum(len(bed._CALCULATION.findall(s)) for s in t.steps) > 0
    assert executed["result_exact"] == 1.0 and executed["operands_exact"] == 1.0
    assert bed.head_accuracy(scaffold, world.fmt, [item])["signal_head"] == 1.0
    baseline = memorise(world, "baseline")
    assert bed.step_execution(baseline, world.fmt, [item])["result_exact"] == 1.0
    implicit = bed.implicit_signal_accuracy(baseline, world.fmt, [item])
    assert implicit["boundaries"] == len(t.steps) and implicit["cot_sft_implicit"] == 1.0
    # an untrained student gets the calculations wrong: the measure can fail
    fresh = world.student().eval()
    assert bed.step_execution(fresh, world.fmt, [item])["result_exact"] < 1.0
