"""Benchmark suites as data: the paper's five benchmarks (GSM8K, MATH-500, StrategyQA, CommonsenseQA, TruthfulQA
MC1) and the built-in synthetic one, each with its loader, its zero-shot prompt format and its answer extraction.

Files come in the public formats (JSONL, a JSON array, or Parquet) from `data_dir/<default_file>` or an explicit
path; without a file, a suite tries HF `datasets` by name and, when that is not reachable, says exactly where to
put which file. Every suite has a version: bump it when loading, prompting or extraction changes, since it is
part of the eval-config hash that decides which scores are comparable.

Where to get the files (one-time, on a machine with network):
  gsm8k_test.jsonl           openai/gsm8k (main, test)                 {"question", "answer": "… #### 72"}
  math500_test.jsonl         HuggingFaceH4/MATH-500 (test)             {"problem", "solution", "answer", "unique_id"}
  strategyqa.json            original strategyqa_train.json or ChilleD/StrategyQA  {"qid", "question", "answer": bool}
  csqa_validation.jsonl      tau/commonsense_qa (validation) or the original dev_rand_split.jsonl
  truthfulqa_mc.json         truthfulqa/truthful_qa (multiple_choice, validation) or the original mc_task.json
e.g. `python -c "import datasets; datasets.load_dataset('openai/gsm8k', 'main', split='test').to_json('gsm8k_test.jsonl')"`
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from scaffold_lib.core import answers
from scaffold_lib.core.answers import LETTERS, boxed_contents, gold_answer
from scaffold_lib.core.errors import UserError
from scaffold_lib.core.files import DataFileError, iter_file_rows, raw_of
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import OOD_SPLITS, Quarantined


@dataclass
class EvalItem:
    """One benchmark question: `question` is already in the suite's prompt format (choices included)."""

    doc_id: str
    question: str
    answer: str
    answer_type: str = "number"
    golden_signals: list[str] | None = None
    golden_steps: list[str] | None = None
    choices: list[str] | None = None  # option texts of a multiple-choice item, labelled A, B, C, …
    raw_question: str | None = None  # the question as the source wrote it (to match predictions files by text)


class SuiteDataError(UserError):
    """A suite's data is missing or malformed; the message names the file, the line and the field."""


class BadRow(SuiteDataError):
    """One row cannot become an item: `field` names the culprit; the loader adds file and line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SuiteLoad:
    """A suite's items, and the rows that could not become items (with file, line and field) when loaded leniently."""

    items: list[EvalItem]
    quarantined: list[Quarantined]


# --- prompt formats: the one place where the question the student sees is written ---------------------------
INSTRUCTIONS = {
    "number": "",
    "math": "",
    "yes_no": "Answer yes or no.",
    "choice": "Answer with the letter of the correct option.",
}


