"""The decontamination stage: training problems whose question shares a word n-gram with a benchmark question
(lm-eval flags 13-grams, open-r1 drops 8-grams; 8 by default here) are recorded in the `contamination` table and, by
default, left out of training. reasoning-gym's `gsm_symbolic` templates were written from GSM8K *test* questions: training on
them and then scoring GSM8K is exactly what this catches.

Every benchmark suite whose file is present is checked (a suite without a file is listed as not checked, never
passed over in silence); promotion is blocked on a suite whose overlapping problems were trained on.
"""

from __future__ import annotations

import re
from pathlib import Path

from scaffold_lib.core.ids import content_id
from scaffold_lib.evaluation.config import DecontaminationConfig
from scaffold_lib.evaluation.suites import SUITES, SuiteDataError, from_warehouse, get_suite
from scaffold_lib.store import data_tables, scores
from scaffold_lib.store.handles import StageReport
from scaffold_lib.store.store import Store

_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> set[str]:
    words = _WORD.findall(text.casefold())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def find_overlaps(
    problems: list[tuple[str, str]], questions: list[tuple[str, str]], n: int
) -> dict[str, tuple[str, str]]:
    """problem_id -> (benchmark doc_id, the shared n-gram) for every problem sharing an n-gram with a question."""
    index: dict[str, str] = {}
    for doc_id, question in questions:
        for gram in ngrams(question, n):
            index.setdefault(gram, doc_id)
    hits = {}
    for problem_id, question in problems:
        for gram in ngrams(question, n):
            if gram in index:
                hits[problem_id] = (index[gram], gram)
                break
    return hits


def decontaminate(store: Store, cfg: DecontaminationConfig, run_id: str | None = None) -> StageReport:
    """Check the configured splits' problems against each suite; write one `contamination` row per (problem, suite).
    An explicitly named suite whose file is missing is an error; a default one is listed as not checked."""
    folder = Path(cfg.suites_dir) if cfg.suites_dir else store.benchmarks
    names = cfg.suites if cfg.suites is not None else [s for s in SUITES if not from_warehouse(s)]
    wh = store.warehouse
    problems = [(r["problem_id"], r["question"]) for r in data_tables.questions_of_splits(wh, cfg.splits)]
    checked, not_checked, rows = {}, {}, []
    for name in names:
        suite = get_suite(name)
        if suite.row_to_item is None:
            continue
        if cfg.suites is None and not (folder / suite.default_file).exists():
            not_checked[name] = f"no {suite.default_file} in {folder}"
            continue
        try:
            items = suite.load(data_dir=folder)
        except SuiteDataError as exc:
            if cfg.suites is not None:
                raise
            not_checked[name] = str(exc)
            continue
        hits = find_overlaps(problems, [(i.doc_id, i.raw_question or i.question) for i in items], cfg.ngram)
        checked[name] = len(hits)
        rows += [
            {
                "contamination_id": content_id("contamination", pid, name, cfg.ngram),
                "problem_id": pid,
                "suite": name,
                "doc_id": doc_id,
                "ngram": gram,
                "n": cfg.ngram,
                "action": cfg.action,
            }
            for pid, (doc_id, gram) in hits.items()
        ]
    wh.upsert("contamination", rows, run_id)  # the action may have changed since an earlier check
    return StageReport(
        "decontamination",
        len(rows),
        wh.count("contamination"),
        {
            "checked": checked,
            "not_checked": not_checked,
            "problems_checked": len(problems),
            "overlapping_problems": len({r["problem_id"] for r in rows}),
            "action": cfg.action,
            "ngram": cfg.ngram,
        },
    )


def suite_contamination(store: Store, suites: list[str], model_name: str, version: str) -> dict[str, dict]:
    """Per suite: problems recorded as overlapping it, and how many of those trained this model version."""
    return {name: scores.suite_overlap(store.warehouse, name, model_name, version) for name in suites}
