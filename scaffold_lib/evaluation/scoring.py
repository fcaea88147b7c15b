"""Scoring any model's outputs with the pipeline's scorer: a JSONL of predictions (`output`, and `question` or the
suite's id as `doc_id` / `id`) against a suite in its public file format. Useful for scoring a teacher, or another
model, with exactly the rules the students are scored by."""

from __future__ import annotations

import json
from pathlib import Path

from scaffold_lib.core import answers
from scaffold_lib.core.files import DataFileError, iter_file_rows
from scaffold_lib.data.problems import normalise_question
from scaffold_lib.evaluation.metrics import wilson_interval
from scaffold_lib.evaluation.suites import EvalItem, from_warehouse, get_suite

ID_FIELDS = ("doc_id", "id", "unique_id", "qid")


def _match(row: dict, by_id: dict[str, EvalItem], by_text: dict[str, EvalItem]) -> EvalItem | None:
    for name in ID_FIELDS:
        if row.get(name) is not None and str(row[name]) in by_id:
            return by_id[str(row[name])]
    question = row.get("question")
    return by_text.get(normalise_question(question)) if isinstance(question, str) else None


def score_predictions(
    suite_name: str,
    predictions: str | Path,
    *,
    suite_file: str | Path | None = None,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    lenient: bool = False,
) -> str:
    """Pass@1 of the predictions (a summary line); per-item rows (question, doc_id, extracted, gold, correct) to `out`.
    A prediction without `output`, or matching no item, is an error naming its line: nothing is silently skipped.
    A bad row of the suite file stops the scoring, or with `lenient` is left out and reported (file, line, field)."""
    if from_warehouse(suite_name):
        raise ValueError(
            f"scoring predictions needs a benchmark file suite (gsm8k, math500, …), not {suite_name!r}, whose "
            "items are the warehouse's problems"
        )
    path = Path(predictions)
    if not path.exists():  # the user's own file first: before a suite that may need the hub
        raise DataFileError(f"{path}: no such file")
    loaded = get_suite(suite_name).read(suite_file, data_dir=data_dir, lenient=lenient)
    items = loaded.items
    by_id = {i.doc_id: i for i in items}
    by_text = {normalise_question(i.raw_question or i.question): i for i in items}
    results, seen = [], set()
    for line, row, _, error in iter_file_rows(path):
        if error is not None:
            raise DataFileError(f"{path}:{line}: {error}")
        output = row.get("output")
        if not isinstance(output, str):
            raise DataFileError(f"{path}:{line}: field 'output' must be a string, got {type(output).__name__}")
        item = _match(row, by_id, by_text)
        if item is None:
            raise DataFileError(f"{path}:{line}: matches no {suite_name} item by {'/'.join(ID_FIELDS)} or 'question'")
        if item.doc_id in seen:
            raise DataFileError(f"{path}:{line}: a second prediction for item {item.doc_id}")
        seen.add(item.doc_id)
        extracted = answers.extract(output, item.answer_type, item.choices)
        results.append(
            {
                "question": item.raw_question or item.question,
                "doc_id": item.doc_id,
                "extracted": extracted,
                "gold": item.answer,
                "correct": answers.is_correct(extracted, item.answer, item.answer_type),
            }
        )
    if not results:
        raise DataFileError(f"{path}: no predictions")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), "utf-8")
    k, n = sum(r["correct"] for r in results), len(results)
    lo, hi = wilson_interval(k, n)
    missing = len(items) - n
    return (
        f"{suite_name}: Pass@1 {100 * k / n:.1f} % ({k}/{n}, 95 % CI {100 * lo:.1f}–{100 * hi:.1f})"
        + (f"; {missing} suite items had no prediction" if missing else "")
        + (
            f"; {len(loaded.quarantined)} suite rows quarantined (first: {first.source_file}:{first.line}, "
            f"field {first.field!r}: {first.error})"
            if (first := next(iter(loaded.quarantined), None))
            else ""
        )
        + (f"; per-item rows: {out}" if out else "")
    )
