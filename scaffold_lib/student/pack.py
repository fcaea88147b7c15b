"""The packing stage: correct training traces in the scaffold format (and plain CoT for the baseline), best-fit-
decreasing packed into fixed-length rows with per-example position ids, written as Parquet shards with a manifest per
arm. The backbone's tokenizer gets the signal tags here, so training and decoding use the same ids.

Streamed: traces are read, tokenised once for both arms and packed a window (`PACK_WINDOW_CHARS`) at a time.
Incremental: when the tokenizer and the packing settings are those of the last manifests and every trace in them is
still a training trace, only the new traces are packed, into new shards appended to them (a changed tokenizer or a
removed trace repacks everything).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from scaffold_lib.core.errors import StageFailed
from scaffold_lib.core.ids import content_id
from scaffold_lib.store import training_data
from scaffold_lib.store.store import Store
from scaffold_lib.store.warehouse import Warehouse
from scaffold_lib.student.backbones import prepare_base_model
from scaffold_lib.student.config import EMBEDDED, ShardsConfig, StudentConfig
from scaffold_lib.student.examples import Formatter, false_calculation, signal_tags, training_corpus
from scaffold_lib.student.handles import KINDS, ShardsHandle
from scaffold_lib.student.model import load_tokenizer, tokenizer_hash
from scaffold_lib.student.shards import ShardInfo, pack_rows, write_shards

BUDGET_SAMPLE = 5_000  # traces whose token lengths set the decoding budget (the first by trace id: a hash order)


@dataclass
class _Packed:
    """What packing the new traces wrote, per arm, and the counts their manifests record."""

    infos: dict[str, list[ShardInfo]] = field(default_factory=lambda: {k: [] for k in KINDS})
    split: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"step": [], "answer": [], "reply": [], "steps": []})
    traces: int = 0
    masked_steps: int = 0
    excluded_traces: int = 0


def pack_shards(store: Store, cfg: ShardsConfig, student: StudentConfig, run_id: str | None = None) -> ShardsHandle:
    """Pack the training traces (only the new ones when the last manifests can be appended to) into shards of both
    arms; the handle names the prepared backbone, the manifests and the decoding budget."""
    with store.warehouse.session():
        return _pack_shards(store, cfg, student, run_id)


def _pack_shards(store: Store, cfg: ShardsConfig, student: StudentConfig, run_id: str | None) -> ShardsHandle:
    wh = store.warehouse
    eligible = training_data.eligible_traces_sql(drop_contaminated=True)
    params = [["train"], cfg.include_incorrect, None, None]
    traces = training_data.eligible_count(wh, eligible, params)
    if not traces:
        raise StageFailed(
            "no labelled training traces in the warehouse: run the data stages first (problems, "
            "teacher_traces, segmented_steps, signal_labels)"
        )
    tags = signal_tags()

    def corpus() -> Iterator[str]:
        for batch in training_data.stream_training_traces(
            wh, ("train",), cfg.include_incorrect, drop_contaminated=True
        ):
            yield from (training_corpus(t["question"], t["steps"], t["signals"], tags) for t in batch)

    base, layout = prepare_base_model(student, corpus, store.artifacts, tags)
    tokenizer = load_tokenizer(base)
    tok_hash = tokenizer_hash(tokenizer)
    storage = cfg.storage_url.rstrip("/") if cfg.storage_url else str(store.artifacts / "shards")
    pack_keys = {k: pack_key(k, tok_hash, layout, cfg) for k in KINDS}
    previous = training_data.previous_manifests(wh, pack_keys, eligible, params)
    formatter = Formatter(tokenizer, tags, layout["chat_template"])
    packed = _pack_new_traces(wh, cfg, formatter, tok_hash, storage, previous, traces, run_id)
    before = json.loads(previous["scaffold"]["budget_json"]) if previous else {}
    now = token_budget(packed.lengths) if packed.lengths["reply"] else {}
    # appended: the caps only grow (the p99 of the new traces against the earlier p99)
    budget = {k: max(now.get(k, 0), before.get(k, 0)) for k in sorted({*now, *before})}
    handle = ShardsHandle(
        base_model=str(base),
        source_model=student.base_model,
        pretrained=student.base_model != EMBEDDED,
        tokenizer_hash=tok_hash,
        text_format=layout,
        manifests={},
        storage=storage,
        traces=(previous["scaffold"]["traces"] if previous else 0) + packed.traces,
        skipped_incomplete=training_data.unlabelled_traces(wh, ("train",), cfg.include_incorrect),
        stats={},
        budget=budget,
        fill_target=cfg.min_fill,
        excluded_contaminated=training_data.excluded_training_problems(wh),
        signal_injection=student.signal_injection,
    )
    for kind in KINDS:
        _write_manifest(wh, handle, kind, cfg, pack_keys[kind], previous, packed, run_id)
    return handle


def _pack_new_traces(
    wh: Warehouse,
    cfg: ShardsConfig,
    formatter: Formatter,
    tok_hash: str,
    storage: str,
    previous: dict[str, dict],
    traces: int,
    run_id: str | None,
) -> _Packed:
    """Tokenise, pack and write the traces not in the previous manifests, a window at a time, both arms; each shard's
    members are recorded as it is written."""
    packed = _Packed()
    todo = traces - (previous["scaffold"]["traces"] if previous else 0)
    with tqdm(total=todo, unit="trace", desc="packing", disable=None) as bar:
        for batch in training_data.stream_training_traces(
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
                packed.excluded_traces += offered - len(batch)
            elif cfg.wrong_arithmetic == "mask":
                packed.masked_steps += sum(map(sum, wrong))
            masks = wrong if cfg.wrong_arithmetic == "mask" else [None] * len(batch)
            encoded = formatter.encode([(t["question"], t["steps"]) for t in batch])
            for kind in KINDS:  # one arm's examples at a time: packed rows copy them, so they are freed after
                examples = [
                    formatter.build(t["trace_id"], q, ids, t["signals"] if kind == "scaffold" else None, m)
                    for t, (q, ids), m in zip(batch, encoded, masks)
                ]
                if kind == "scaffold" and len(packed.lengths["reply"]) < BUDGET_SAMPLE:
                    add_lengths(packed.lengths, [ids for _, ids in encoded], examples)
                rows, stats = pack_rows(examples, cfg.pack)
                del examples
                written, _ = write_shards(rows, f"{storage}/{kind}", kind, tok_hash, cfg.pack)
                del rows
                wh.insert_new(
                    "shard_members",
                    [{"shard_id": i.shard_id, "trace_id": t} for i in written for t in i.trace_ids],
                    run_id,
                )
                packed.infos[kind] += written
                packed.split[kind] += stats.split_examples
                packed.dropped[kind] += stats.dropped_examples
            packed.traces += len(batch)
            bar.update(offered)
    return packed


def _write_manifest(
    wh: Warehouse,
    handle: ShardsHandle,
    kind: str,
    cfg: ShardsConfig,
    key: str,
    previous: dict[str, dict],
    packed: _Packed,
    run_id: str | None,
) -> None:
    """One arm's shards and manifest (the previous manifest's shards and the new ones) into the warehouse, and the
    arm's manifest, shard ids and figures into the handle."""
    parent = previous.get(kind, {})
    ids = (training_data.manifest_shard_ids(wh, parent["manifest_hash"]) if previous else []) + [
        i.shard_id for i in packed.infos[kind]
    ]
    manifest = content_id("manifest", sorted(ids))
    wh.insert_new("shards", [i.as_row(manifest) for i in packed.infos[kind]], run_id)
    record = {
        "manifest_hash": manifest,
        "kind": kind,
        "pack_key": key,
        "parent": parent.get("manifest_hash"),
        "traces": handle.traces,
        "split_examples": parent.get("split_examples", 0) + packed.split[kind],
        "dropped_examples": parent.get("dropped_examples", 0) + packed.dropped[kind],
        "masked_steps": (parent.get("masked_steps") or 0) + packed.masked_steps,
        "excluded_traces": (parent.get("excluded_traces") or 0) + packed.excluded_traces,
        "budget_json": json.dumps(handle.budget),
    }
    if manifest != parent.get("manifest_hash"):
        wh.insert_new("manifests", [record], run_id)
        wh.insert_new("manifest_shards", [{"manifest_hash": manifest, "shard_id": i} for i in ids], run_id)
    else:
        record = parent
    totals = training_data.manifest_totals(wh, manifest)
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
        "appended_traces": packed.traces if previous else 0,
        "appended_to": parent.get("manifest_hash"),
    }


