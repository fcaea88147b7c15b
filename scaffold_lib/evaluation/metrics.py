"""Evaluation (paper §4): Pass@1 with greedy decoding per variant, plus the process metrics:

- next-signal accuracy: the signal head's argmax at each step boundary of held-out teacher traces (teacher
  forced), overall and on the positions whose confidence reaches τ (with that coverage);
- signal fidelity: share of generated steps whose keyword-labeller signal equals the signal that conditioned them;
- answer consistency: share of answers equal to the result stated in the last conclusion step.

Every answer is also kept per item (`SampleRecord`), so comparisons can be paired (both arms answer the same items).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scaffold_lib.core import answers
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.signals import CONCLUSION_SIGNAL, keyword_table, label_step
from scaffold_lib.evaluation.config import SCAFFOLD_VARIANTS, DecodeConfig, EvalConfig
from scaffold_lib.evaluation.decoding import Generation, ScaffoldDecoder, plain_generate_batch
from scaffold_lib.evaluation.stats import item_comparison
from scaffold_lib.evaluation.suites import HELDOUT, EvalItem, Suite, from_warehouse, get_suite
from scaffold_lib.student.examples import Formatter
from scaffold_lib.student.model import ScaffoldStudent, input_signal_ids

BASELINE_VARIANT = "cot_sft"
BASE_VARIANT = "base"  # the untuned backbone, plain generation
TABLE_ROWS = (BASE_VARIANT, BASELINE_VARIANT, "golden", "predicted", "random", "summaries_only")


def serving_decode(cfg: EvalConfig, budget: dict[str, int] | None) -> dict:
    """The decoding settings a registered student is served with (`mlflow models serve`, `scaffold ask`): those its
    evaluation decodes with, caps resolved from its training data's budget. Every trainer calls this one function."""
    return cfg.decode.resolved(budget).model_dump()


@dataclass(frozen=True)
class SuiteRun:
    """One suite's evaluation, resolved: the decoding caps are final and the config hash names them."""

    suite: Suite
    split: str
    decode: DecodeConfig
    variants: tuple[str, ...]
    batch_size: int
    config_hash: str


def suite_run(
    cfg: EvalConfig,
    suite_name: str,
    budget: dict[str, int] | None = None,
    items: Sequence[EvalItem] | None = None,
) -> SuiteRun:
    """What makes two scores comparable: suite + version + split, prompt format, the resolved decoding settings (τ,
    caps, guards) and the item limit; for a suite read from a file, the items it gave (two gsm8k files are two
    columns, wherever they lie). Every variant of one evaluation shares the hash (the variant is the table's row);
    batch size is left out, since greedy results do not depend on it."""
    suite = get_suite(suite_name)
    split = cfg.split if suite.name == HELDOUT else suite.name if from_warehouse(suite.name) else "test"
    decode = cfg.decode.resolved(budget)
    parts: list = [suite.name, suite.version, split, suite.prompt_format, decode.model_dump(), cfg.limit]
    if items is not None and suite.row_to_item is not None:
        parts.append(content_id("suite-items", [(i.doc_id, i.answer) for i in items]))
    config_hash = content_id("eval", *parts)
    return SuiteRun(suite, split, decode, tuple(cfg.variants), cfg.batch_size, config_hash)


@dataclass
class ScoreRow:
    benchmark: str
    split: str
    variant: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    next_signal_acc: float | None
    signal_fidelity: float | None
    answer_consistency: float | None
    mean_steps: float
    eval_config_hash: str

    def as_row(self) -> dict:
        return asdict(self)


@dataclass
class SampleRecord:
    """One answer, in the per-sample form lm-evaluation-harness users know, with what decoding did."""

    doc_id: str
    variant: str
    prompt: str
    response: str
    extracted: str | None
    gold: str
    correct: bool
    signals: list[str] = field(default_factory=list)
    stopped_by: str = ""
    new_tokens: int = 0


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def signal_fidelity(generations: Iterable[Generation]) -> float | None:
    table = keyword_table()
    pairs = [(label_step(s.text, False, table).signal, s.signal) for g in generations for s in g.steps]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def answer_consistency(generations: Iterable[Generation]) -> float | None:
    """Among answers written after a conclusion step: share equal to the last number that step states."""
    checks = []
    for g in generations:
        conclusions = [s.text for s in g.steps if s.signal == CONCLUSION_SIGNAL]
        if conclusions and g.answer is not None and (stated := answers.last_number(conclusions[-1])) is not None:
            checks.append(answers.numbers_equal(g.answer, stated))
    return sum(checks) / len(checks) if checks else None


