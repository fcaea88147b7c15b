"""Where the signal embedding is added (`student.signal_injection`): input injection conditions every layer on the
step's own signal without showing the signal head its target, decodes with the KV cache exactly as a recomputation
does, trains every parameter, and is kept with the saved student."""

from __future__ import annotations

import pytest
import torch

from scaffold_lib.data.signals import ANSWER_SIGNAL, SIGNAL_INDEX
from scaffold_lib.evaluation.config import DecodeConfig
from scaffold_lib.evaluation.decoding import ScaffoldDecoder
from scaffold_lib.student.config import StudentConfig, TrainConfig
from scaffold_lib.student.model import NO_SIGNAL, ScaffoldStudent, StudentLoadError, input_signal_ids
from scaffold_lib.student.training import train
from student_kit import TinyWorld, sharpen, tiny_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> TinyWorld:
    return tiny_world(tmp_path_factory)


def student(world: TinyWorld, injection: str, seed: int = 1) -> ScaffoldStudent:
    """A fresh student whose signal vectors are large enough to change what it predicts."""
    torch.manual_seed(seed)
    return sharpen(ScaffoldStudent.from_pretrained(world.base, kind="scaffold", injection=injection).float()).eval()


def test_input_signal_ids_are_the_signal_of_the_step_each_token_belongs_to(world):
    ex = world.scaffold_examples[0]
    shifted = input_signal_ids(torch.from_numpy(ex.signal_ids).long())
    assert shifted[0] == NO_SIGNAL and (shifted[1:] == torch.from_numpy(ex.signal_ids[:-1]).long()).all()
    # the token the signal head reads (the last one before a step) belongs to the step before: no peeking
    previous = [NO_SIGNAL, *ex.signal_targets[:-1]]
    for position, target, before in zip(ex.signal_positions, ex.signal_targets, previous):
        assert shifted[position] == before
        assert ex.signal_ids[position] == target  # output injection's signal there is the next step's


def test_input_injection_conditions_the_step_but_not_the_heads_reading_before_it(world):
    model = student(world, "input")
    ex = world.scaffold_examples[1]
    ids = torch.from_numpy(ex.input_ids).long()[None]
    signals = torch.from_numpy(ex.signal_ids).long()[None]
    k = 2  # change the signal of the third step
    first, end = int(ex.signal_positions[k]) + 1, int(ex.signal_positions[k + 1]) + 1
    changed = signals.clone()
    changed[0, first - 1 : end - 1] = (signals[0, first] + 1) % 7  # signal_ids lead their tokens by one
    with torch.no_grad():
        a = model.hidden_states(ids, None, input_signal_ids(signals))[0]
        b = model.hidden_states(ids, None, input_signal_ids(changed))[0]
    assert torch.equal(a[:first], b[:first])  # everything up to and including the head's reading position
    assert not torch.allclose(a[first:end], b[first:end])  # the step's own tokens are conditioned on it
    # output injection leaves the hidden states alone (it only adds to the logits)
    out = student(world, "output")
    with torch.no_grad():
        assert torch.equal(
            out.hidden_states(ids, None, input_signal_ids(signals)),
            out.hidden_states(ids, None, input_signal_ids(changed)),
        )


def logit_shift(model: ScaffoldStudent, world: TinyWorld) -> torch.Tensor:
    """How the next-token logits over the third step's tokens move when that step's signal changes."""
    ex = world.scaffold_examples[1]
    ids = torch.from_numpy(ex.input_ids).long()[None]
    signals = torch.from_numpy(ex.signal_ids).long()[None]
    first, end = int(ex.signal_positions[2]) + 1, int(ex.signal_positions[3]) + 1
    changed = signals.clone()
    changed[0, first - 1 : end - 1] = (signals[0, first] + 1) % 7

    def logits(s: torch.Tensor) -> torch.Tensor:
        step = input_signal_ids(s) if model.injects_input else None
        return model.token_logits(model.hidden_states(ids, None, step), s)[0]

    with torch.no_grad():
        return (logits(changed) - logits(signals))[first : end - 1]


