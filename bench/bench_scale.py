"""The data stages at distillation scale: import -> segment -> label -> pack over an R1-length corpus, end to end,
then a +1 % refresh, against the naive baseline (the code before streaming) measured in the same run.

Corpus (seeded, generated into `--work`, never committed): `--traces` problems with one R1-style trace each, about
60 steps per trace (lognormal), steps of about 35 words that open like reasoning-model paragraphs ("Wait,",
"So", "Let me", "Alternatively", …), the final answer after `</think>`. Problems in one Parquet file, traces in
another; the refresh adds 1 % new problems as a second problem file and rewrites the trace file with their traces
appended (as a growing dump would).

Each implementation runs in its own process, on its own warehouse, through the same driver (`--driver`): the
library's stage functions `build_problems`, `write_traces` (trace import), `segment_traces`, `label_signals` and
`pack_shards` (both arms, a fixed tokenizer: a backbone directory built once, untimed, as a pretrained one would
be). Printed per stage: wall seconds, steps/s and the process' peak RSS during the stage; per run: the peak RSS. The
baseline is the repository at `--baseline-ref` checked out into a git worktree; it runs under a
`--baseline-memory-gb` address-space limit so that running out of memory is reported instead of taking the machine
down.

    .venv/bin/python bench/bench_scale.py [--traces 100000] [--baseline-ref 63fd9c0] [--no-pack]

`--no-pack` stops after labelling: the data stages alone, in a few minutes instead of most of an hour at 100k, to
repeat their figure.

The warehouse settings `SCAFFOLD_DUCKDB_MEMORY` and `SCAFFOLD_DUCKDB_COMPRESSION` pass through to every run (the
header prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPENERS = [
    "Wait,", "So", "Let me", "Alternatively,", "Hmm,", "First,", "Therefore,", "But", "Also,", "For example,",
    "Now", "I think", "In other words,", "Then", "Let's check:", "However,", "Okay,", "That means", "Next,",
]  # fmt: skip


def generate_corpus(work: Path, n: int, seed: int) -> dict:
    """problems.parquet, traces.parquet (n each), problems-new.parquet and traces-refreshed.parquet (+1 %)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)] + ["the", "of", "and", "is", "so", "we", "add", "number"] * 200)
    pool = [" ".join(vocab[rng.integers(0, len(vocab), size=int(k))]) for k in rng.lognormal(3.5, 0.4, 20_000)]
    extra = max(1, n // 100)
    total = n + extra
    answers = rng.integers(1, 10_000, size=total)
    questions = [f"Problem {i}: how many widgets does shop {i % 977} hold after day {i // 977}?" for i in range(total)]
    n_steps = np.clip(rng.lognormal(4.1, 0.35, size=total).astype(int), 15, 200)
    steps_total = 0

    def trace(i: int) -> str:
        nonlocal steps_total
        k = int(n_steps[i])
        steps_total += k + 1
        picks = rng.integers(0, len(pool), size=k)
        openers = rng.integers(0, len(OPENERS), size=k)
        body = "\n\n".join(f"{OPENERS[o]} {pool[p]} {i % 97 + j}." for j, (o, p) in enumerate(zip(openers, picks)))
        return f"<think>\n{body}\n</think>\n\nThe answer is {answers[i]}."

    def problems(lo: int, hi: int) -> pa.Table:
        return pa.table({"question": questions[lo:hi], "answer": [str(a) for a in answers[lo:hi]]})

    pq.write_table(problems(0, n), work / "problems.parquet")
    pq.write_table(problems(n, total), work / "problems-new.parquet")

    def traces(lo: int, hi: int) -> pa.Table:
        return pa.table({"problem": questions[lo:hi], "generation": [trace(i) for i in range(lo, hi)]})

    schema = pa.schema([("problem", pa.string()), ("generation", pa.string())])
    with pq.ParquetWriter(work / "traces.parquet", schema) as dump:
        for lo in range(0, n, 5_000):
            dump.write_table(traces(lo, min(lo + 5_000, n)), row_group_size=1_000)
    # the refreshed dump: the same rows, then the new ones
    old = pq.ParquetFile(work / "traces.parquet")
    with pq.ParquetWriter(work / "traces-refreshed.parquet", schema) as out:
        for group in range(old.num_row_groups):
            out.write_table(old.read_row_group(group), row_group_size=1_000)
        out.write_table(traces(n, total), row_group_size=1_000)
    return {"problems": n, "new_problems": extra, "steps_generated": steps_total}


def build_backbone(work: Path) -> Path:
    """A tiny backbone with a tokenizer trained on a sample of the corpus: fixed from now on, like a pretrained one."""
    import pyarrow.parquet as pq

    from scaffold_lib.student.config import StudentConfig
    from scaffold_lib.student.examples import STEP_SEPARATOR, signal_tags
    from scaffold_lib.student.model import build_embedded_base

    out = work / "backbone"
    if not (out / "config.json").exists():
        sample = pq.ParquetFile(work / "traces.parquet").read_row_group(0).column("generation").to_pylist()
        cfg = StudentConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=4096)  # fmt: skip
        build_embedded_base(cfg, sample, out, [STEP_SEPARATOR, *signal_tags().values()])
    return out