def format_question(question: str, answer_type: str, choices: list[str] | None = None) -> str:
    parts = [question.strip()]
    if choices:
        parts.append("\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)))
    if INSTRUCTIONS[answer_type]:
        parts.append(INSTRUCTIONS[answer_type])
    return "\n".join(parts)


# --- suites -------------------------------------------------------------------------------------------------
Row = dict
RowToItem = Callable[[Row], EvalItem]  # raises BadRow naming the field; the loader names file and line


def _field(row: Row, name: str, kind: type | tuple = str):
    value = row.get(name)
    if value is None:
        raise BadRow(name, f"missing field {name!r}")
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise BadRow(name, f"field {name!r} must be a non-empty {getattr(kind, '__name__', kind)}, got {value!r:.60}")
    return value


def _doc_id(suite: str, row: Row, id_field: str | None, question: str) -> str:
    return str(row[id_field]) if id_field and row.get(id_field) is not None else content_id(suite, question)


def _gsm8k(row: Row) -> EvalItem:
    question, answer = _field(row, "question"), _field(row, "answer")
    gold, kind = gold_answer(answer)
    if kind != "number":
        raise BadRow("answer", f"field 'answer' has no '#### N' number: {answer[-60:]!r}")
    return EvalItem(
        _doc_id("gsm8k", row, None, question),
        format_question(question, "number"),
        gold,
        "number",
        raw_question=question,
    )


def _math500(row: Row) -> EvalItem:
    problem = _field(row, "problem")
    gold = row.get("answer")
    if not isinstance(gold, str) or not gold.strip():
        boxed = boxed_contents(row.get("solution") or "")
        if not boxed:
            raise BadRow("answer", "field 'answer' missing and no \\boxed{} in 'solution'")
        gold = boxed[-1]
    return EvalItem(
        _doc_id("math500", row, "unique_id", problem),
        format_question(problem, "math"),
        gold.strip(),
        "math",
        raw_question=problem,
    )


def _strategyqa(row: Row) -> EvalItem:
    question, answer = _field(row, "question"), row.get("answer")
    if isinstance(answer, str) and answers.extract_yes_no(answer) is not None and len(answer.split()) == 1:
        answer = answers.extract_yes_no(answer) == "yes"
    if not isinstance(answer, bool):
        raise BadRow("answer", f"field 'answer' must be true/false, got {answer!r:.60}")
    return EvalItem(
        _doc_id("strategyqa", row, "qid", question),
        format_question(question, "yes_no"),
        "yes" if answer else "no",
        "yes_no",
        raw_question=question,
    )


def _csqa(row: Row) -> EvalItem:
    q = row.get("question")
    if isinstance(q, dict):  # the original release: {"stem", "choices": [{"label", "text"}]}
        question, choices = _field(q, "stem"), q.get("choices")
        pairs = [(c.get("label"), c.get("text")) for c in choices] if isinstance(choices, list) else None
    else:  # the HF release: question str, choices {"label": [...], "text": [...]}
        question, choices = _field(row, "question"), row.get("choices")
        pairs = list(zip(choices.get("label", []), choices.get("text", []))) if isinstance(choices, dict) else None
    if not pairs or any(not isinstance(t, str) for _, t in pairs):
        raise BadRow("choices", "field 'choices' must list labels and texts")
    key = _field(row, "answerKey")
    labels = [label for label, _ in pairs]
    if key not in labels:
        raise BadRow("answerKey", f"field 'answerKey' {key!r} is not one of the labels {labels}")
    texts = [t for _, t in pairs]
    return EvalItem(
        _doc_id("csqa", row, "id", question),
        format_question(question, "choice", texts),
        LETTERS[labels.index(key)],
        "choice",
        choices=texts,
        raw_question=question,
    )


def _truthfulqa_mc1(row: Row) -> EvalItem:
    question, targets = _field(row, "question"), row.get("mc1_targets")
    if isinstance(targets, dict) and "choices" in targets:  # HF: {"choices": [...], "labels": [1, 0, ...]}
        options = list(zip(targets["choices"], targets.get("labels", [])))
    elif isinstance(targets, dict):  # the original mc_task.json: {"choice text": 1, ...}
        options = list(targets.items())
    else:
        raise BadRow("mc1_targets", "missing field 'mc1_targets'")
    if sum(1 for _, label in options if label == 1) != 1:
        raise BadRow("mc1_targets", "field 'mc1_targets' must mark exactly one correct choice")
    # the source always lists the correct choice first: shuffle, seeded by the question, so "A" is not a free win
    random.Random(content_id("truthfulqa-order", question)).shuffle(options)
    texts = [str(text) for text, _ in options]
    gold = LETTERS[[label for _, label in options].index(1)]
    return EvalItem(
        _doc_id("truthfulqa_mc1", row, None, question),
        format_question(question, "choice", texts),
        gold,
        "choice",
        choices=texts,
        raw_question=question,
    )


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    answer_type: str  # number | math | yes_no | choice (per-item: the held-out problems carry their own)
    prompt_format: str
    default_file: str
    hf_dataset: tuple[str, str | None, str] | None  # (name, config, split)
    row_to_item: RowToItem | None  # None: items come from the warehouse (the synthetic suite)

    def load(
        self, path: str | Path | None = None, *, data_dir: str | Path | None = None, limit: int | None = None
    ) -> list[EvalItem]:
        """The items; a bad row raises `SuiteDataError` naming file, line and field (see `read` for lenient)."""
        return self.read(path, data_dir=data_dir, limit=limit).items

    def read(
        self,
        path: str | Path | None = None,
        *,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        lenient: bool = False,
    ) -> SuiteLoad:
        """Items from `path`, else `data_dir/<default file>`, else HF datasets by name. A bad row raises naming file,
        line and field, or, with `lenient`, is quarantined (returned beside the items) and the load goes on."""
        if self.row_to_item is None:
            raise SuiteDataError(
                f"suite {self.name!r} is built from the warehouse's held-out problems "
                "(scaffold_lib.evaluation.evaluate.heldout_items), not from a file"
            )
        file = self.local_file(path, data_dir)
        if file is not None and file.exists():
            rows = _file_rows(file)
        elif path is not None:
            raise SuiteDataError(self._where_to_put(file))
        else:
            rows = self._hub_rows(file)
        out = SuiteLoad([], [])
        for where, source, line, row, error in rows:
            try:
                if error is not None:
                    raise BadRow("<row>", error)
                out.items.append(self.row_to_item(row))
            except BadRow as exc:
                if not lenient:
                    raise SuiteDataError(f"{where}: {exc}") from None
                out.quarantined.append(Quarantined(source, line, exc.field, str(exc), raw_of(row or {})))
            if limit is not None and len(out.items) >= limit:
                break
        return out

    def local_file(self, path: str | Path | None = None, data_dir: str | Path | None = None) -> Path | None:
        """The file this suite is read from: `path`, else `data_dir/<default file>` (None: neither given)."""
        return Path(path) if path else Path(data_dir) / self.default_file if data_dir else None

    def _where_to_put(self, file: Path | None) -> str:
        name, config, split = self.hf_dataset or ("?", None, "?")
        where = f"{file}: no such file" if file else f"no data file for suite {self.name!r}"
        return (
            f"{where}. Put the {self.name} file there ({self.default_file}, JSONL/JSON/Parquet in the public "
            f"format), e.g. from HF datasets {name!r}{f' config {config!r}' if config else ''} split {split!r}; "
            "see the docstring of scaffold_lib/evaluation/suites.py"
        )

    def _hub_rows(self, file: Path | None) -> Iterator[tuple[str, str, int, Row, None]]:
        name, config, split = self.hf_dataset
        if (why := hub_unreachable()) is not None:  # fail in a second, not after ~26 s of retries
            raise SuiteDataError(f"{self._where_to_put(file)} (the HF hub cannot be used: {why})")
        try:
            import datasets

            dataset = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # offline, unknown name, gated: all mean "no data here"
            raise SuiteDataError(
                f"{self._where_to_put(file)} (loading {name!r} from the hub failed: {type(exc).__name__})"
            ) from exc
        return ((f"{name}[{split}] row {i}", name, i, row, None) for i, row in enumerate(dataset, start=1))


def hub_unreachable() -> str | None:
    """Why the HF hub cannot be asked now, or None. Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) is left to
    `datasets`, which then reads its cache at once; otherwise one quick connection to the endpoint tells an offline
    machine from an online one. Behind a proxy a direct connection proves nothing, so none is tried."""
    if any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{host}:{port} is not reachable ({exc.strerror or exc}); with a cached copy, set HF_HUB_OFFLINE=1"
    return None


def _file_rows(path: Path) -> Iterator[tuple[str, str, int, Row | None, str | None]]:
    """(where, file, line, row, error) for a JSONL, JSON-array (line: the item's number) or Parquet file; a bad line
    comes with its error, and a file that cannot be read at all raises naming it."""
    if path.suffix.lower() == ".json":
        text = path.read_text("utf-8-sig", errors="strict").lstrip()
        if text.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SuiteDataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            for i, row in enumerate(rows, start=1):
                error = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
                yield f"{path} item {i}", str(path), i, row if error is None else None, error
            return
    try:
        yield from ((f"{path}:{line}", str(path), line, row, error) for line, row, _, error in iter_file_rows(path))
    except DataFileError as exc:
        raise SuiteDataError(str(exc)) from exc


HELDOUT = "heldout"  # the warehouse's held-out problems (validation or test split), whatever their source
# the synthetic generator's out-of-distribution test sets: splits of their own in the warehouse (see OODConfig)
OOD_SUITES = OOD_SPLITS
# versions 4 / 2: answers read as people write them (docs/scoring.md), so earlier scores are not comparable
SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(HELDOUT, "4", "per-item", "question-v1", "", None, None),
        *(Suite(name, "2", "per-item", "question-v1", "", None, None) for name in OOD_SUITES),
        Suite("gsm8k", "2", "number", "question-v1", "gsm8k_test.jsonl", ("openai/gsm8k", "main", "test"), _gsm8k),
        Suite(
            "math500",
            "2",
            "math",
            "question-v1",
            "math500_test.jsonl",
            ("HuggingFaceH4/MATH-500", None, "test"),
            _math500,
        ),
        Suite(
            "strategyqa",
            "2",
            "yes_no",
            "yes-no-v1",
            "strategyqa.json",
            ("ChilleD/StrategyQA", None, "test"),
            _strategyqa,
        ),
        Suite(
            "csqa",
            "2",
            "choice",
            "mc-letters-v1",
            "csqa_validation.jsonl",
            ("tau/commonsense_qa", None, "validation"),
            _csqa,
        ),
        Suite(
            "truthfulqa_mc1",
            "2",
            "choice",
            "mc-letters-v1",
            "truthfulqa_mc.json",
            ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
            _truthfulqa_mc1,
        ),
    )
}


def from_warehouse(name: str) -> bool:
    """The suite's items are the warehouse's own problems (held out, or an OOD split), not a benchmark file."""
    return get_suite(name).row_to_item is None


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise SuiteDataError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}") from None
