"""Shards addressed by URL through fsspec: written to an object-store-like filesystem (fsspec's in-memory one
stands in for s3:// here), recorded with their URLs, read back by DuckDB in place and trained on."""

from __future__ import annotations

import fsspec

from scaffold_lib.data.synthetic import GeneratorConfig
from scaffold_lib.student.config import PackConfig, ShardsConfig, TrainConfig
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.shards import load_rows
from scaffold_lib.student.train import fit_student
from student_kit import TINY as TINY_STUDENT
from support.stages import labelled_store

TINY = TINY_STUDENT.model_copy(update={"vocab_size": 300})


def test_shards_at_an_fsspec_url_are_written_whole_read_in_place_and_trained_on(tmp_path):
    store = labelled_store(tmp_path, GeneratorConfig(n_problems=60, seed=2))
    wh = store.warehouse
    cfg = ShardsConfig(pack=PackConfig(row_len=512, rows_per_shard=4), storage_url="memory://bucket/run1")
    report = pack_shards(store, cfg, TINY)
    paths = [r["path"] for r in wh.query("SELECT path FROM shards ORDER BY path")]
    assert paths and all(p.startswith("memory:///bucket/run1/") for p in paths)  # fsspec canonical URLs
    assert not list(store.artifacts.rglob("*.parquet"))  # nothing went to the local artifacts folder
    memory = fsspec.filesystem("memory")
    assert sorted(memory.ls("/bucket/run1/scaffold", detail=False)) == sorted(
        p.removeprefix("memory://") for p in paths if "/scaffold/" in p
    )
    # DuckDB reads the shards where they are, and finds every row the manifest promises
    assert wh.parquet_rows(paths) == wh.scalar("SELECT sum(n_rows) FROM shards")
    data = load_rows([p for p in paths if "/scaffold/" in p])
    assert data["input_ids"].shape == (report.stats["scaffold"]["rows"], 512)
    trained = fit_student(
        wh,
        store.artifacts,
        report.base_model,
        report.manifests["scaffold"],
        TrainConfig(max_steps=3, batch_size=2).resolved(pretrained=False),
        progress=False,
    )
    assert trained.result.losses[-1] < trained.result.losses[0]
    # a second build finds the shards already there (content-addressed) and writes nothing new
    again = pack_shards(store, cfg, TINY)
    assert again.manifests == report.manifests and wh.scalar("SELECT count(*) FROM shards") == len(paths)
