"""Training examples in the scaffold format (paper §3.2) and the plain CoT-SFT format of the baseline.

Scaffold example, tokenised piece by piece so step boundaries are exact token positions:

    Question: {question}␤␤ [tag] {step 1}␤␤ [tag] {step 2}␤␤ … [answer] {answer step}<eos>

Per token: `input_ids`; `labels` (the next token, -100 on the question); `signal_ids` (the signal conditioning the
prediction made at this position, i.e. of the step the *next* token belongs to; -1 inside the question);
`signal_positions` (the last token before each step: where the signal head reads) with `signal_targets`.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from scaffold_lib.data.signals import SIGNAL_INDEX, keyword_table
from scaffold_lib.student.model import NO_SIGNAL

STEP_SEPARATOR = "\n\n"
QUESTION_TEMPLATE = "Question: {question}"


# a chain of numbers and operators, "=", a number: "48 / 2 = 24", "3 * 4 * 2 = 24", "$1,200 x 3 = $3,600"
_NUMBER = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_CALCULATION = re.compile(rf"(?<![\d.,$])((?:{_NUMBER}\s*[-+*/×x÷]\s*)+{_NUMBER})\s*=\s*(-?{_NUMBER})(?!\d|[.,]\d)")


def false_calculation(step: str) -> bool:
    """The step states a calculation whose result is wrong ("5 + 3 = 9": a teacher's slip). A stated result rounded to
    its own decimals counts as right ("10 / 3 = 3.33"); a chain is evaluated whole, left to right with precedence."""
    for expression, stated in _CALCULATION.findall(step):
        try:
            tree = ast.parse(expression.translate(str.maketrans("×x÷", "**/", ",$")), mode="eval")
            value = _evaluate(tree.body)
        except (SyntaxError, ZeroDivisionError, ValueError):
            continue
        stated = stated.translate(str.maketrans("", "", ",$"))
        decimals = len(stated.partition(".")[2])
        if abs(value - float(stated)) > 0.5 * 10**-decimals + 1e-9:
            return True
    return False


def _evaluate(node: ast.AST) -> float:
    """Numbers and + - * / only (the calculation pattern admits nothing else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"not a calculation: {ast.dump(node)}")


_OPERATORS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def signal_tags(keywords_path: str | None = None) -> dict[str, str]:
    """signal -> its short text prefix, e.g. conclusion_summary -> "[conclusion] "."""
    return {s: f"[{p}] " for s, p in keyword_table(keywords_path).prefixes.items()}


@dataclass
class Example:
    trace_id: str
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T], shifted: labels[t] = input_ids[t+1] or -100
    signal_ids: np.ndarray  # int8 [T]
    signal_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    signal_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))

    def __len__(self) -> int:
        return len(self.input_ids)


ENCODE_CHUNK = 2_048  # pieces per tokenizer call
FORMAT_FILE = "scaffold.json"  # written beside every prepared backbone and trained student


def text_format(path: str | Path) -> dict:
    """The text format a backbone or student was prepared with ({"tags": …, "chat_template": …}); a directory
    without one (a plain checkpoint) uses the built-in tags and no chat template."""
    meta_path = Path(str(path)) / FORMAT_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return {"tags": signal_tags(), "chat_template": False, **meta.get("format", {})}


