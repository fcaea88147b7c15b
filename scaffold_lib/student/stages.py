"""The student stages, each one function over the store: packed shards -> a trained student (scaffold or CoT-SFT
baseline), tracked in MLflow, registered, and with its row-level lineage in the warehouse.

Stages pass small handles (`ShardsHandle`, `ModelHandle`: ids, paths, hashes, figures), never models. Files live
under the store's artifacts folder (prepared backbones, shards, checkpoints, students), keyed by content so a retry
or a re-run with the same inputs finds its previous work.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from scaffold_lib.core.devices import pick_device
from scaffold_lib.core.errors import UserError
from scaffold_lib.core.ids import content_id
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.backbones import local_backbone
from scaffold_lib.student.config import EMBEDDED, ShardsConfig, SignalInjection, StudentConfig, TrainConfig
from scaffold_lib.student.examples import (
    FORMAT_FILE,
    STEP_SEPARATOR,
    Formatter,
    false_calculation,
    signal_tags,
    text_format,
    training_corpus,
)
from scaffold_lib.student.model import (
    ScaffoldStudent,
    build_embedded_base,
    load_tokenizer,
    prepare_pretrained_base,
    tokenizer_hash,
)
from scaffold_lib.student.shards import load_rows, pack_rows, write_shards
from scaffold_lib.student.training import TrainResult, full_model_state, init_distributed, train

KINDS = ("scaffold", "baseline")
# a registered student is served by this "model from code" file (named, not imported: serving sits above this layer)
SERVING_MODEL_CODE = Path(__file__).resolve().parent.parent / "serving" / "pyfunc_model.py"
SERVING_DECODE = "decode.json"  # decoding settings a served student uses (read by scaffold_lib.serving.student)
BASELINE_SUFFIX = "-baseline"  # the CoT-SFT baseline is registered as <model name>-baseline


class ShardsHandle(BaseModel):
    """What the shards stage produced: the prepared backbone, its tokenizer, one manifest per arm, and the token
    budget of a step / an answer / a whole trace in the training data (decoding caps come from it)."""

    base_model: str  # local directory of the prepared backbone (tokenizer with the signal tags)
    source_model: str  # what the config named: "embedded", a hub id or a path
    pretrained: bool
    tokenizer_hash: str
    text_format: dict
    manifests: dict[str, str]
    storage: str
    traces: int
    skipped_incomplete: int
    stats: dict[str, dict]
    budget: dict[str, int]
    fill_target: float = 0.0
    excluded_contaminated: int = 0  # training problems left out because they overlap a benchmark
    shard_ids: dict[str, list[str]] = Field(default_factory=dict)
    # how the scaffold student built on these shards adds its signal embedding (student.signal_injection); not part
    # of the shards' identity: every injection trains on the same shards
    signal_injection: SignalInjection = "output"


class ModelHandle(BaseModel):
    """A trained, registered student: where it is in MLflow and on disk, what it was trained on, how it went."""

    model_name: str
    version: str
    kind: str
    mlflow_run_id: str
    mlflow_experiment_id: str = ""
    model_uri: str
    path: str
    manifest_hash: str
    base_model: str
    tokenizer_hash: str
    train_config: dict
    device: str
    world_size: int = 1
    steps: int
    resumed_from: int = 0
    first_loss: float
    final_loss: float  # mean of the last 10 steps (TrainResult.final_loss)
    losses: list[float]
    token_losses: list[float] = Field(default_factory=list)
    signal_losses: list[float] = Field(default_factory=list)
    tokens_per_s: float
    train_tokens: int
    traces: int
    loss_plot: str = ""  # PNG of the loss curves (also logged to the MLflow run)


# --- shards -------------------------------------------------------------------------------------------------------


# characters of steps tokenised and packed together (about 2 M tokens): best-fit decreasing over a window fills rows
# nearly as well as over everything, and memory stays bounded whatever the corpus
PACK_WINDOW_CHARS = 8_000_000
# characters of steps (and of their traces' questions and answers) one query reads and sorts: DuckDB's work per query
# is bounded by this, not by the corpus
READ_PART_CHARS = 64_000_000
BUDGET_SAMPLE = 5_000  # traces whose token lengths set the decoding budget (the first by trace id: a hash order)


def _eligible_traces(drop_contaminated: bool) -> str:
    """SQL for the ids of complete traces (every step labelled) of the splits in `?` (correct ones unless the second
    parameter is true), optionally limited to the problems in the third and without decontaminated problems."""
    contamination = (
        "AND NOT EXISTS (SELECT 1 FROM contamination c WHERE c.problem_id = t.problem_id AND c.action = 'exclude')"
        if drop_contaminated
        else ""
    )
    return f"""
        SELECT t.trace_id FROM teacher_traces t JOIN problems p USING (problem_id)
        WHERE list_contains(?, p.split) AND (t.is_correct OR ?)
          AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], p.problem_id)) {contamination}
          AND t.trace_id IN (
              SELECT s.trace_id FROM segmented_steps s LEFT JOIN signal_labels l USING (step_id)
              GROUP BY s.trace_id HAVING count(*) = count(l.step_id))"""


def _unlabelled_traces(wh: Warehouse, splits: Sequence[str], include_incorrect: bool) -> int:
    return wh.scalar(
        """
        SELECT count(DISTINCT s.trace_id) FROM segmented_steps s LEFT JOIN signal_labels l USING (step_id)
        JOIN teacher_traces t USING (trace_id) JOIN problems p USING (problem_id)
        WHERE l.step_id IS NULL AND list_contains(?, p.split) AND (t.is_correct OR ?)""",
        [list(splits), include_incorrect],
    )


def stream_training_traces(
    wh: Warehouse,
    splits: Sequence[str] = ("train",),
    include_incorrect: bool = False,
    only_problems: Sequence[str] | None = None,
    drop_contaminated: bool = False,
    packed_in: str | None = None,
    window_chars: int = PACK_WINDOW_CHARS,
    part_chars: int = READ_PART_CHARS,
) -> Iterator[list[dict]]:
    """Complete traces with question, ordered steps and signals, in trace-id order, in windows of about
    `window_chars` characters of steps. With `drop_contaminated`, problems decontamination marked for exclusion are
    left out; traces already in the shards of manifest `packed_in` are left out.

    No query sorts the corpus: one plans parts of about `part_chars` characters (consecutive trace ids, sized per
    trace), then one query per part reads its steps in (trace, index) order, so DuckDB sorts one part and Python holds
    one window, whatever the corpus' size."""
    # the plan is a temp table of this call's own cursor (DuckDB keeps temp tables per cursor): calls may interleave
    with wh.session(), wh.connect() as con:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE training_plan AS
            WITH wanted AS (
                SELECT trace_id FROM ({_eligible_traces(drop_contaminated)})
                WHERE trace_id NOT IN (SELECT m.trace_id FROM manifest_shards ms JOIN shard_members m USING (shard_id)
                                       WHERE ms.manifest_hash = ?)),
            sized AS (
                SELECT s.trace_id, s.chars + length(p.question) + length(p.answer) AS chars
                FROM (SELECT trace_id, sum(length(text)) AS chars FROM segmented_steps SEMI JOIN wanted USING (trace_id)
                      GROUP BY trace_id) s
                JOIN teacher_traces t USING (trace_id) JOIN problems p USING (problem_id))
            SELECT trace_id, (sum(chars) OVER (ORDER BY trace_id ROWS UNBOUNDED PRECEDING) - chars) // ? AS part
            FROM sized""",
            [list(splits), include_incorrect, only_problems, only_problems, packed_in or "", max(part_chars, 1)],
        )
        try:
            yield from _windows(_planned_steps(con), window_chars)
        finally:
            con.execute("DROP TABLE IF EXISTS training_plan")


def _planned_steps(con: duckdb.DuckDBPyConnection) -> Iterator[tuple[dict, str, str]]:
    """(the trace's fields, step text, signal) for every step of the traces in `training_plan`, in (trace, index)
    order, a part a query. A trace's fields (its question: often longer than all its steps) are read once per trace,
    not on every step row, so a part's query sorts steps alone and the plan's part size is what DuckDB holds."""
    for (part,) in con.execute("SELECT DISTINCT part FROM training_plan ORDER BY part").fetchall():
        traces = con.execute(
            """SELECT t.trace_id, p.problem_id, p.question, p.answer, p.answer_type, t.is_correct
            FROM training_plan w JOIN teacher_traces t USING (trace_id) JOIN problems p USING (problem_id)
            WHERE w.part = ?""",
            [part],
        )
        names = [d[0] for d in traces.description]
        fields = {r[0]: dict(zip(names, r)) for r in traces.fetchall()}
        reader = con.sql(
            """
            SELECT s.trace_id, s.text, l.signal
            FROM training_plan w JOIN segmented_steps s USING (trace_id) JOIN signal_labels l USING (step_id)
            WHERE w.part = ? ORDER BY s.trace_id, s.idx""",
            params=[part],
        ).to_arrow_reader(8_192)
        for batch in reader:
            columns = (batch.column(c).to_pylist() for c in ("trace_id", "text", "signal"))
            for trace_id, text, signal in zip(*columns):
                yield fields[trace_id], text, signal


def _windows(steps: Iterator[tuple[dict, str, str]], window_chars: int) -> Iterator[list[dict]]:
    """Steps grouped into traces ({trace fields, steps, signals}), yielded in windows of whole traces of at least
    `window_chars` characters of steps (the last may be smaller)."""
    window: list[dict] = []
    chars = 0
    current: dict | None = None
    for fields, text, signal in steps:
        if current is None or fields["trace_id"] != current["trace_id"]:
            if current is not None and chars >= window_chars:
                yield window
                window, chars = [], 0
            current = {**fields, "steps": [], "signals": []}
            window.append(current)
        current["steps"].append(text)
        current["signals"].append(signal)
        chars += len(text)
    if window:
        yield window


def training_traces(
    wh: Warehouse,
    splits: Sequence[str] = ("train",),
    include_incorrect: bool = False,
    only_problems: Sequence[str] | None = None,
    drop_contaminated: bool = False,
) -> tuple[list[dict], int]:
    """(complete traces with question, ordered steps and signals; count of traces skipped because a step has no
    label), all in memory: for held-out sets and tests. The pack stage streams instead."""
    traces = [
        t
        for batch in stream_training_traces(wh, splits, include_incorrect, only_problems, drop_contaminated)
        for t in batch
    ]
    return traces, _unlabelled_traces(wh, splits, include_incorrect)


def prepare_base_model(
    cfg: StudentConfig, corpus: Callable[[], Iterator[str]], artifacts: Path, tags: dict[str, str]
) -> tuple[Path, dict]:
    """(local directory of the backbone, its text format). The embedded default is built once per (config, corpus,
    tags), its tokenizer trained on `corpus()` (streamed twice: hashed, then trained on if new); a pretrained
    backbone gets the step separator and the signal tags as added tokens, once per (model, tags). Every stage after
    this one reads the format from the directory, so pack, train and decode agree."""
    atomic = [STEP_SEPARATOR, *tags.values()]
    if cfg.base_model == EMBEDDED:
        digest = hashlib.sha256()
        for i, text in enumerate(corpus()):
            digest.update(("\x1e" if i else "").encode() + text.encode())
        out = (
            artifacts
            / "base_models"
            / content_id("base", cfg.model_dump(exclude={"signal_injection"}), digest.hexdigest()[:16], atomic)
        )
        if not (out / "config.json").exists():
            build_embedded_base(cfg, corpus(), out, atomic)
        chat = False
    else:
        source = local_backbone(cfg.base_model, artifacts / "imported")  # a GGUF or `package:` becomes a directory
        out = artifacts / "base_models" / content_id("base", cfg.base_model, atomic, _stamp(source), cfg.chat_template)
        if not (out / "config.json").exists():
            prepare_pretrained_base(source, out, atomic)
        has_template = bool(getattr(load_tokenizer(out), "chat_template", None))
        chat = has_template if cfg.chat_template is None else cfg.chat_template
    fmt = {"tags": tags, "chat_template": chat}
    if not (out / FORMAT_FILE).exists():
        (out / FORMAT_FILE).write_text(json.dumps({"format": fmt}, indent=2))
    return out, fmt


def _stamp(base_model: str) -> str:
    """A local backbone's identity includes its weights' size and mtime, so replacing them prepares it anew."""
    path = Path(base_model)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def _p99(lengths: list[int]) -> int:
    return int(np.percentile(lengths, 99)) if lengths else 0


def _previous_manifests(wh: Warehouse, pack_keys: dict[str, str], eligible: str, params: list) -> dict[str, dict]:
    """The latest manifest of each arm's `pack_key`, when both exist, hold the same traces and every one of those is
    still eligible: new traces can then be appended as new shards. Otherwise {} (a full repack)."""
    latest = {}
    for kind, key in pack_keys.items():
        rows = wh.query(
            "SELECT * FROM manifests WHERE pack_key = ? ORDER BY created_at DESC, manifest_hash LIMIT 1", [key]
        )
        if not rows:
            return {}
        latest[kind] = rows[0]
    members = (
        "SELECT m.trace_id FROM manifest_shards ms JOIN shard_members m USING (shard_id) WHERE ms.manifest_hash = ?"
    )
    a, b = (latest[k]["manifest_hash"] for k in KINDS)
    differ = wh.scalar(
        f"SELECT count(*) FROM (({members} EXCEPT {members}) UNION ALL ({members} EXCEPT {members}))", [a, b, b, a]
    )
    stale = wh.scalar(f"SELECT count(*) FROM ({members}) WHERE trace_id NOT IN ({eligible})", [a, *params])
    return latest if differ == 0 and stale == 0 else {}


def pack_shards(store: Store, cfg: ShardsConfig, student: StudentConfig, run_id: str | None = None) -> ShardsHandle:
    """Correct training traces in the scaffold format (and plain CoT for the baseline), best-fit-decreasing packed into
    fixed-length rows with per-example position ids, written as Parquet shards with a manifest per arm.

    Streamed: traces are read, tokenised once for both arms and packed a window (`PACK_WINDOW_CHARS`) at a time. Incremental: when the
    tokenizer and the packing settings are those of the last manifests and every trace in them is still a training
    trace, only the new traces are packed, into new shards appended to them (a changed tokenizer or a removed trace
    repacks everything)."""
    with store.warehouse.session():
        return _pack_shards(store, cfg, student, run_id)


def _pack_shards(store: Store, cfg: ShardsConfig, student: StudentConfig, run_id: str | None) -> ShardsHandle:
    wh = store.warehouse
    eligible = _eligible_traces(drop_contaminated=True)
    params = [["train"], cfg.include_incorrect, None, None]
    traces = wh.scalar(f"SELECT count(*) FROM ({eligible})", params)
    if not traces:
        raise ValueError(
            "no labelled training traces in the warehouse: run the data stages first (problems, "
            "teacher_traces, segmented_steps, signal_labels)"
        )
    excluded = wh.scalar(
        "SELECT count(DISTINCT c.problem_id) FROM contamination c JOIN problems p USING (problem_id) "
        "WHERE c.action = 'exclude' AND p.split = 'train'"
    )
    tags = signal_tags()

    def corpus() -> Iterator[str]:
        for batch in stream_training_traces(wh, ("train",), cfg.include_incorrect, drop_contaminated=True):
            yield from (training_corpus(t["question"], t["steps"], t["signals"], tags) for t in batch)

    base, fmt = prepare_base_model(student, corpus, store.artifacts, tags)
    tokenizer = load_tokenizer(base)
    tok_hash = tokenizer_hash(tokenizer)
    formatter = Formatter(tokenizer, tags, fmt["chat_template"])
    storage = cfg.storage_url.rstrip("/") if cfg.storage_url else str(store.artifacts / "shards")
    pack_keys = {k: pack_key(k, tok_hash, fmt, cfg) for k in KINDS}
    previous = _previous_manifests(wh, pack_keys, eligible, params)
    shard_ids = {
        k: [
            r["shard_id"]
            for r in wh.query("SELECT shard_id FROM manifest_shards WHERE manifest_hash = ?", [m["manifest_hash"]])
        ]
        for k, m in previous.items()
    } or {k: [] for k in KINDS}
    infos: dict[str, list] = {k: [] for k in KINDS}
    split, dropped = Counter(), Counter()
    lengths: dict[str, list[int]] = {"step": [], "answer": [], "reply": [], "steps": []}
    packed_before = previous["scaffold"]["traces"] if previous else 0
    new_traces = masked_steps = excluded_traces = 0
    with tqdm(total=traces - packed_before, unit="trace", desc="packing", disable=None) as bar:
        for batch in stream_training_traces(
            wh,
            ("train",),
            cfg.include_incorrect,
            drop_contaminated=True,
            packed_in=previous["scaffold"]["manifest_hash"] if previous else None,
        ):
            offered = len(batch)
            wrong = [[false_calculation(s) for s in t["steps"]] for t in batch]
            if cfg.wrong_arithmetic == "exclude":
                batch, wrong = [t for t, w in zip(batch, wrong) if not any(w)], [w for w in wrong if not any(w)]
                excluded_traces += offered - len(batch)
            elif cfg.wrong_arithmetic == "mask":
                masked_steps += sum(map(sum, wrong))
            masks = wrong if cfg.wrong_arithmetic == "mask" else [None] * len(batch)
            encoded = formatter.encode([(t["question"], t["steps"]) for t in batch])
            for kind in KINDS:  # one arm's examples at a time: packed rows copy them, so they are freed after
                examples = [
                    formatter.build(t["trace_id"], q, ids, t["signals"] if kind == "scaffold" else None, m)
                    for t, (q, ids), m in zip(batch, encoded, masks)
                ]
                if kind == "scaffold" and len(lengths["reply"]) < BUDGET_SAMPLE:
                    add_lengths(lengths, [ids for _, ids in encoded], examples)
                rows, stats = pack_rows(examples, cfg.pack)
                del examples
                written, _ = write_shards(rows, f"{storage}/{kind}", kind, tok_hash, cfg.pack)
                del rows
                wh.insert_new(
                    "shard_members",
                    [{"shard_id": i.shard_id, "trace_id": t} for i in written for t in i.trace_ids],
                    run_id,
                )
                infos[kind] += written
                split[kind] += stats.split_examples
                dropped[kind] += stats.dropped_examples
            new_traces += len(batch)
            bar.update(offered)
    before = json.loads(previous["scaffold"]["budget_json"]) if previous else {}
    now = token_budget(lengths) if lengths["reply"] else {}
    # appended: the caps only grow (the p99 of the new traces against the earlier p99)
    budget = {k: max(now.get(k, 0), before.get(k, 0)) for k in sorted({*now, *before})}
    handle = ShardsHandle(
        base_model=str(base),
        source_model=student.base_model,
        pretrained=student.base_model != EMBEDDED,
        tokenizer_hash=tok_hash,
        text_format=fmt,
        manifests={},
        storage=storage,
        traces=packed_before + new_traces,
        skipped_incomplete=_unlabelled_traces(wh, ("train",), cfg.include_incorrect),
        stats={},
        budget=budget,
        fill_target=cfg.min_fill,
        excluded_contaminated=excluded,
        signal_injection=student.signal_injection,
    )
    for kind in KINDS:
        ids = shard_ids[kind] + [i.shard_id for i in infos[kind]]
        manifest = content_id("manifest", sorted(ids))
        wh.insert_new("shards", [i.as_row(manifest) for i in infos[kind]], run_id)
        parent = previous.get(kind, {})
        record = {
            "manifest_hash": manifest,
            "kind": kind,
            "pack_key": pack_keys[kind],
            "parent": parent.get("manifest_hash"),
            "traces": packed_before + new_traces,
            "split_examples": parent.get("split_examples", 0) + split[kind],
            "dropped_examples": parent.get("dropped_examples", 0) + dropped[kind],
            "masked_steps": (parent.get("masked_steps") or 0) + masked_steps,
            "excluded_traces": (parent.get("excluded_traces") or 0) + excluded_traces,
            "budget_json": json.dumps(budget),
        }
        if manifest != parent.get("manifest_hash"):
            wh.insert_new("manifests", [record], run_id)
            wh.insert_new("manifest_shards", [{"manifest_hash": manifest, "shard_id": i} for i in ids], run_id)
        else:
            record = parent
        totals = wh.query(
            "SELECT sum(s.n_rows) AS rows, sum(s.tokens) AS tokens "
            "FROM manifest_shards ms JOIN shards s USING (shard_id) WHERE ms.manifest_hash = ?",
            [manifest],
        )[0]
        handle.manifests[kind] = manifest
        handle.shard_ids[kind] = ids
        handle.stats[kind] = {
            "examples": record["traces"],
            "rows": totals["rows"],
            "tokens": totals["tokens"],
            "fill_ratio": round(totals["tokens"] / (totals["rows"] * cfg.pack.row_len), 5),
            "split_examples": record["split_examples"],
            "dropped_examples": record["dropped_examples"],
            "wrong_arithmetic": cfg.wrong_arithmetic,
            "masked_steps": record.get("masked_steps") or 0,
            "excluded_traces": record.get("excluded_traces") or 0,
            "appended_traces": new_traces if previous else 0,
            "appended_to": parent.get("manifest_hash"),
        }
    return handle


def pack_key(kind: str, tok_hash: str, fmt: dict, cfg: ShardsConfig) -> str:
    """What makes two packings of the same traces the same shards: a change of any of these repacks everything."""
    return content_id("pack", kind, tok_hash, fmt, cfg.pack.model_dump(), cfg.include_incorrect, cfg.wrong_arithmetic)


def add_lengths(lengths: dict[str, list[int]], step_ids: list[list[list[int]]], examples: list) -> None:
    """Token lengths of steps, answer steps, whole replies and step counts (tags and separators included)."""
    for ids, e in zip(step_ids, examples):
        lengths["step"] += [len(i) + 2 for i in ids[:-1]]
        lengths["answer"].append(len(ids[-1]) + 2)
        lengths["reply"].append(len(e.input_ids) - int((e.labels == -100).sum()) + 1)
        lengths["steps"].append(len(ids))


def token_budget(lengths: dict[str, list[int]]) -> dict[str, int]:
    """99th percentiles of the training data's step, answer-step and whole-reply lengths in tokens: decoding caps
    for both arms come from these, so neither is cut off where the teacher was not."""
    return {
        "step_tokens_p99": _p99(lengths["step"]),
        "answer_tokens_p99": _p99(lengths["answer"]),
        "reply_tokens_p99": _p99(lengths["reply"]),
        "steps_p99": _p99(lengths["steps"]),
    }


def shards_of_manifest(wh: Warehouse, manifest_hash: str) -> list[dict]:
    """The shards of a manifest: those it was written with and those it took over from the one it appended to."""
    return wh.query(
        """
        SELECT * FROM shards WHERE manifest_hash = ?
           OR shard_id IN (SELECT shard_id FROM manifest_shards WHERE manifest_hash = ?)
        ORDER BY path""",
        [manifest_hash, manifest_hash],
    )


# --- training -----------------------------------------------------------------------------------------------------


class ShardTokenizerMismatch(UserError):
    """Shards tokenised with one tokenizer met a model with another."""


@dataclass
class TrainedStudent:
    path: str
    kind: str
    manifest_hash: str
    shard_ids: list[str]
    result: TrainResult
    config: dict
    world_size: int = 1


def check_shards_fit(wh: Warehouse, manifest_hash: str, base_model: str) -> list[dict]:
    """The shards of a manifest, after checking they were tokenised with the backbone's tokenizer."""
    shards = shards_of_manifest(wh, manifest_hash)
    if not shards:
        raise ValueError(f"no shards with manifest {manifest_hash}: run the pack stage first")
    model_hash = tokenizer_hash(load_tokenizer(base_model))
    shard_hashes = {s["tokenizer_hash"] for s in shards}
    if shard_hashes != {model_hash}:
        raise ShardTokenizerMismatch(
            f"shards of manifest {manifest_hash} were tokenised with tokenizer {sorted(shard_hashes)} but the backbone "
            f"{base_model} has tokenizer {model_hash}: repack the shards for this backbone (the pack stage with "
            "student.base_model set to it)"
        )
    return shards


def student_key(cfg: TrainConfig, base_model: str, manifest_hash: str, injection: SignalInjection) -> str:
    """The identity of a training run (its checkpoints and student directory): the baseline has no injection, and a
    scaffold student with the original `output` injection keeps the key it had before the setting existed."""
    extra = [injection] if cfg.kind == "scaffold" and injection != "output" else []
    return content_id("student", cfg.kind, base_model, manifest_hash, cfg.model_dump(), *extra)


def fit_student(
    wh: Warehouse,
    artifacts: str | Path,
    base_model: str,
    manifest_hash: str,
    cfg: TrainConfig,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    injection: SignalInjection = "output",
) -> TrainedStudent:
    """Train on the shards of one manifest (this process, or one rank under torchrun); checkpoints are keyed by (base,
    manifest, config), so a retried run resumes where the killed one stopped. Writes the student directory; no
    registry or warehouse writes (the stage does those, in one process)."""
    artifacts = Path(artifacts)
    shards = check_shards_fit(wh, manifest_hash, base_model)
    key = student_key(cfg, base_model, manifest_hash, injection)
    data = load_rows([s["path"] for s in shards])
    torch.manual_seed(cfg.seed)  # the new signal head and embedding: the same seed gives the same student
    model = ScaffoldStudent.from_pretrained(
        base_model,
        kind=cfg.kind,
        injection=injection,
        **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
    )
    result = train(model, data, cfg, checkpoint_dir=artifacts / "checkpoints" / key, on_log=on_log, progress=progress)
    out = artifacts / "students" / key
    dist = init_distributed(pick_device(cfg.device))
    if cfg.fsdp and dist.world > 1:  # gather the shards; rank 0 saves them as a plain student
        state = full_model_state(model, sharded=True)
        if dist.is_main:
            model = ScaffoldStudent.from_pretrained(base_model, kind=cfg.kind, injection=injection)
            model.load_state_dict(state)
    if dist.is_main:  # under torchrun every rank holds the same weights: one writes them
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, load_tokenizer(base_model), text_format(base_model))
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "train_config": cfg.model_dump(),
                    "manifest_hash": manifest_hash,
                    "base_model": base_model,
                    "final_loss": result.final_loss,
                    "world_size": dist.world,
                    "result": asdict(result),
                },
                indent=2,
            )
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    dist.barrier()
    return TrainedStudent(
        str(out), cfg.kind, manifest_hash, [s["shard_id"] for s in shards], result, cfg.model_dump(), dist.world
    )