DATA_STAGES = ("problems", "import", "segment", "label")


def driver(home: Path, work: Path, refresh: bool, pack: bool) -> dict:
    """One pass of the data stages and the pack stage through the library at hand (this repository or the
    baseline's); prints a JSON line of timings."""
    from scaffold_lib.core.devices import spread_malloc_arenas

    spread_malloc_arenas()  # as the CLI and Dagster do: the tokenizing speed-up this bench measured
    from scaffold_lib.data.collect import build_problems
    from scaffold_lib.data.config import ProblemsConfig, TeacherConfig
    from scaffold_lib.data.label import label_signals
    from scaffold_lib.data.segment import segment_traces
    from scaffold_lib.data.trace import write_traces
    from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap
    from scaffold_lib.store.store import Store

    store = Store.at(home)
    files = [str(work / "problems.parquet")] + ([str(work / "problems-new.parquet")] if refresh else [])
    # the trace file keeps its name: the refreshed dump replaces it (an importer is identified by its source)
    dump = work / "dump" / "traces.parquet"
    dump.parent.mkdir(exist_ok=True)
    shutil.copy(work / ("traces-refreshed.parquet" if refresh else "traces.parquet"), dump)
    timings, counts, peaks = {}, {}, {}

    def timed(name, fn):
        reset_peak_rss()
        start = time.perf_counter()
        report = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        counts[name] = getattr(report, "new_rows", None)
        peaks[name] = round(peak_rss_gb(), 2)
        return report

    # every problem in train: the pack stage then packs every trace
    problems = ProblemsConfig(source="files", files=files, split={"validation_fraction": 0, "test_fraction": 0})
    timed("problems", lambda: build_problems(store, problems))
    teacher = ImportedTeacher(str(dump), TraceFieldMap(question="problem", thinking="generation"))
    timed("import", lambda: write_traces(store, TeacherConfig(), teacher=teacher))
    timed("segment", lambda: segment_traces(store))
    timed("label", lambda: label_signals(store))
    if pack:  # torch and transformers are imported for packing only: a --no-pack run's peak is the data stages'
        from scaffold_lib.student.config import PackConfig, ShardsConfig, StudentConfig
        from scaffold_lib.student.pack import pack_shards

        student = StudentConfig(base_model=str(work / "backbone"), chat_template=False)
        timed(
            "pack",
            lambda: pack_shards(store, ShardsConfig(pack=PackConfig(row_len=8192), min_fill=0.0), student),
        )
    steps = store.warehouse.scalar("SELECT count(*) FROM segmented_steps")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "timings": timings,
        "new_rows": counts,
        "stage_peak_rss_gb": peaks,
        "steps_total": steps,
        "peak_rss_gb": round(peak, 2),
    }


def reset_peak_rss() -> None:
    """Start a new high-water mark of this process' RSS (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    """This process' RSS high-water mark since the last `reset_peak_rss` (VmHWM, in GB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM in /proc/self/status: per-stage peaks need Linux")


def run_driver(code: Path, home: Path, work: Path, refresh: bool, pack: bool, memory_gb: float | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}

    def limit() -> None:
        if memory_gb:
            cap = int(memory_gb * 1024**3)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", str(home), "--work", str(work)]
    cmd += (["--refresh"] if refresh else []) + ([] if pack else ["--no-pack"])
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, cwd=code, capture_output=True, text=True,
        preexec_fn=limit,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"failed": " | ".join(tail)[-400:], "wall_s": round(wall, 1)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    return result


