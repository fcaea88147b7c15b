"""The programmatic teacher's traces, written from a parsed synthetic problem: the `flow` style (the default: the next
step follows from the state of the solution, as in R1 traces) and the first `v1` style. Every wording is drawn from a
seeded stream, so a problem and a seed always give the same trace."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from scaffold_lib.data.synthetic import ParsedQuestion

if TYPE_CHECKING:  # the config lives with the teacher, which imports these writers
    from scaffold_lib.data.teachers import ProgrammaticTeacherConfig

# Openings by signal: varied with the seed so no two traces share one template.
OPENINGS = {
    "reasoning_analysis": ("So", "Since", "Because", "That means", "Let me compute:", "Let's see:", "Now, since"),
    "addition_elaboration": ("Then", "Next,", "After that,", "Also,", "Moreover,", "In addition,", "Then,"),
}
OP_PHRASES = {
    "add": ("{name} gets {n} more, so {a} + {n} = {r}", "adding {n} gives {a} + {n} = {r}", "{a} + {n} = {r} {item}"),
    "sub": (
        "{name} has {n} fewer, so {a} - {n} = {r}",
        "taking away {n} leaves {a} - {n} = {r}",
        "{a} - {n} = {r} {item}",
    ),
    "mul": (
        "the {item} grow {n} times, so {a} * {n} = {r}",
        "multiplying by {n} gives {a} * {n} = {r}",
        "{a} * {n} = {r} {item}",
    ),
    "div": (
        "the {item} are split into {n} groups, so {a} / {n} = {r}",
        "dividing by {n} gives {a} / {n} = {r}",
        "{a} / {n} = {r} {item}",
    ),
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def v1_trace_text(parsed: ParsedQuestion, rng: random.Random, cfg: ProgrammaticTeacherConfig) -> str:
    """The v1 style's trace: an operation step with a keyword opening (or, `bare_step_prob`, none), corrected
    mistakes and examples or remarks at random, a conclusion and the answer.

    Longer than 80 lines because of its phrase tables: each step kind's wordings stand where the step is written, in
    the order the random stream draws them (reordering them would change every generated trace)."""
    name, item = parsed.name, parsed.item
    ops = [s for s in parsed.steps if s.kind not in ("start", "distractor")]
    wrong_at = rng.randrange(len(ops)) if ops and rng.random() < cfg.wrong_fraction else -1
    mistake_at = rng.randrange(len(ops)) if ops and wrong_at < 0 and rng.random() < cfg.mistake_prob else -1
    start = parsed.steps[0].n
    steps: list[str] = [
        rng.choice(
            (
                f"Okay, {name} starts with {start} {item}, and I need the number at the end.",
                f"Let me start with what we know: {name} has {start} {item}.",
                f"First, {name} has {start} {item}.",
                f"So the question is about {name}'s {item}, starting from {start}.",
                f"Alright, {name} begins with {start} {item}.",
            )
        )
    ]
    value, chain, op_i = start, str(start), 0
    for step in parsed.steps[1:]:
        if step.kind == "distractor":
            fact = step.sentence.rstrip(".")
            fact = "a" + fact[1:] if fact.startswith("A ") else fact
            steps.append(
                rng.choice(
                    (
                        f"I think the fact that {fact} does not matter here.",
                        f"But {fact} is about something else, so I ignore it.",
                        f"Hmm, {fact}; that is a distraction.",
                        f"However, {fact} does not change {name}'s {item}.",
                    )
                )
            )
            continue
        a, n, op = value, step.n, step.kind
        right = {"add": a + n, "sub": a - n, "mul": a * n, "div": a // n}[op]
        shown = right
        if op_i in (wrong_at, mistake_at):
            shown = right + rng.choice((-2, -1, 1, 2))
        phrase = rng.choice(OP_PHRASES[op]).format(name=name, n=n, a=a, r=shown, item=item)
        if rng.random() < cfg.bare_step_prob:
            steps.append(phrase[0].upper() + phrase[1:] + ".")
        else:
            # the flow follows the problem (adding elaborates, the rest is analysis) with some noise, so the
            # next signal is learnable from context while the wording still varies
            signal = "addition_elaboration" if op == "add" else "reasoning_analysis"
            if rng.random() < cfg.signal_noise:
                signal = "reasoning_analysis" if signal == "addition_elaboration" else "addition_elaboration"
            steps.append(f"{rng.choice(OPENINGS[signal])} {phrase}.")
        if op_i == mistake_at:
            steps.append(
                rng.choice(
                    (
                        f"Wait, {a} {SYMBOL[op]} {n} is {right}, not {shown}. Let me fix that.",
                        f"But that is not right: {a} {SYMBOL[op]} {n} = {right}.",
                        f"Actually, I made a slip: {a} {SYMBOL[op]} {n} = {right}.",
                    )
                )
            )
            shown = right
        value = shown
        chain = f"({chain} {SYMBOL[op]} {n})" if op in ("mul", "div") and " " in chain else f"{chain} {SYMBOL[op]} {n}"
        if op in ("mul", "div") and rng.random() < cfg.elaboration_prob:
            steps.append(
                rng.choice(
                    (
                        f"For example, {n} groups of {value if op == 'div' else a} make {a if op == 'div' else value}, which checks out."
                        if op == "div"
                        else f"For example, {n} piles of {a} {item} make {value} {item} in all.",
                        f"For instance, I can picture it as {n} rows of {value if op == 'div' else a}.",
                    )
                )
            )
        elif rng.random() < cfg.elaboration_prob / 3:
            steps.append(
                rng.choice(
                    (
                        f"I recall that checking each step helps, and {value} looks right so far.",
                        f"Hmm, so far {name} has {value} {item}.",
                    )
                )
            )
        op_i += 1
    steps.append(
        rng.choice(
            (
                f"Therefore, {name} has {value} {item} in the end.",
                f"So overall, {chain} = {value}.",
                f"Putting it together, {name} ends with {value} {item}.",
                f"Thus the count is {value}.",
                f"In summary, {name} has {value} {item}.",
            )
        )
    )
    steps.append(rng.choice((f"The answer is {value}.", f"**Answer:** {value}", f"The final answer is {value}.")))
    return "\n\n".join(steps)


def _on(day: str | None) -> str:
    return f"on {day}, " if day else ""


# The flow style (default): the next step depends on the state of the solution, as in R1 traces.
FLOW_OPENINGS = {
    "addition_elaboration": ("Then", "Next,", "After that,", "Then,"),
    "reasoning_analysis": ("So", "Since", "Because", "That means", "Let me compute:"),
}


def flow_trace_text(parsed: ParsedQuestion, rng: random.Random, cfg: ProgrammaticTeacherConfig) -> str:
    """An R1-style trace whose flow follows the solution: an operation step (an addition step elaborates, the other
    operations are analysis); after a product or a quotient a check ("Hmm, let me check: …", or for a product with
    `illustrate_products` an example); a slip is always followed by the check that catches it ("Wait, …"), so a
    contrast step means the step before it was wrong; a fact about something else is set aside ("But … does not
    matter"); in long problems a running summary every few operations ("So far, …"), so summaries-only decoding keeps
    what the rest needs; then a conclusion and the answer. The facts of a timeline problem are taken day by day, each
    step naming its day, so which step comes next is read off the question's dates."""
    name, item = parsed.name, parsed.item
    ops = [s for s in parsed.steps if s.kind not in ("start", "distractor")]
    # a trace wrong on purpose: one slip that no check catches (the teacher's own accuracy is then below 1)
    uncaught = rng.randrange(len(ops)) if ops and rng.random() < cfg.wrong_fraction else -1
    start = parsed.steps[0].n
    first_day = _on(parsed.steps[0].day)
    steps = [
        rng.choice(
            (
                f"First, {first_day}{name} has {start} {item}.",
                f"Okay, {first_day}{name} starts with {start} {item}.",
                f"Let me start with what we know: {first_day}{name} has {start} {item}.",
            )
        )
    ]
    value, op_i = start, 0
    for step in parsed.steps[1:]:
        if step.kind == "distractor":
            fact = step.sentence.rstrip(".")
            fact = "a" + fact[1:] if fact.startswith("A ") else fact
            if step.day:  # "On Friday, Olga has 7 marbles" -> "on Friday, Olga has 7 marbles"
                fact = "o" + fact[1:]
            steps.append(
                rng.choice(
                    (
                        f"But {fact} is about something else, so I ignore it.",
                        f"However, {fact} does not change {name}'s {item}.",
                    )
                )
            )
            continue
        a, n, op = value, step.n, step.kind
        right = {"add": a + n, "sub": a - n, "mul": a * n, "div": a // n}[op]
        slip = op_i == uncaught or (op_i != uncaught and rng.random() < cfg.slip_prob)
        shown = right + rng.choice((-2, -1, 1, 2)) if slip else right
        phrase = rng.choice(OP_PHRASES[op]).format(name=name, n=n, a=a, r=shown, item=item)
        signal = "addition_elaboration" if op == "add" else "reasoning_analysis"
        if rng.random() < cfg.signal_noise:
            signal = "reasoning_analysis" if signal == "addition_elaboration" else "addition_elaboration"
        opening = rng.choice(FLOW_OPENINGS[signal])
        steps.append(f"{opening} {_on(step.day).rstrip(', ') + ', ' if step.day else ''}{phrase}.")
        if slip and op_i != uncaught:
            steps.append(f"Wait, {a} {SYMBOL[op]} {n} is {right}, not {shown}. Let me fix that.")
            shown = right
        elif op == "mul" and not slip and cfg.illustrate_products and rng.random() < cfg.verify_prob:
            steps.append(f"For example, {n} piles of {a} {item} make {shown} {item}.")
        elif op in ("mul", "div") and not slip and rng.random() < cfg.verify_prob:
            inverse = f"{shown} / {n} = {a}" if op == "mul" else f"{shown} * {n} = {a}"
            steps.append(f"Hmm, let me check: {inverse}, so {shown} is right.")
        value = shown
        op_i += 1
        if cfg.summary_every and len(ops) > cfg.summary_every and op_i % cfg.summary_every == 0 and op_i < len(ops):
            steps.append(f"So far, {name} has {value} {item}.")
    steps.append(
        rng.choice(
            (
                f"Therefore, {name} has {value} {item} in the end.",
                f"In summary, {name} has {value} {item}.",
                f"Thus the count is {value}.",
            )
        )
    )
    steps.append(f"The answer is {value}.")
    return "\n\n".join(steps)
