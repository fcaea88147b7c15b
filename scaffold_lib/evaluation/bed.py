"""Diagnostics of a test bed, measured before any comparison: can the bed tell whether scaffolding works?

A bed can show what the method does only where choosing the next step is the hard part and the work inside a step
is learnable. So, on validation, teacher-forced on the teacher's traces:

(a) step execution: of the calculations the teacher wrote ("12 / 3 = 4"), the share whose result a student predicts
    exactly (every result token the argmax) given everything before it, and the share whose operands it copies
    exactly. High means a step is executed right once the right step is chosen.
(b) the next signal, predicted four ways at every step boundary: by the step's position alone (the most common signal
    at that index in training), by position and the previous signal (a Markov chain of the training flows), by the
    CoT-SFT student (its greedy opening words run through the keyword labeller: what it implicitly decides), and by
    the scaffold student's signal head. The head's advantage over the structure-only predictors is what the flow of
    reasoning adds; over the CoT-SFT student's implicit choice, what the auxiliary task adds.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from scaffold_lib.data.signals import SIGNALS, keyword_table, label_step
from scaffold_lib.evaluation.decoding import greedy_continuations
from scaffold_lib.evaluation.metrics import signal_predictions
from scaffold_lib.evaluation.suites import EvalItem
from scaffold_lib.student.examples import STEP_SEPARATOR, Formatter
from scaffold_lib.student.model import ScaffoldStudent, input_signal_ids

# "a op b = r": operands and result of a calculation a step states
_CALCULATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPENING_TOKENS = 6  # greedy tokens enough to hold any opening keyword of the labeller


def _step_offsets(fmt: Formatter, q_len: int, step_ids: Sequence[Sequence[int]], signals: list[str] | None) -> list:
    """Index of each step's first text token in the example `fmt.build` makes (after its tag in the scaffold format)."""
    at, starts = q_len, []
    for i, ids in enumerate(step_ids):
        at += len(fmt.tag_ids[signals[i]]) if signals is not None else 0
        starts.append(at)
        at += len(ids) + len(fmt.sep_ids if i < len(step_ids) - 1 else [fmt.eos_id])
    return starts


@torch.no_grad()
def step_execution(model: ScaffoldStudent, fmt: Formatter, items: Sequence[EvalItem]) -> dict:
    """(a) for `model` in its own format: {"calculations", "result_exact", "operands_exact"} over the items' teacher
    traces (items without them are skipped)."""
    device = next(model.parameters()).device
    scaffold = model.kind == "scaffold"
    results = operands = total = 0
    for item in items:
        if not item.golden_steps:
            continue
        signals = item.golden_signals if scaffold else None
        q_ids = fmt.question_ids(item.question)
        encodings = [fmt.tokenizer(s, add_special_tokens=False, return_offsets_mapping=True) for s in item.golden_steps]
        step_ids = [e["input_ids"] for e in encodings]
        ex = fmt.build(item.doc_id, q_ids, step_ids, signals)
        ids = torch.from_numpy(ex.input_ids).long()[None].to(device)
        sig = torch.from_numpy(ex.signal_ids).long()[None].to(device)
        hidden = model.hidden_states(ids, None, input_signal_ids(sig) if model.injects_input else None)
        predicted = model.token_logits(hidden, sig)[0].argmax(-1).cpu()
        target = torch.from_numpy(ex.labels).long()
        for start, step, enc in zip(_step_offsets(fmt, len(q_ids), step_ids, signals), item.golden_steps, encodings):
            for m in _CALCULATION.finditer(step):
                spans = {"a": m.span(1), "b": m.span(3), "r": m.span(4)}
                tokens = {
                    k: [start + t for t, (s, e) in enumerate(enc["offset_mapping"]) if s < hi and e > lo]
                    for k, (lo, hi) in spans.items()
                }
                right = {k: all(bool(predicted[t - 1] == target[t - 1]) for t in ts) for k, ts in tokens.items()}
                total += 1
                results += right["r"]
                operands += right["a"] and right["b"]
    return {
        "calculations": total,
        "result_exact": results / total if total else None,
        "operands_exact": operands / total if total else None,
    }


def structure_predictors(train_flows: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """The most common signal at each step index, and at each (index, previous signal), in training flows."""
    by_index: dict[int, Counter] = {}
    by_previous: dict[tuple[int, str], Counter] = {}
    for flow in train_flows:
        for k, signal in enumerate(flow):
            by_index.setdefault(k, Counter())[signal] += 1
            by_previous.setdefault((k, flow[k - 1] if k else ""), Counter())[signal] += 1
    return (
        {k: c.most_common(1)[0][0] for k, c in by_index.items()},
        {k: c.most_common(1)[0][0] for k, c in by_previous.items()},
    )


def structure_accuracy(train_flows: Sequence[Sequence[str]], items: Sequence[EvalItem]) -> dict:
    """(b) accuracy of the position-only and the position + previous-signal predictors on the items' boundaries."""
    by_index, by_previous = structure_predictors(train_flows)
    position = markov = total = 0
    for item in items:
        flow = item.golden_signals or []
        for k, signal in enumerate(flow):
            total += 1
            position += by_index.get(k) == signal
            markov += by_previous.get((k, flow[k - 1] if k else ""), by_index.get(k)) == signal
    return {"boundaries": total, "position_only": position / total, "position_and_previous": markov / total}


@torch.no_grad()
def implicit_signal_accuracy(
    model: ScaffoldStudent, fmt: Formatter, items: Sequence[EvalItem], batch_size: int = 64
) -> dict:
    """(b) the CoT-SFT student's next signal: at every boundary of the teacher's trace, its greedy opening words,
    labelled by the keyword labeller (a boundary whose opening no keyword starts counts as wrong)."""
    table = keyword_table()
    prompts, targets = [], []
    for item in items:
        if not item.golden_steps:
            continue
        q_ids = fmt.question_ids(item.question)
        context: list[int] = list(q_ids)
        for step, signal in zip(item.golden_steps, item.golden_signals):
            prompts.append(list(context))
            targets.append(signal)
            context += fmt.tokenizer(step, add_special_tokens=False)["input_ids"] + list(fmt.sep_ids)
    hits = 0
    for at in range(0, len(prompts), batch_size):
        openings = greedy_continuations(model, prompts[at : at + batch_size], OPENING_TOKENS, fmt.eos_id)
        for row, target in zip(openings, targets[at : at + batch_size]):
            text = fmt.tokenizer.decode(row, skip_special_tokens=True).split(STEP_SEPARATOR)[0]
            label = label_step(text, False, table, fallback_signal="")
            hits += label.signal == target
    return {"boundaries": len(prompts), "cot_sft_implicit": hits / len(prompts) if prompts else None}


def head_accuracy(model: ScaffoldStudent, fmt: Formatter, items: Sequence[EvalItem]) -> dict:
    """(b) the scaffold student's signal head, teacher-forced, at every boundary."""
    probs, targets = signal_predictions(model, fmt, items)
    n = len(targets)
    return {"boundaries": n, "signal_head": float((probs.argmax(-1) == targets).float().mean()) if n else None}


def flow_table(train_flows: Sequence[Sequence[str]]) -> dict[str, int]:
    """How often each signal occurs in the training flows (every signal of the seven is listed)."""
    counts = Counter(s for flow in train_flows for s in flow)
    return {s: counts.get(s, 0) for s in SIGNALS}