def worktree(ref: str, work: Path) -> Path:
    path = work / f"baseline-{ref}"
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)  # fmt: skip
    return path


def report(name: str, full: dict, refresh: dict) -> list[str]:
    if "failed" in full:
        return [f"{name}: FAILED after {full['wall_s']} s: {full['failed']}"]
    lines = [f"{name}:"]
    stages_s = sum(full["timings"].values())
    lines.append(
        f"  full run    : {stages_s:8.1f} s in stages ({full['wall_s']} s wall), {full['steps_total']:,} steps, "
        f"{full['steps_total'] / stages_s:,.0f} steps/s end to end, peak RSS {full['peak_rss_gb']} GB"
    )
    lines.append("                " + ", ".join(f"{k} {v} s" for k, v in full["timings"].items()))
    lines.append("  peak RSS    : " + ", ".join(f"{k} {v} GB" for k, v in full["stage_peak_rss_gb"].items()))
    data_s = sum(full["timings"][k] for k in DATA_STAGES)
    lines.append(
        f"  data stages : {data_s:8.1f} s ({' + '.join(DATA_STAGES)}) = {full['steps_total'] / data_s:,.0f} steps/s"
    )
    if "failed" in refresh:
        lines.append(f"  +1 % refresh: FAILED: {refresh['failed']}")
    else:
        again = sum(refresh["timings"].values())
        of = "of the full run" if "pack" in full["timings"] else "of the data stages (no pack: not the goal's ratio)"
        lines.append(
            f"  +1 % refresh: {again:8.1f} s in stages = {again / stages_s:.1%} {of}, peak RSS {refresh['peak_rss_gb']} GB"
        )
        lines.append("                " + ", ".join(f"{k} {v} s" for k, v in refresh["timings"].items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scaffold-bench-scale"))
    parser.add_argument("--baseline-ref", default="63fd9c0", help="the commit before the streaming stages")
    parser.add_argument("--baseline-memory-gb", type=float, default=20.0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-pack", action="store_true", help="stop after labelling (the data stages only)")
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--refresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(driver(args.driver, args.work, args.refresh, not args.no_pack)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    marker = args.work / f"corpus-{args.traces}-{args.seed}.json"
    if not marker.exists():
        started = time.perf_counter()
        info = generate_corpus(args.work, args.traces, args.seed)
        info["seconds"] = round(time.perf_counter() - started, 1)
        marker.write_text(json.dumps(info))
    info = json.loads(marker.read_text())
    build_backbone(args.work)
    size = sum(f.stat().st_size for f in args.work.glob("*.parquet")) / 1024**3
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, SCAFFOLD_DUCKDB_MEMORY="
        f"{os.environ.get('SCAFFOLD_DUCKDB_MEMORY', '(default)')}, SCAFFOLD_DUCKDB_COMPRESSION="
        f"{os.environ.get('SCAFFOLD_DUCKDB_COMPRESSION', '(default: auto)')}"
    )
    print(
        f"corpus: {info['problems']:,} problems with one trace each (+{info['new_problems']:,} for the refresh), "
        f"{info['steps_generated']:,} steps generated, {size:.2f} GB of Parquet (built in {info['seconds']} s, "
        "not timed)"
    )
    runs = {"streaming (this repository)": REPO}
    if not args.skip_baseline:
        runs[f"naive baseline ({args.baseline_ref})"] = worktree(args.baseline_ref, args.work)
    results = {}
    for name, code in runs.items():
        home = args.work / ("home-" + name.split()[0])
        shutil.rmtree(home, ignore_errors=True)
        memory = args.baseline_memory_gb if code != REPO else None
        full = run_driver(code, home, args.work, False, not args.no_pack, memory)
        refresh = (
            run_driver(code, home, args.work, True, not args.no_pack, memory)
            if "failed" not in full
            else {"failed": "skipped"}
        )
        results[name] = (full, refresh)
        print("\n".join(report(name, full, refresh)), flush=True)
    if len(results) == 2:
        (ours, ours_r), (base, base_r) = results.values()
        if "failed" not in ours and "failed" not in base:
            a, b = sum(ours["timings"].values()), sum(base["timings"].values())
            print(f"ratio full run (baseline / streaming): {b / a:.2f}x faster, "
                  f"peak RSS {base['peak_rss_gb'] / ours['peak_rss_gb']:.1f}x lower")  # fmt: skip


if __name__ == "__main__":
    main()
