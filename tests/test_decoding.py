"""Scaffolded decoding and the end-to-end evaluation on a tiny real model: τ and the guards, the four variants,
KV cache and batching equal to a plain recomputation, and a student that memorised one trace writes it back."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError

from scaffold_lib.data.signals import ANSWER_SIGNAL, CONCLUSION_SIGNAL, SIGNAL_INDEX, SIGNALS
from scaffold_lib.evaluation.config import DecodeConfig, EvalConfig
from scaffold_lib.evaluation.decoding import STEP_SIGNALS, ScaffoldDecoder, plain_generate
from scaffold_lib.evaluation.metrics import evaluate_plain, evaluate_scaffold, next_signal_accuracy, suite_run
from scaffold_lib.evaluation.suites import EvalItem
from scaffold_lib.student.config import PackConfig, TrainConfig
from scaffold_lib.student.examples import STEP_SEPARATOR
from scaffold_lib.student.model import ScaffoldStudent
from scaffold_lib.student.shards import load_rows, pack_rows, write_shards
from scaffold_lib.student.training import train
from student_kit import TinyWorld, sharpen, tiny_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> TinyWorld:
    return tiny_world(tmp_path_factory)


def biased(model: ScaffoldStudent, signal: str, strength: float = 10.0) -> ScaffoldStudent:
    """Make the signal head always predict `signal` with confidence e^s / (e^s + 6) (0.99973 for s = 10)."""
    with torch.no_grad():
        model.signal_head.weight.zero_()
        model.signal_head.bias.zero_()
        model.signal_head.bias[SIGNAL_INDEX[signal]] = strength
    return model.eval()


@pytest.fixture(scope="module")
def untrained(world) -> ScaffoldStudent:
    """Random backbone, head fixed on reasoning_analysis: decoding control flow is then fully predictable."""
    return biased(world.student(), "reasoning_analysis")


@pytest.fixture(scope="module")
def sharp(world) -> ScaffoldStudent:
    """A sensitive random student (`sharpen`) biased towards one signal."""
    return biased(sharpen(world.student(seed=1)), "reasoning_analysis")


def memorise(world: TinyWorld, kind: str, steps: int = 150) -> ScaffoldStudent:
    """Overfit one trace (the first): afterwards greedy decoding must write it back token for token."""
    ex = (world.scaffold_examples if kind == "scaffold" else world.baseline_examples)[0]
    pc = PackConfig(row_len=len(ex))
    rows, _ = pack_rows([ex], pc)
    infos, _ = write_shards(rows, world.root / f"memorise-{kind}", kind, "h", pc)
    model = world.student(kind=kind)
    result = train(
        model,
        load_rows([i.path for i in infos]),
        TrainConfig(kind=kind, max_steps=steps, batch_size=1, warmup_steps=0, learning_rate=1e-2, weight_decay=0.0),
        progress=False,
    )
    assert result.token_losses[-1] < 0.1
    return model.eval()


@pytest.fixture(scope="module")
def memorised(world) -> ScaffoldStudent:
    return memorise(world, "scaffold")


def question(world: TinyWorld, i: int = 0) -> str:
    return world.traces[i].question


def reference_decode(
    model: ScaffoldStudent, world: TinyWorld, q: str, signals: list[str], max_step_tokens: int, max_answer_tokens: int
) -> tuple[list[str], str]:
    """Greedy decoding with a fixed signal sequence and no cache: every token recomputes the whole context."""
    fmt, tok = world.fmt, world.tokenizer
    ids, steps = list(fmt.question_ids(q)), []
    for sig in signals:
        ids += fmt.tag_ids[sig]
        out: list[int] = []
        limit = max_answer_tokens if sig == ANSWER_SIGNAL else max_step_tokens
        with torch.no_grad():
            while len(out) < limit:
                h = model.hidden_states(torch.tensor([ids]))[0, -1]
                t = int(model.token_logits(h[None], torch.tensor([SIGNAL_INDEX[sig]]))[0].argmax())
                out.append(t)
                ids.append(t)
                if t == fmt.eos_id or tok.decode(out[-4:]).endswith(STEP_SEPARATOR):
                    break
        text = tok.decode(out, skip_special_tokens=True).strip()
        if sig == ANSWER_SIGNAL:
            return steps, text
        steps.append(text)
    raise AssertionError("signals must end with the answer")


# --- τ and the guards -------------------------------------------------------------------------------------


def test_impossible_tau_answers_at_once(world, untrained):
    with pytest.raises(ValidationError):
        DecodeConfig(tau=1.01)
    # confidence is 0.99973 < 1.0: the very first signal falls below τ, so the student answers right away
    dec = ScaffoldDecoder(untrained, world.tokenizer, DecodeConfig(tau=1.0, max_answer_tokens=5))
    gen = dec.generate(question(world))
    assert gen.steps == [] and gen.stopped_by == "tau"
    assert 1 <= gen.new_tokens <= 5


def test_confident_steps_until_max_steps(world, untrained):
    dec = ScaffoldDecoder(
        untrained, world.tokenizer, DecodeConfig(tau=0.96, max_steps=2, max_step_tokens=4, max_answer_tokens=3)
    )
    gen = dec.generate(question(world))
    assert gen.stopped_by == "max_steps" and len(gen.steps) == 2
    assert [s.signal for s in gen.steps] == ["reasoning_analysis"] * 2
    assert all(s.confidence == pytest.approx(0.99973, abs=1e-4) for s in gen.steps)
    assert gen.new_tokens <= 2 * 4 + 3
    gen0 = ScaffoldDecoder(untrained, world.tokenizer, DecodeConfig(tau=0.0, max_steps=0)).generate(question(world))
    assert gen0.steps == [] and gen0.stopped_by == "max_steps"


@pytest.mark.parametrize("max_tokens", [1, 5, 9, 10, 11, 12, 13])
def test_max_tokens_is_never_exceeded(world, untrained, max_tokens):
    dec = ScaffoldDecoder(
        untrained,
        world.tokenizer,
        DecodeConfig(tau=0.0, max_steps=50, max_step_tokens=4, max_answer_tokens=5, max_tokens=max_tokens),
    )
    gen = dec.generate(question(world))
    assert 1 <= gen.new_tokens <= max_tokens
    assert gen.stopped_by == "max_tokens"


def test_answer_signal_stops_the_loop(world):
    model = biased(world.student(), ANSWER_SIGNAL)
    gen = ScaffoldDecoder(model, world.tokenizer, DecodeConfig(tau=0.5, max_answer_tokens=4)).generate(question(world))
    assert gen.steps == [] and gen.stopped_by == "answer" and gen.new_tokens <= 4


# --- variants ---------------------------------------------------------------------------------------------


def test_golden_follows_the_given_signals_then_answers(world, untrained):
    golden = ["opinion_recall", "contrast_concession", "examples_illustration", ANSWER_SIGNAL]
    dec = ScaffoldDecoder(untrained, world.tokenizer, DecodeConfig(max_step_tokens=3, max_answer_tokens=3))
    gen = dec.generate(question(world), "golden", golden)
    assert [s.signal for s in gen.steps] == golden[:-1]
    assert all(s.confidence is None for s in gen.steps)  # imposed, not predicted
    assert gen.stopped_by == "answer"
    # a golden sequence without its answer signal still ends with an answer
    gen2 = dec.generate(question(world), "golden", golden[:2])
    assert [s.signal for s in gen2.steps] == golden[:2] and gen2.stopped_by == "answer"
    with pytest.raises(ValueError, match="golden"):
        dec.generate(question(world), "golden")


def test_random_variant_draws_step_signals(world, untrained):
    dec = ScaffoldDecoder(
        untrained, world.tokenizer, DecodeConfig(tau=0.5, max_steps=8, max_step_tokens=2, max_answer_tokens=2)
    )
    gen = dec.generate(question(world), "random", rng=random.Random(0))
    signals = [s.signal for s in gen.steps]
    assert len(signals) == 8 and set(signals) <= set(STEP_SIGNALS) and ANSWER_SIGNAL not in signals
    assert len(set(signals)) > 1  # not just the head's constant prediction
    assert all(s.confidence is None for s in gen.steps)
    again = dec.generate(question(world), "random", rng=random.Random(0))
    assert [s.signal for s in again.steps] == signals  # seeded


def test_summaries_only_prunes_non_conclusion_steps(world, memorised):
    q = question(world)
    cfg = DecodeConfig(tau=0.0, max_steps=10, max_step_tokens=40, max_tokens=400)
    predicted = ScaffoldDecoder(memorised, world.tokenizer, cfg).generate(q, "predicted")
    pruned = ScaffoldDecoder(memorised, world.tokenizer, cfg).generate(q, "summaries_only")
    assert pruned.steps and pruned.stopped_by
    # the first two steps are written before anything is pruned; after that the context lacks step 1
    assert [s.text for s in pruned.steps[:2]] == [s.text for s in predicted.steps[:2]]
    assert [(s.signal, s.text) for s in pruned.steps] != [(s.signal, s.text) for s in predicted.steps]
    # when every step is a conclusion nothing is pruned: summaries-only is then exactly the predicted variant
    model = biased(world.student(), CONCLUSION_SIGNAL)
    small = DecodeConfig(tau=0.5, max_steps=4, max_step_tokens=5, max_answer_tokens=3)
    a = ScaffoldDecoder(model, world.tokenizer, small).generate(q, "predicted")
    b = ScaffoldDecoder(model, world.tokenizer, small).generate(q, "summaries_only")
    assert [s.text for s in a.steps] == [s.text for s in b.steps] and a.answer_text == b.answer_text


# --- the cache and the batch do not change what greedy decoding writes ----------------------------------


def test_kv_cache_and_batching_match_recomputation(world, sharp):
    cfg = DecodeConfig(max_step_tokens=5, max_answer_tokens=4)
    dec = ScaffoldDecoder(sharp, world.tokenizer, cfg)
    goldens = [
        ["reasoning_analysis", "addition_elaboration", ANSWER_SIGNAL],
        ["contrast_concession", "conclusion_summary", "opinion_recall", ANSWER_SIGNAL],
        ["examples_illustration", ANSWER_SIGNAL],
    ]
    qs = [question(world, i) for i in (0, 1, 2)]
    assert len({len(world.fmt.question_ids(q)) for q in qs}) > 1  # left padding is exercised
    batch = dec.generate_batch(qs, "golden", goldens)
    for q, g, gen in zip(qs, goldens, batch):
        steps, answer = reference_decode(sharp, world, q, g, cfg.max_step_tokens, cfg.max_answer_tokens)
        assert [s.text for s in gen.steps] == steps
        assert gen.answer_text == answer
        single = dec.generate(q, "golden", g)
        assert [s.text for s in single.steps] == steps and single.answer_text == answer
    # predicted signals: a batch writes what each question alone writes
    pcfg = DecodeConfig(tau=0.0, max_steps=3, max_step_tokens=4, max_answer_tokens=3)
    pdec = ScaffoldDecoder(sharp, world.tokenizer, pcfg)
    together = pdec.generate_batch(qs, "predicted")
    for q, gen in zip(qs, together):
        alone = pdec.generate(q, "predicted")
        assert [(s.signal, s.text) for s in gen.steps] == [(s.signal, s.text) for s in alone.steps]
        assert gen.answer_text == alone.answer_text and gen.new_tokens == alone.new_tokens


# --- a student that memorised one trace writes it back ------------------------------------------------


def test_memorised_trace_is_reproduced(world, memorised):
    trace = world.traces[0]
    dec = ScaffoldDecoder(memorised, world.tokenizer, DecodeConfig(tau=0.0, max_step_tokens=64, max_tokens=600))
    for variant in ("golden", "predicted"):
        gen = dec.generate(trace.question, variant, trace.signals)
        assert [s.text for s in gen.steps] == trace.steps[:-1], variant
        assert [s.signal for s in gen.steps] == trace.signals[:-1], variant
        assert gen.answer_text == trace.steps[-1] and gen.answer == trace.answer
        assert gen.stopped_by == "answer"
    acc = next_signal_accuracy(
        memorised,
        world.fmt,
        [EvalItem("d0", trace.question, trace.answer, "number", trace.signals, trace.steps)],
        tau=0.5,
    )
    assert acc["next_signal_acc"] == 1.0 and acc["boundaries"] == len(trace.steps)


def test_memorised_baseline_is_reproduced(world):
    model = memorise(world, "baseline")
    trace = world.traces[0]
    gen = plain_generate(model, world.tokenizer, trace.question, max_new_tokens=600)
    assert gen.stopped_by == "eos"
    assert [s.text for s in gen.steps] == trace.steps[:-1]
    assert gen.answer_text == trace.steps[-1] and gen.answer == trace.answer
    short = plain_generate(model, world.tokenizer, trace.question, max_new_tokens=7)
    assert short.new_tokens == 7 and short.stopped_by == "max_tokens"


def test_next_signal_accuracy_of_a_constant_head(world):
    model = biased(world.student(), "reasoning_analysis")
    items = [EvalItem(t.trace_id, t.question, t.answer, "number", t.signals, t.steps) for t in world.traces[:8]]
    targets = [s for t in world.traces[:8] for s in t.signals]
    share = targets.count("reasoning_analysis") / len(targets)
    acc = next_signal_accuracy(model, world.fmt, items, tau=0.96)
    assert acc["boundaries"] == len(targets)
    assert acc["next_signal_acc"] == pytest.approx(share) and acc["next_signal_acc_at_tau"] == pytest.approx(share)
    assert acc["coverage_at_tau"] == 1.0
    none = next_signal_accuracy(model, world.fmt, items, tau=1.0)
    assert none["coverage_at_tau"] == 0.0 and none["next_signal_acc_at_tau"] is None


# --- evaluation end to end ----------------------------------------------------------------------------------


def test_evaluate_scaffold_and_baseline(world, memorised):
    t0, t1, t2 = world.traces[:3]
    items = [
        EvalItem("d0", t0.question, t0.answer, "number", t0.signals, t0.steps),
        EvalItem("d1", t1.question, t1.answer, "number", t1.signals, t1.steps),
        EvalItem("d2", t2.question, t2.answer),
    ]  # no teacher trace: no golden signals
    cfg = EvalConfig(decode=DecodeConfig(tau=0.0, max_steps=16, max_step_tokens=48, max_tokens=320), batch_size=2)
    rows, records = evaluate_scaffold(memorised, world.fmt, items, suite_run(cfg, "heldout"), progress=False)
    by_variant = {r.variant: r for r in rows}
    assert list(by_variant) == ["predicted", "golden", "random", "summaries_only"]
    assert by_variant["golden"].n == 2 and by_variant["predicted"].n == 3
    assert len(records) == sum(r.n for r in rows)
    for variant in ("golden", "predicted"):  # the memorised item is answered right
        rec = next(r for r in records if r.variant == variant and r.doc_id == "d0")
        assert rec.correct and rec.extracted == t0.answer and rec.signals == t0.signals[:-1]
        assert by_variant[variant].accuracy >= 1 / by_variant[variant].n
        assert by_variant[variant].signal_fidelity is not None
    assert len({r.eval_config_hash for r in rows}) == 1  # one evaluation, one config: its rows compare
    for r in rows:
        assert 0 <= r.ci_low <= r.accuracy <= r.ci_high <= 1
        # teacher forced over d0 and d1: at least every boundary of the memorised trace d0 is right
        assert r.next_signal_acc >= len(t0.signals) / (len(t0.signals) + len(t1.signals))
    limited, _ = evaluate_scaffold(
        memorised,
        world.fmt,
        items[:1],
        suite_run(cfg.model_copy(update={"variants": ["golden"]}), "heldout"),
        progress=False,
    )
    assert [(r.variant, r.n) for r in limited] == [("golden", 1)]
    with pytest.raises(ValueError, match="unknown variant"):
        evaluate_scaffold(
            memorised,
            world.fmt,
            items,
            suite_run(cfg.model_copy(update={"variants": ["nope"]}), "heldout"),
            progress=False,
        )

    base_rows, base_records = evaluate_plain(
        world.student(kind="baseline").eval(),
        world.fmt,
        items,
        suite_run(cfg.model_copy(update={"decode": DecodeConfig(max_tokens=12)}), "heldout"),
        progress=False,
    )
    assert len(base_rows) == 1 and base_rows[0].variant == "cot_sft" and base_rows[0].n == 3
    assert base_rows[0].signal_fidelity is None and base_rows[0].answer_consistency is None
    assert len(base_records) == 3 and all(r.variant == "cot_sft" for r in base_records)
    assert set(SIGNALS) >= {s for r in records for s in r.signals}


def test_random_variant_does_not_depend_on_batch_size(world, untrained):
    """The eval-config hash leaves the batch size out, so no variant's output may depend on it (random included)."""
    dec = ScaffoldDecoder(
        untrained, world.tokenizer, DecodeConfig(tau=0.5, max_steps=4, max_step_tokens=2, max_answer_tokens=2)
    )
    qs = [question(world, i) for i in range(4)]
    rng = random.Random(7)
    together = dec.generate_batch(qs, "random", rng=rng)
    rng = random.Random(7)
    pairs = dec.generate_batch(qs[:2], "random", rng=rng) + dec.generate_batch(qs[2:], "random", rng=rng)
    rng = random.Random(7)
    alone = [dec.generate(q, "random", rng=rng) for q in qs]
    signals = [[s.signal for s in g.steps] for g in together]
    assert [[s.signal for s in g.steps] for g in pairs] == signals
    assert [[s.signal for s in g.steps] for g in alone] == signals