@torch.no_grad()
def signal_predictions(
    model: ScaffoldStudent, fmt: Formatter, items: Sequence[EvalItem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [boundaries, 7], targets [boundaries]) of the signal head at every step boundary of the items'
    teacher traces (teacher forced): what next-signal accuracy and calibration are computed from."""
    device = next(model.parameters()).device
    probs, targets = [], []
    for item in items:
        if not item.golden_signals:
            continue
        ex = fmt.scaffold(item.doc_id, item.question, item.golden_steps, item.golden_signals)
        signals = input_signal_ids(torch.from_numpy(ex.signal_ids).long()[None].to(device))
        hidden = model.hidden_states(torch.from_numpy(ex.input_ids).long()[None].to(device), None, signals)[0]
        logits = model.signal_head(hidden[torch.from_numpy(ex.signal_positions).long().to(device)]).float()
        probs.append(torch.softmax(logits, -1).cpu())
        targets.append(torch.from_numpy(ex.signal_targets).long())
    if not probs:
        return torch.zeros(0, 7), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(targets)


def next_signal_accuracy(model: ScaffoldStudent, fmt: Formatter, items: Sequence[EvalItem], tau: float) -> dict:
    probs, targets = signal_predictions(model, fmt, items)
    total = len(targets)
    if not total:
        return {"next_signal_acc": None, "next_signal_acc_at_tau": None, "coverage_at_tau": None, "boundaries": 0}
    conf, pred = probs.max(-1)
    hit, sure = pred == targets, conf >= tau
    return {
        "next_signal_acc": float(hit.float().mean()),
        "next_signal_acc_at_tau": float(hit[sure].float().mean()) if sure.any() else None,
        "coverage_at_tau": float(sure.float().mean()),
        "boundaries": total,
    }


def score(
    run: SuiteRun, variant: str, items: Sequence[EvalItem], gens: Sequence[Generation], next_acc: float | None
) -> tuple[ScoreRow, list[SampleRecord]]:
    records = []
    for item, g in zip(items, gens):
        response = "\n\n".join([s.text for s in g.steps] + [g.answer_text])
        # the answer step first (what the model committed to), else anything in the response
        extracted = answers.extract(g.answer_text, item.answer_type, item.choices) or answers.extract(
            response, item.answer_type, item.choices
        )
        records.append(
            SampleRecord(
                item.doc_id,
                variant,
                item.question,
                response,
                extracted,
                item.answer,
                answers.is_correct(extracted, item.answer, item.answer_type),
                [s.signal for s in g.steps],
                g.stopped_by,
                g.new_tokens,
            )
        )
    k, n = sum(r.correct for r in records), len(records)
    lo, hi = wilson_interval(k, n)
    scaffolded = variant not in (BASELINE_VARIANT, BASE_VARIANT)
    row = ScoreRow(
        run.suite.name,
        run.split,
        variant,
        n,
        k / n if n else 0.0,
        lo,
        hi,
        next_acc,
        signal_fidelity(gens) if scaffolded else None,
        answer_consistency(gens) if scaffolded else None,
        sum(len(g.steps) for g in gens) / n if n else 0.0,
        run.config_hash,
    )
    return row, records


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_scaffold(
    model: ScaffoldStudent, fmt: Formatter, items: Sequence[EvalItem], run: SuiteRun, progress: bool = True
) -> tuple[list[ScoreRow], list[SampleRecord]]:
    """Every scaffold variant on the same items. The golden variant needs the teacher's signals: items without them
    are left out of it (and the stage scores only items every variant can answer, so comparisons stay paired)."""
    decoder = ScaffoldDecoder(model, fmt.tokenizer, run.decode, fmt)
    next_acc = next_signal_accuracy(model, fmt, items, run.decode.tau)["next_signal_acc"]
    rows, records = [], []
    for variant in run.variants:
        if variant not in SCAFFOLD_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {SCAFFOLD_VARIANTS}")
        usable = [i for i in items if variant != "golden" or i.golden_signals]
        if not usable:
            continue  # golden signals exist only where the eval set has teacher traces
        rng = random.Random(run.decode.seed)
        gens = []
        for batch in tqdm(list(_batches(usable, run.batch_size)), desc=f"eval {variant}", disable=not progress):
            gens += decoder.generate_batch(
                [i.question for i in batch],
                variant,
                [i.golden_signals for i in batch] if variant == "golden" else None,
                rng,
            )
        row, recs = score(run, variant, usable, gens, next_acc)
        rows.append(row)
        records.extend(recs)
    return rows, records


def evaluate_plain(
    model: ScaffoldStudent,
    fmt: Formatter,
    items: Sequence[EvalItem],
    run: SuiteRun,
    variant: str = BASELINE_VARIANT,
    progress: bool = True,
) -> tuple[list[ScoreRow], list[SampleRecord]]:
    """Plain greedy generation with the same total token budget: the CoT-SFT baseline, or (`base`) the untuned
    backbone."""
    gens = []
    for batch in tqdm(list(_batches(items, run.batch_size)), desc=f"eval {variant}", disable=not progress):
        gens += plain_generate_batch(model, fmt.tokenizer, [i.question for i in batch], run.decode.max_tokens, fmt)
    row, records = score(run, variant, items, gens, None)
    return [row], records


def export_samples(records: Sequence[SampleRecord], path: str | Path) -> Path:
    """Per-sample answers as JSONL in the shape lm-evaluation-harness users know (doc id, prompt, response,
    extracted answer, gold, correct), so our extraction can be cross-checked against theirs. Atomic write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(
                json.dumps(
                    {
                        "doc_id": r.doc_id,
                        "variant": r.variant,
                        "prompt": r.prompt,
                        "response": r.response,
                        "extracted": r.extracted,
                        "gold": r.gold,
                        "correct": r.correct,
                        "stopped_by": r.stopped_by,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    tmp.replace(path)
    return path


class IncomparableScores(ValueError):
    """Score rows of one benchmark were made with different eval configs (see `suite_run`)."""


def _column(row: dict) -> str:
    split = row.get("split")
    return f"{row['benchmark']} ({split})" if row["benchmark"] == HELDOUT and split else row["benchmark"]


def comparison_table_markdown(rows: Sequence[dict]) -> str:
    """The paper's table: a row per variant (base, CoT-SFT, golden / predicted / random signals, summaries-only),
    a column per benchmark, cells Pass@1 with n and the 95 % interval. Refuses to put scores made with different
    eval configs in one column, naming the hashes."""
    by_suite: dict[str, dict[str, dict]] = {}
    for r in rows:
        column = by_suite.setdefault(_column(r), {})
        hashes = {c["eval_config_hash"] for c in column.values()} | {r["eval_config_hash"]}
        if len(hashes) > 1:
            raise IncomparableScores(
                f"{_column(r)}: scores with different eval configs {sorted(hashes)} cannot "
                "share a column; pick one eval_config_hash"
            )
        column[r["variant"]] = r
    suites = sorted(by_suite)
    lines = ["| variant | " + " | ".join(suites) + " |", "|---|" + "---|" * len(suites)]
    for variant in [v for v in TABLE_ROWS if any(v in c for c in by_suite.values())]:
        cells = []
        for suite in suites:
            r = by_suite[suite].get(variant)
            cells.append(
                "–"
                if r is None
                else f"{100 * r['accuracy']:.1f} % (n={r['n']}, {100 * r['ci_low']:.0f}–{100 * r['ci_high']:.0f})"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    hashes = ", ".join(f"{s}: {next(iter(by_suite[s].values()))['eval_config_hash']}" for s in suites)
    return "\n".join(lines + ["", f"Pass@1 (n, 95 % Wilson interval); eval config {hashes}"])


PAIRED = (("predicted", "cot_sft"), ("golden", "predicted"), ("predicted", "random"))


def paired_differences_markdown(correct: dict[str, dict[str, dict[str, bool]]]) -> str:
    """The comparisons that matter, paired over the items both variants answered (suite -> variant -> item ->
    right): the difference with its 95 % bootstrap interval over items, and "not significant" when it contains 0."""
    lines = []
    for suite, by_variant in sorted(correct.items()):
        for a, b in PAIRED:
            if a not in by_variant or b not in by_variant:
                continue
            items = sorted(set(by_variant[a]) & set(by_variant[b]))
            if items:
                c = item_comparison([by_variant[a][i] for i in items], [by_variant[b][i] for i in items])
                lines.append(f"- {suite}: {c.line(a, b)}")
    return "Paired over items:\n\n" + "\n".join(lines) if lines else ""


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


# (header, alignment, cell) of the score table's columns; the Dagster UI shows them as two narrower tables
_KEY_COLUMNS = (
    ("model", "---", lambda r: r.get("model", "")),
    ("suite", "---", _column),
    ("variant", "---", lambda r: r["variant"]),
)
PASS_COLUMNS = (
    *_KEY_COLUMNS,
    ("n", "---:", lambda r: r["n"]),
    (
        "Pass@1 (95 % CI)",
        "---",
        lambda r: f"{_pct(r['accuracy'])} ({100 * r['ci_low']:.0f}–{100 * r['ci_high']:.0f})",
    ),
)
PROCESS_COLUMNS = (
    *_KEY_COLUMNS,
    ("next-signal acc", "---:", lambda r: _pct(r["next_signal_acc"])),
    ("signal fidelity", "---:", lambda r: _pct(r["signal_fidelity"])),
    ("answer consistency", "---:", lambda r: _pct(r["answer_consistency"])),
    ("mean steps", "---:", lambda r: f"{r.get('mean_steps', 0):.1f}"),
)
SCORE_COLUMNS = (*PASS_COLUMNS, *PROCESS_COLUMNS[len(_KEY_COLUMNS) :])


def score_table_markdown(rows: Sequence[dict], columns: Sequence[tuple] = SCORE_COLUMNS) -> str:
    """Markdown table of score rows (dicts with the ScoreRow fields and optionally `model`): every column, or those
    given (`PASS_COLUMNS`, `PROCESS_COLUMNS`)."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "|".join(c[1] for c in columns) + "|"]
    lines += ["| " + " | ".join(str(c[2](r)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
