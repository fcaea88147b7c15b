"""Throughput of segmentation + keyword labelling (single process), against a naive baseline in the same run.

Corpus: traces written by the programmatic teacher over the synthetic problems (several teacher seeds, so
openings and texts vary), until the traces hold at least `--steps` steps. Timed, each over every trace:
- `segment` + `label_steps`, trace by trace, as `scaffold label` and the evaluation's fidelity metric use them;
- `segment_batch` + `label_column` over Arrow columns (batches of 2,000 traces), as the `segmented_steps` /
  `signal_labels` stages run them (step ids included, which the scalar path does not compute).

Baseline ("naive"): a straightforward implementation of the same job, split on a blank-line regex, strip,
then lower-case each step and try every keyword (longest first) with `str.startswith` plus a regex
word-boundary check.

    .venv/bin/python bench/bench_segment_label.py [--steps N]
"""

from __future__ import annotations

import argparse
import platform
import re
import string
import sys
import time

import numpy as np
import pyarrow as pa

from scaffold_lib.data.label_stats import LabelStats
from scaffold_lib.data.segmentation import segment, segment_batch
from scaffold_lib.data.signals import KeywordLabellerConfig, keyword_table, label_column, label_steps
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher, ProgrammaticTeacherConfig

TARGET_STEPS_PER_S = 200_000


def build_traces(n_steps: int, seed: int = 0) -> tuple[list[str], int]:
    """Teacher traces holding at least `n_steps` steps (by `segment`), and their step count."""
    n_problems = max(10, min(25_000, n_steps // 8 + 1))
    problems = generate_problems(GeneratorConfig(n_problems=n_problems, seed=seed))
    traces: list[str] = []
    steps = 0
    teacher_seed = 0
    while steps < n_steps:
        teacher = ProgrammaticTeacher(ProgrammaticTeacherConfig(seed=teacher_seed))
        for trace in teacher.generate(problems).traces:
            traces.append(trace.text)
            steps += len(segment(trace.text))
            if steps >= n_steps:
                break
        teacher_seed += 1
    return traces, steps


class NaiveLabeller:
    """The obvious way: lower-case, then every keyword in turn with startswith + a word-boundary regex."""

    _blank = re.compile(r"\n\s*\n")
    _boundary = re.compile(r"(?![\w'])")
    _lead = string.punctuation + "“”‘’«» \t"

    def __init__(self) -> None:
        table = keyword_table()
        # lower-cased original keywords, longest first; "**answer:**" is matched without its markup
        keywords = {}
        for signal, original in table.by_words.values():
            keywords[original.lower().strip(string.punctuation)] = signal
        self.keywords = sorted(keywords.items(), key=lambda kv: -len(kv[0]))

    def segment(self, text: str) -> list[str]:
        text = text.replace("\r\n", "\n")
        return [p.strip() for p in self._blank.split(text) if p.strip()]

    def label(self, step: str, is_final: bool) -> tuple[str, str]:
        low = step.lower().lstrip(self._lead)
        for keyword, signal in self.keywords:
            if low.startswith(keyword) and self._boundary.match(low, len(keyword)):
                if is_final and signal != "response_generation":
                    break
                return signal, "keyword"
        if is_final:
            return "response_generation", "final_step"
        return "reasoning_analysis", "fallback"

    def run(self, traces: list[str]) -> list[tuple[str, str]]:
        out = []
        for trace in traces:
            steps = self.segment(trace)
            last = len(steps) - 1
            out.extend(self.label(s, i == last) for i, s in enumerate(steps))
        return out


def run_ours(traces: list[str]) -> tuple[list, float, LabelStats]:
    config = KeywordLabellerConfig()
    keyword_table(config.keywords_path)  # load the keyword file outside the timed loop (it is cached)
    stats = LabelStats()
    labels = []
    start = time.perf_counter()
    for trace in traces:
        labels.extend(label_steps(segment(trace), config))
    elapsed = time.perf_counter() - start
    for label in labels:
        stats.add(label)
    return labels, elapsed, stats


def run_batches(traces: list[str], batch: int = 2_000) -> tuple[int, float]:
    """The stages' path: Arrow batches of traces in, steps and labels out (final step = last of each trace)."""
    table = keyword_table()
    columns = [
        pa.table(
            {"trace_id": [f"t{i}" for i in range(lo, min(lo + batch, len(traces)))], "text": traces[lo : lo + batch]}
        )
        for lo in range(0, len(traces), batch)
    ]
    steps = 0
    start = time.perf_counter()
    for traces_batch in columns:
        cut = segment_batch(traces_batch)
        idx = cut.column("idx").to_numpy()
        is_final = pa.array(np.r_[idx[1:] == 0, True])  # a trace's last step: the next row starts a trace
        label_column(cut.column("text"), is_final, table)
        steps += cut.num_rows
    return steps, time.perf_counter() - start


def run_naive(traces: list[str]) -> tuple[list, float]:
    naive = NaiveLabeller()
    start = time.perf_counter()
    labels = naive.run(traces)
    return labels, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps in the corpus (default 1,000,000)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    t0 = time.perf_counter()
    traces, n_steps = build_traces(args.steps)
    chars = sum(len(t) for t in traces)
    print(f"python {platform.python_version()} on {platform.machine()}, single process")
    print(
        f"corpus: {len(traces):,} teacher traces, {n_steps:,} steps, {chars / 1e6:.1f} M characters "
        f"(built in {time.perf_counter() - t0:.1f} s, not timed)"
    )

    ours, ours_s, stats = run_ours(traces)
    batch_steps, batch_s = run_batches(traces)
    naive, naive_s = run_naive(traces)
    ours_steps, naive_steps = len(ours), len(naive)
    ours_rate, naive_rate = ours_steps / ours_s, naive_steps / naive_s
    print(f"segment + label_steps : {ours_steps:,} steps in {ours_s:.2f} s = {ours_rate:,.0f} steps/s")
    print(f"batches (the stages)  : {batch_steps:,} steps in {batch_s:.2f} s = {batch_steps / batch_s:,.0f} steps/s")
    print(f"naive baseline        : {naive_steps:,} steps in {naive_s:.2f} s = {naive_rate:,.0f} steps/s")
    print(
        f"ratio (ours / naive)  : {ours_rate / naive_rate:.2f}x scalar, {batch_steps / batch_s / naive_rate:.2f}x batches"
    )
    agree = sum(a.signal == b[0] for a, b in zip(ours, naive)) / max(1, min(ours_steps, naive_steps))
    print(
        f"keyword coverage {stats.keyword_coverage:.1%}, fallback share {stats.fallback_share:.1%}; "
        f"baseline gives the same signal on {agree:.2%} of steps"
    )
    met = ours_rate >= TARGET_STEPS_PER_S
    print(f"target >= {TARGET_STEPS_PER_S:,} steps/s: {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