def test_output_injection_is_one_bias_on_the_logits_whatever_the_context(world):
    """The first bed's digit deficit (docs/results.md): added after the final norm, the signal vector moves every
    position's logits by the same vector, E·e_s — it cannot depend on what the step has written so far — and its
    gradient lands on the tied token embeddings. Added at the input, its effect depends on the context."""
    output = logit_shift(student(world, "output"), world)
    assert output.abs().max() > 0.1  # the signal does move the logits
    assert torch.allclose(output, output[:1].expand_as(output), atol=1e-5)  # by one fixed vector
    inputs = logit_shift(student(world, "input"), world)
    assert not torch.allclose(inputs, inputs[:1].expand_as(inputs), atol=1e-4)


def test_the_default_student_conditions_its_steps_through_the_context(world):
    """The test that would have caught the first bed's deficit at design time: the pipeline's default student must
    not condition a step on its signal by a context-free logit bias."""
    shift = logit_shift(student(world, StudentConfig().signal_injection), world)
    assert not torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-4)


def reference(model: ScaffoldStudent, world: TinyWorld, question: str, signals: list[str], limit: int) -> list[str]:
    """Greedy decoding without a cache, every token recomputed with the input signal of the step it belongs to."""
    fmt, tok = world.fmt, world.tokenizer
    ids, owner, texts = list(fmt.question_ids(question)), [], []
    owner = [NO_SIGNAL] * len(ids)
    for sig in signals:
        ids += fmt.tag_ids[sig]
        owner += [SIGNAL_INDEX[sig]] * len(fmt.tag_ids[sig])
        out: list[int] = []
        with torch.no_grad():
            while len(out) < limit:
                h = model.hidden_states(torch.tensor([ids]), None, torch.tensor([owner]))[0, -1]
                t = int(model.token_logits(h[None], torch.tensor([SIGNAL_INDEX[sig]]))[0].argmax())
                out.append(t)
                ids.append(t)
                owner.append(SIGNAL_INDEX[sig])
                if t == fmt.eos_id or tok.decode(out[-4:]).endswith("\n\n"):
                    break
        texts.append(tok.decode(out, skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("injection", ["input", "both"])
def test_cached_batched_decoding_equals_recomputation_with_input_injection(world, injection):
    model = student(world, injection)
    cfg = DecodeConfig(max_step_tokens=5, max_answer_tokens=4)
    dec = ScaffoldDecoder(model, world.tokenizer, cfg)
    goldens = [
        ["reasoning_analysis", "addition_elaboration", ANSWER_SIGNAL],
        ["contrast_concession", "conclusion_summary", "opinion_recall", ANSWER_SIGNAL],
    ]
    qs = [world.traces[i].question for i in (0, 1)]
    for q, g, gen in zip(qs, goldens, dec.generate_batch(qs, "golden", goldens)):
        texts = reference(model, world, q, g, 5)
        assert [s.text for s in gen.steps] == texts[:-1]
        assert gen.answer_text == reference(model, world, q, g, 4)[-1]
    # the injection changes what is written: the same weights decode differently with output injection
    plain = ScaffoldDecoder(student(world, "output"), world.tokenizer, cfg).generate_batch(qs, "golden", goldens)
    assert [[s.text for s in g.steps] for g in plain] != [
        [s.text for s in g.steps] for g in dec.generate_batch(qs, "golden", goldens)
    ]


def test_input_injection_trains_every_parameter_and_the_loss_falls(world):
    torch.manual_seed(0)
    model = ScaffoldStudent.from_pretrained(world.base, kind="scaffold", injection="input").float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(kind="scaffold", max_steps=12, batch_size=2, learning_rate=3e-3, warmup_steps=1, beta=0.3)
    result = train(model, world.data_copy("scaffold"), cfg, progress=False)
    assert result.token_losses[-1] < result.token_losses[0] and result.signal_losses[-1] < result.signal_losses[0]
    frozen = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    # the "no signal" row of the embedding is padding: it must stay zero
    assert frozen == [], frozen
    assert torch.count_nonzero(model.signal_embedding.weight[-1]) == 0


def test_the_injection_is_saved_with_the_student_and_a_mismatch_is_refused(world, tmp_path):
    model = student(world, "both")
    model.save_pretrained(tmp_path / "s", world.tokenizer)
    again = ScaffoldStudent.from_pretrained(tmp_path / "s")
    assert again.injection == "both"
    for name, p in model.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name
    with pytest.raises(StudentLoadError, match="signal injection 'both'"):
        ScaffoldStudent.from_pretrained(tmp_path / "s", injection="input")
    with pytest.raises(ValueError, match="signal injection"):
        ScaffoldStudent(model.backbone, injection="everywhere")
