"""The student stages over the warehouse: packed shards -> trained students -> benchmark scores.

Shared by the Dagster assets and the `scaffold` CLI. Files live under an artifacts root (by default
$DAGSTER_HOME/artifacts): base models, shards, checkpoints and trained students, each keyed by content so a
retry or a re-run with the same inputs finds its previous work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, Field

from scaffold_lib.evaluation.metrics import EvalItem
from scaffold_lib.student.examples import STEP_SEPARATOR, Formatter, signal_tags, training_corpus
from scaffold_lib.core.ids import content_id
from scaffold_lib.student.model import EMBEDDED, ScaffoldStudent, StudentConfig, build_embedded_base, load_tokenizer, tokenizer_hash
from scaffold_lib.student.shards import PackConfig, ShardInfo, load_rows, pack_rows, write_shards
from scaffold_lib.student.training import TrainConfig, TrainResult, full_model_state, init_distributed, pick_device, train
from scaffold_lib.store.warehouse import Warehouse

KINDS = ("scaffold", "baseline")


class ShardsConfig(BaseModel):
    student: StudentConfig = Field(default_factory=StudentConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    include_incorrect: bool = Field(False, description="train on traces whose answer is wrong too")
    storage_url: str | None = Field(None, description="where shards go: a folder or an fsspec URL (s3://bucket/"
                                                      "shards, with s3fs installed); default <artifacts>/shards")


@dataclass
class ShardsReport:
    base_model: str
    tokenizer_hash: str
    traces: int
    skipped_incomplete: int
    manifests: dict[str, str] = field(default_factory=dict)  # kind -> manifest hash
    shards: dict[str, list[ShardInfo]] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)


def training_traces(wh: Warehouse, split: str = "train", include_incorrect: bool = False) -> tuple[list[dict], int]:
    """(traces with question, ordered steps and signals; count of traces skipped because a step has no label)."""
    rows = wh.query("""
        SELECT t.trace_id, p.problem_id, p.question, p.answer, p.answer_type,
               list(s.text ORDER BY s.idx) AS steps, list(l.signal ORDER BY s.idx) AS signals,
               count(*) AS n_steps, count(l.step_id) AS n_labelled
        FROM teacher_traces t
        JOIN problems p USING (problem_id)
        JOIN segmented_steps s USING (trace_id)
        LEFT JOIN signal_labels l USING (step_id)
        WHERE p.split = ? AND (t.is_correct OR ?)
        GROUP BY ALL ORDER BY t.trace_id""", [split, include_incorrect])
    complete = [r for r in rows if r["n_steps"] == r["n_labelled"]]
    return complete, len(rows) - len(complete)


def prepare_base_model(cfg: StudentConfig, corpus: list[str], artifacts: Path, tags: dict[str, str]) -> str:
    """Path or hub id of the backbone: the embedded default is built once per (config, corpus, tags)."""
    if cfg.base_model != EMBEDDED:
        return cfg.base_model
    atomic = [STEP_SEPARATOR, *tags.values()]
    corpus_hash = hashlib.sha256("\x1e".join(corpus).encode()).hexdigest()[:16]
    out = artifacts / "base_models" / content_id("base", cfg.model_dump(), corpus_hash, atomic)
    if not (out / "config.json").exists():
        build_embedded_base(cfg, corpus, out, atomic)
    return str(out)


def build_packed_shards(wh: Warehouse, artifacts: str | Path, cfg: ShardsConfig = ShardsConfig(),
                        run_id: str | None = None) -> ShardsReport:
    artifacts = Path(artifacts)
    traces, skipped = training_traces(wh, "train", cfg.include_incorrect)
    if not traces:
        raise ValueError("no labelled training traces in the warehouse: materialise signal_labels first")
    tags = signal_tags()
    corpus = [training_corpus(t["question"], t["steps"], t["signals"], tags) for t in traces]
    base = prepare_base_model(cfg.student, corpus, artifacts, tags)
    tokenizer = load_tokenizer(base)
    tok_hash = tokenizer_hash(tokenizer)
    fmt = Formatter(tokenizer, tags)
    report = ShardsReport(base, tok_hash, len(traces), skipped)
    for kind in KINDS:
        examples = [fmt.scaffold(t["trace_id"], t["question"], t["steps"], t["signals"]) if kind == "scaffold"
                    else fmt.baseline(t["trace_id"], t["question"], t["steps"]) for t in traces]
        rows, stats = pack_rows(examples, cfg.pack)
        root = f"{cfg.storage_url.rstrip('/')}/{kind}" if cfg.storage_url else artifacts / "shards" / kind
        infos, manifest = write_shards(rows, root, kind, tok_hash, cfg.pack)
        wh.insert_new("shards", [i.as_row(manifest) for i in infos], run_id)
        wh.insert_new("shard_members", [{"shard_id": i.shard_id, "trace_id": t} for i in infos for t in i.trace_ids],
                      run_id)
        report.manifests[kind], report.shards[kind] = manifest, infos
        report.stats[kind] = {"examples": stats.examples, "rows": stats.rows, "tokens": stats.tokens,
                              "fill_ratio": round(stats.fill_ratio, 5), "split_examples": stats.split_examples,
                              "dropped_examples": stats.dropped_examples}
    return report


def shards_of_manifest(wh: Warehouse, manifest_hash: str) -> list[dict]:
    return wh.query("SELECT * FROM shards WHERE manifest_hash = ? ORDER BY path", [manifest_hash])


@dataclass
class TrainedStudent:
    path: str
    kind: str
    manifest_hash: str
    shard_ids: list[str]
    result: TrainResult
    config: dict


def train_student(wh: Warehouse, artifacts: str | Path, base_model: str, manifest_hash: str, cfg: TrainConfig,
                  on_log: Callable[[int, dict], None] | None = None, progress: bool = True) -> TrainedStudent:
    """Train on the shards of one manifest; checkpoints are keyed by (base, manifest, config), so a retried
    run resumes where the killed one stopped."""
    artifacts = Path(artifacts)
    shards = shards_of_manifest(wh, manifest_hash)
    if not shards:
        raise ValueError(f"no shards with manifest {manifest_hash}: materialise packed_shards first")
    key = content_id("student", cfg.kind, base_model, manifest_hash, cfg.model_dump())
    data = load_rows([s["path"] for s in shards])
    torch.manual_seed(cfg.seed)  # the new signal head and embedding: the same seed gives the same student
    model = ScaffoldStudent.from_pretrained(base_model, kind=cfg.kind, **(
        {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}))
    result = train(model, data, cfg, checkpoint_dir=artifacts / "checkpoints" / key, on_log=on_log, progress=progress)
    out = artifacts / "students" / key
    dist = init_distributed(pick_device(cfg.device))
    if cfg.fsdp and dist.world > 1:  # gather the shards; rank 0 saves them as a plain student
        state = full_model_state(model, sharded=True)
        if dist.is_main:
            model = ScaffoldStudent.from_pretrained(base_model, kind=cfg.kind)
            model.load_state_dict(state)
    if dist.is_main:  # under torchrun every rank holds the same weights: one writes them
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, load_tokenizer(base_model))
        (tmp / "training.json").write_text(json.dumps({
            "train_config": cfg.model_dump(), "manifest_hash": manifest_hash, "base_model": base_model,
            "final_loss": result.final_loss, "world_size": dist.world, "result": asdict(result)}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    dist.barrier()
    return TrainedStudent(str(out), cfg.kind, manifest_hash, [s["shard_id"] for s in shards], result, cfg.model_dump())


def eval_items(wh: Warehouse, split: str = "test", source: str | None = None) -> list[EvalItem]:
    """Held-out problems, with the teacher's steps and signals as golden where a correct trace exists."""
    problems = wh.query("SELECT problem_id, question, answer, answer_type FROM problems WHERE split = ? "
                        "AND (? IS NULL OR source = ?) ORDER BY problem_id", [split, source, source])
    golden = {t["problem_id"]: t for t in training_traces(wh, split)[0]}
    return [EvalItem(p["problem_id"], p["question"], p["answer"], p["answer_type"],
                     golden[p["problem_id"]]["signals"] if p["problem_id"] in golden else None,
                     golden[p["problem_id"]]["steps"] if p["problem_id"] in golden else None) for p in problems]