def pack_key(kind: str, tok_hash: str, layout: dict, cfg: ShardsConfig) -> str:
    """What makes two packings of the same traces the same shards: a change of any of these repacks everything
    (`layout`: the backbone's text format, its signal tags and chat template)."""
    return content_id(
        "pack", kind, tok_hash, layout, cfg.pack.model_dump(), cfg.include_incorrect, cfg.wrong_arithmetic
    )


def add_lengths(lengths: dict[str, list[int]], step_ids: list[list[list[int]]], examples: list) -> None:
    """Token lengths of steps, answer steps, whole replies and step counts (tags and separators included)."""
    for ids, e in zip(step_ids, examples):
        lengths["step"] += [len(i) + 2 for i in ids[:-1]]
        lengths["answer"].append(len(ids[-1]) + 2)
        lengths["reply"].append(len(e.input_ids) - int((e.labels == -100).sum()) + 1)
        lengths["steps"].append(len(ids))


def _p99(lengths: list[int]) -> int:
    return int(np.percentile(lengths, 99)) if lengths else 0


def token_budget(lengths: dict[str, list[int]]) -> dict[str, int]:
    """99th percentiles of the training data's step, answer-step and whole-reply lengths in tokens: decoding caps
    for both arms come from these, so neither is cut off where the teacher was not."""
    return {
        "step_tokens_p99": _p99(lengths["step"]),
        "answer_tokens_p99": _p99(lengths["answer"]),
        "reply_tokens_p99": _p99(lengths["reply"]),
        "steps_p99": _p99(lengths["steps"]),
    }