@dataclass
class Formatter:
    """Turns (question, steps, signals) into token arrays, for the scaffold student or the baseline. With
    `chat_template`, the question is the user turn of the tokenizer's chat template and the steps the assistant's
    reply (an instruct model is tuned in the form it was instructed in)."""

    tokenizer: PreTrainedTokenizerBase
    tags: dict[str, str]
    chat_template: bool = False

    def __post_init__(self) -> None:
        self.sep_ids = self._encode([STEP_SEPARATOR])[0]
        self.tag_ids = dict(zip(self.tags, self._encode(list(self.tags.values()))))
        self.eos_id = self.tokenizer.eos_token_id
        # the same as int32 arrays, for joining examples in numpy
        self._tag_array = {s: np.asarray(ids, np.int32) for s, ids in self.tag_ids.items()}
        self._sep_array, self._eos_array = np.asarray(self.sep_ids, np.int32), np.asarray([self.eos_id], np.int32)
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")

    @classmethod
    def for_model(cls, path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Formatter:
        fmt = text_format(path)
        return cls(tokenizer, fmt["tags"], fmt["chat_template"])

    def _encode(self, pieces: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: its Rust batch encoder directly, without per-piece Python objects
            # in chunks: an Encoding keeps strings and offsets per token, a long trace window's worth would not fit
            return [
                e.ids
                for at in range(0, len(pieces), ENCODE_CHUNK)
                for e in backend.encode_batch(pieces[at : at + ENCODE_CHUNK], add_special_tokens=False)
            ]
        return self.tokenizer(pieces, add_special_tokens=False)["input_ids"]

    def question_ids(self, question: str) -> list[int]:
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True
            )
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self._encode([QUESTION_TEMPLATE.format(question=question)])[0] + self.sep_ids

    def encode(self, traces: Sequence[tuple[str, list[str]]]) -> list[tuple[list[int], list[np.ndarray]]]:
        """(question ids, step ids) of many (question, steps) pairs: one tokenizer call for all their steps, which the
        fast tokenizer spreads over the cores, instead of one call per trace. The step ids are int32 views into one
        array (4 bytes a token, where a list of Python ints takes 36: a packing window holds millions)."""
        if self.chat_template:
            questions = [self.question_ids(q) for q, _ in traces]
        else:
            questions = [
                q + self.sep_ids for q in self._encode([QUESTION_TEMPLATE.format(question=q) for q, _ in traces])
            ]
        values, offsets = self._encode_flat([s for _, steps in traces for s in steps])
        out, at = [], 0
        for q_ids, (_, steps) in zip(questions, traces):
            out.append((q_ids, [values[offsets[j] : offsets[j + 1]] for j in range(at, at + len(steps))]))
            at += len(steps)
        return out

    def _encode_flat(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all `pieces` in one int32 array, and offsets: piece j is values[offsets[j]:offsets[j + 1]]. The
        tokenizer's Python lists live one chunk at a time."""
        values, lengths = [], []
        for at in range(0, len(pieces), ENCODE_CHUNK):
            chunk = self._encode(pieces[at : at + ENCODE_CHUNK])
            lengths.append(np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk)))
            values.append(
                np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.int32, count=int(lengths[-1].sum()))
            )
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        if pieces:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return (np.concatenate(values) if values else np.zeros(0, np.int32)), offsets

    def scaffold(self, trace_id: str, question: str, steps: list[str], signals: list[str]) -> Example:
        if signals is None:
            raise ValueError(f"trace {trace_id}: a scaffold example needs signals")
        return self.build(trace_id, self.question_ids(question), self._encode(steps) if steps else [], signals)

    def baseline(self, trace_id: str, question: str, steps: list[str]) -> Example:
        return self.build(trace_id, self.question_ids(question), self._encode(steps) if steps else [], None)

    def build(
        self,
        trace_id: str,
        q_ids: list[int],
        step_ids: Sequence[Sequence[int]],
        signals: list[str] | None,
        masked: Sequence[bool] | None = None,
    ) -> Example:
        """The example of already tokenised question and steps: scaffold format with `signals`, plain CoT without.
        The text of a `masked` step and its separator are no training target (a wrong line stays in the context the
        next step reads, its signal stays a target)."""
        with_signals = signals is not None
        if with_signals and len(signals) != len(step_ids):
            raise ValueError(f"trace {trace_id}: {len(step_ids)} steps but {len(signals)} signals")
        # the reply as pieces (tag, step, separator) with the signal each belongs to, joined once in numpy
        pieces, owners = [np.asarray(q_ids, np.int32)], [NO_SIGNAL]
        last, no_tag = len(step_ids) - 1, np.zeros(0, np.int32)
        for i, ids in enumerate(step_ids):
            sig = SIGNAL_INDEX[signals[i]] if with_signals else NO_SIGNAL
            pieces += [
                self._tag_array[signals[i]] if with_signals else no_tag,
                ids,
                self._eos_array if i == last else self._sep_array,
            ]
            owners += [sig, sig, sig]
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        input_ids = np.concatenate(pieces, dtype=np.int32)
        owner = np.repeat(np.asarray(owners, dtype=np.int8), lengths)  # signal of the step each token belongs to
        starts = np.cumsum(lengths) - lengths
        positions = starts[1::3] - 1 if with_signals else np.zeros(0, np.int64)  # the token before each step's tag
        targets = np.asarray(owners[1::3], dtype=np.int8) if with_signals else np.zeros(0, np.int8)
        labels = np.full(len(input_ids), -100, dtype=np.int32)
        labels[len(q_ids) - 1 : -1] = input_ids[len(q_ids) :]
        for i in np.flatnonzero(np.asarray(masked, dtype=bool)) if masked is not None else ():
            text, sep = 3 * i + 2, 3 * i + 3  # the step's pieces: tag, text, separator
            labels[starts[text] - 1 : starts[sep] + lengths[sep] - 1] = -100
        signal_ids = np.full(len(input_ids), NO_SIGNAL, dtype=np.int8)
        signal_ids[:-1] = owner[1:]
        return Example(trace_id, input_ids, labels, signal_ids, positions.astype(np.int32), targets)


def training_corpus(question: str, steps: list[str], signals: list[str], tags: dict[str, str]) -> str:
    """The text the embedded tokenizer is trained on (tags included, so they become cheap tokens)."""
    tagged = STEP_SEPARATOR.join(tags[s] + t for s, t in zip(signals, steps))
    return QUESTION_TEMPLATE.format(question=question) + STEP_SEPARATOR + tagged