def loss_plot(result: TrainResult, kind: str, path: Path) -> Path:
    """The loss curves of a training run as a small PNG (total, token and, for the scaffold student, signal loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(result.losses) + 1)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    ax.plot(steps, result.losses, label="loss")
    if kind == "scaffold" and result.signal_losses and any(result.signal_losses):
        ax.plot(steps, result.token_losses, label="token loss", alpha=0.7)
        ax.plot(steps, result.signal_losses, label="signal loss", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{kind} training")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def torchrun_command(job_file: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "scaffold_lib.student.launch",
        str(job_file),
    ]


RunCommand = Callable[[list[str], dict[str, str]], None]


def _run_subprocess(command: list[str], env: dict[str, str]) -> None:
    import os

    subprocess.run(command, env={**os.environ, **env}, check=True)


def fit_under_torchrun(
    store: Store,
    base_model: str,
    manifest_hash: str,
    cfg: TrainConfig,
    run_command: RunCommand | None = None,
    injection: SignalInjection = "output",
) -> TrainedStudent:
    """Train under `torchrun` (DDP, or FSDP with `cfg.fsdp`): writes the job file, runs the command (`run_command`:
    Dagster passes one that streams the ranks' logs through Pipes), then reads what rank 0 wrote."""
    from scaffold_lib.student.launch import LaunchJob

    job = LaunchJob(
        warehouse=str(store.warehouse_path),
        artifacts=str(store.artifacts),
        base_model=base_model,
        manifest_hash=manifest_hash,
        train=cfg,
        signal_injection=injection,
    )
    job_file = store.artifacts / "launch" / f"{content_id('launch', job.model_dump())}.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(job.model_dump_json())
    env = {"OMP_NUM_THREADS": "1"} if cfg.device != "cuda" and not torch.cuda.is_available() else {}
    (run_command or _run_subprocess)(torchrun_command(job_file, cfg.nproc), env)
    key = student_key(cfg, base_model, manifest_hash, injection)
    student = store.artifacts / "students" / key
    record = json.loads((student / "training.json").read_text())
    shards = shards_of_manifest(store.warehouse, manifest_hash)
    return TrainedStudent(
        str(student),
        cfg.kind,
        manifest_hash,
        [s["shard_id"] for s in shards],
        TrainResult(**record["result"]),
        cfg.model_dump(),
        record["world_size"],
    )


def train_model(
    store: Store,
    shards: ShardsHandle,
    cfg: TrainConfig,
    kind: str,
    run_id: str | None = None,
    *,
    on_log: Callable[[int, dict], None] | None = None,
    run_command: RunCommand | None = None,
    tags: dict[str, str] | None = None,
    serving_decode: dict | None = None,
    progress: bool = True,
) -> ModelHandle:
    """The whole training stage for one arm: an MLflow run opened before training (metrics logged as the steps
    happen), the fit (in process or under torchrun), the student registered as a new version with alias
    `challenger` (an MLflow pyfunc model that `mlflow models serve` serves, with `serving_decode` as its decoding
    settings), and its lineage (version -> shards) in the warehouse."""
    from scaffold_lib.store import registry

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = cfg.model_copy(update={"kind": kind}).for_rows(shards.stats[kind]["rows"]).resolved(shards.pretrained)
    device = str(pick_device(cfg.device))
    manifest = shards.manifests[kind]
    shard_rows = check_shards_fit(store.warehouse, manifest, shards.base_model)
    reg = store.registry
    name = reg.model_name if kind == "scaffold" else reg.model_name + BASELINE_SUFFIX
    tags = {"manifest_hash": manifest, "kind": kind, **(tags or {})}
    mlflow_run = registry.start_run(
        reg,
        f"{kind}-{manifest[:8]}",
        tags=tags,
        params={
            "train": cfg.model_dump(),
            "base_model": shards.source_model,
            **({"signal_injection": shards.signal_injection} if kind == "scaffold" else {}),
            "manifest_hash": manifest,
            "tokenizer_hash": shards.tokenizer_hash,
            **({"dagster_run_id": run_id} if run_id else {}),
        },
        dataset={
            "name": f"{kind}-shards",
            "digest": manifest,
            "source": f"{shards.storage}/{kind}",
            "rows": shards.stats[kind]["rows"],
            "tokens": shards.stats[kind]["tokens"],
            "traces": shards.traces,
        },
    )

    def log(step: int, metrics: dict) -> None:
        registry.log_metrics(reg, mlflow_run, step, metrics)
        if on_log is not None:
            on_log(step, metrics)

    try:
        if cfg.launcher == "torchrun":
            trained = fit_under_torchrun(store, shards.base_model, manifest, cfg, run_command, shards.signal_injection)
            for step, loss in enumerate(trained.result.losses, start=1):  # the ranks do not write MLflow
                registry.log_metrics(reg, mlflow_run, step, {"loss": loss})
        else:
            trained = fit_student(
                store.warehouse,
                store.artifacts,
                shards.base_model,
                manifest,
                cfg,
                log,
                progress,
                shards.signal_injection,
            )
        result = trained.result
        if not result.losses or not all(math.isfinite(x) for x in result.losses):
            raise FloatingPointError(f"training {kind} produced no finite loss")
        description = (
            f"{kind} student trained {cfg.max_steps} steps on {shards.traces} traces (manifest {manifest}); "
            f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}"
        )
        if serving_decode is not None:
            (Path(trained.path) / SERVING_DECODE).write_text(json.dumps(serving_decode, indent=2))
        plot = loss_plot(result, kind, store.artifacts / "plots" / f"{mlflow_run}.png")
        registry.client(reg).log_artifact(mlflow_run, str(plot))
        version = registry.register_model(
            reg,
            mlflow_run,
            trained.path,
            name=name,
            tags={**tags, **({"dagster_run_id": run_id} if run_id else {})},
            description=description,
            model_code=SERVING_MODEL_CODE,
        )
    except BaseException:
        registry.finish_run(reg, mlflow_run, failed=True)
        raise
    registry.finish_run(reg, mlflow_run)
    wh = store.warehouse
    wh.insert_new(
        "model_versions",
        [
            {
                "model_name": name,
                "version": version,
                "kind": kind,
                "mlflow_run_id": mlflow_run,
                "manifest_hash": manifest,
                "config_json": json.dumps(cfg.model_dump()),
                "final_loss": result.final_loss,
            }
        ],
        run_id,
    )
    wh.insert_new(
        "model_shards",
        [{"model_name": name, "version": version, "shard_id": s["shard_id"]} for s in shard_rows],
        run_id,
    )
    return ModelHandle(
        mlflow_experiment_id=registry.experiment_id(reg),
        loss_plot=str(plot),
        model_name=name,
        version=version,
        kind=kind,
        mlflow_run_id=mlflow_run,
        model_uri=f"models:/{name}/{version}",
        path=trained.path,
        manifest_hash=manifest,
        base_model=shards.base_model,
        tokenizer_hash=shards.tokenizer_hash,
        train_config=cfg.model_dump(),
        device=device,
        world_size=trained.world_size,
        steps=cfg.max_steps,
        resumed_from=result.resumed_from,
        first_loss=result.losses[0],
        final_loss=result.final_loss,
        losses=result.losses,
        token_losses=result.token_losses,
        signal_losses=result.signal_losses,
        tokens_per_s=result.tokens_per_s,
        train_tokens=result.train_tokens,
        traces=shards.traces,
    )
