"""The student library on a tiny real model (TRL-style): packing, the multi-task loss, training, checkpoints and
resume, safetensors persistence, and the warehouse-level distill stages. Each test takes a few seconds at most."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from scaffold_lib.data.signals import NUM_SIGNALS, SIGNALS
from scaffold_lib.student.config import PackConfig, TrainConfig
from scaffold_lib.student.examples import Example
from scaffold_lib.student.model import HEADS_FILE, SCAFFOLD_CONFIG, ScaffoldStudent, StudentLoadError, tokenizer_hash
from scaffold_lib.student.shards import load_rows, pack_rows, write_shards
from scaffold_lib.student.training import latest_checkpoint, micro_batch_indices, train
from student_kit import TINY, TinyWorld, tiny_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> TinyWorld:
    return tiny_world(tmp_path_factory)


def tensors(ex_or_row, position_ids=None) -> dict[str, torch.Tensor]:
    """One example (or packed row) as a batch of one for `ScaffoldStudent.forward`."""
    get = (lambda k: getattr(ex_or_row, k)) if isinstance(ex_or_row, Example) else ex_or_row.__getitem__
    pos = np.arange(len(get("input_ids"))) if position_ids is None else position_ids
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))[None]  # noqa: E731
    return {
        "input_ids": t(get("input_ids")),
        "labels": t(get("labels")),
        "position_ids": t(pos),
        "signal_ids": t(get("signal_ids")),
        "signal_positions": t(get("signal_positions")),
        "signal_targets": t(get("signal_targets")),
    }


def run(model: ScaffoldStudent, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        out = model(
            batch["input_ids"],
            batch["labels"],
            batch["position_ids"],
            batch["signal_ids"],
            batch["signal_positions"],
            batch["signal_targets"],
        )
    return {k: float(v) for k, v in out.items()}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=5, batch_size=2, warmup_steps=0, learning_rate=3e-3, log_every=1000)
    return TrainConfig(**{**base, **kw})


def segments(row: dict) -> list[tuple[int, int]]:
    """(start, stop) of each member in a packed row: position_ids restart at 0 where a member starts."""
    pos = np.asarray(row["position_ids"])[: row["n_tokens"]]
    starts = list(np.flatnonzero(pos == 0)) + [row["n_tokens"]]
    return list(zip(starts[:-1], starts[1:]))


# --- 1. packing -------------------------------------------------------------------------------------------


def test_packed_row_loss_equals_sum_of_its_examples(world):
    """No token attends across an example border: the packed row's summed losses are the examples' ones."""
    rows, stats = pack_rows(world.scaffold_examples, PackConfig(row_len=1024))
    assert stats.split_examples == stats.dropped_examples == 0
    row = max(rows, key=lambda r: len(r["trace_ids"]))
    assert len(row["trace_ids"]) >= 3
    by_id = {e.trace_id: e for e in world.scaffold_examples}
    model = world.student().double().eval()  # float64: the sums are ~5e3, so 1e-4 is below float32's resolution
    packed = run(model, tensors(row, row["position_ids"]))
    singles = [run(model, tensors(by_id[t])) for t in row["trace_ids"]]
    for key in ("token_loss_sum", "token_count", "signal_loss_sum", "signal_count"):
        assert abs(packed[key] - sum(s[key] for s in singles)) < 1e-4, key
    assert packed["token_count"] == sum(int((by_id[t].labels != -100).sum()) for t in row["trace_ids"])


def test_pack_rows_keeps_every_token_once(world):
    examples = world.scaffold_examples
    rows, stats = pack_rows(examples, PackConfig(row_len=1024))
    assert all(len(r["input_ids"]) == len(r["position_ids"]) == 1024 for r in rows)
    packed, expected = Counter(), Counter()
    for e in examples:
        expected[(tuple(e.input_ids), tuple(e.labels), tuple(e.signal_ids))] += 1
    for r in rows:
        spans = segments(r)
        assert len(spans) == len(r["trace_ids"])
        for a, b in spans:
            packed[(tuple(r["input_ids"][a:b]), tuple(r["labels"][a:b]), tuple(r["signal_ids"][a:b]))] += 1
        assert np.all(r["labels"][r["n_tokens"] :] == -100)  # padding is never a target
        # signal positions point inside the row's real tokens, at the right targets
        assert np.all(r["signal_positions"] < r["n_tokens"])
    assert packed == expected
    assert stats.examples == len(examples) and stats.rows == len(rows)
    assert stats.tokens == sum(len(e) for e in examples) == sum(r["n_tokens"] for r in rows)
    assert 0 < stats.fill_ratio <= 1 and stats.capacity == 1024 * len(rows)
    n_positions = sum(len(e.signal_positions) for e in examples)
    assert sum(len(r["signal_positions"]) for r in rows) == n_positions
    assert Counter(t for r in rows for t in r["signal_targets"].tolist()) == Counter(
        t for e in examples for t in e.signal_targets.tolist()
    )


@pytest.mark.parametrize("mode", ["split", "drop"])
def test_too_long_examples_are_split_or_dropped_and_counted(world, mode):
    examples = world.scaffold_examples
    row_len = 256
    long = [e for e in examples if len(e) > row_len]
    assert 0 < len(long) < len(examples)
    rows, stats = pack_rows(examples, PackConfig(row_len=row_len, too_long=mode))
    assert all(len(r["input_ids"]) == row_len for r in rows)
    short_tokens = sum(len(e) for e in examples if len(e) <= row_len)
    if mode == "split":
        assert stats.split_examples == len(long) and stats.dropped_examples == 0
        assert stats.tokens == sum(len(e) for e in examples)
        # every trace is in some row; the pieces of a split trace put back together give the example
        assert {t for r in rows for t in r["trace_ids"]} == {e.trace_id for e in examples}
        all_tokens = Counter(t for r in rows for t in r["input_ids"][: r["n_tokens"]].tolist())
        assert all_tokens == Counter(t for e in examples for t in e.input_ids.tolist())
        assert sum(len(r["signal_positions"]) for r in rows) == sum(len(e.signal_positions) for e in examples)
    else:
        assert stats.dropped_examples == len(long) and stats.split_examples == 0
        assert stats.tokens == short_tokens
        assert {t for r in rows for t in r["trace_ids"]} == {e.trace_id for e in examples if len(e) <= row_len}


def test_shards_round_trip_and_manifest(world, tmp_path):
    rows, _ = pack_rows(world.scaffold_examples, PackConfig(row_len=512, rows_per_shard=5))
    pc = PackConfig(row_len=512, rows_per_shard=5)
    infos, manifest = write_shards(rows, tmp_path, "scaffold", "tokhash", pc)
    assert len(infos) == -(-len(rows) // 5)
    assert all(Path(i.path).exists() and i.path.endswith(".parquet") for i in infos)
    assert not list(tmp_path.glob("*.tmp*"))
    assert sum(i.n_rows for i in infos) == len(rows)
    assert {t for i in infos for t in i.trace_ids} == {e.trace_id for e in world.scaffold_examples}
    again, manifest2 = write_shards(rows, tmp_path, "scaffold", "tokhash", pc)
    assert manifest2 == manifest and [i.shard_id for i in again] == [i.shard_id for i in infos]
    _, other = write_shards(rows, tmp_path / "b", "scaffold", "other-tokenizer", pc)
    assert other != manifest
    data = load_rows([i.path for i in infos])
    assert data["input_ids"].shape == (len(rows), 512)
    for i, r in enumerate(rows):
        assert torch.equal(data["input_ids"][i], torch.as_tensor(r["input_ids"], dtype=torch.long))
        assert torch.equal(data["position_ids"][i], torch.as_tensor(r["position_ids"], dtype=torch.long))
        n = len(r["signal_positions"])
        assert data["signal_positions"][i, :n].tolist() == r["signal_positions"].tolist()
        assert (data["signal_positions"][i, n:] == -1).all()
        assert data["signal_targets"][i, :n].tolist() == r["signal_targets"].tolist()


# --- 2./3. training changes what it should, and only that ------------------------------------------------


def test_training_lowers_loss_and_updates_every_parameter(world):
    model = world.student()
    before = state(model)
    result = train(model, world.data_copy(), cfg(max_steps=15), progress=False)
    assert len(result.losses) == 15 and all(np.isfinite(result.losses))
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.05
    assert np.mean(result.signal_losses[-3:]) < np.mean(result.signal_losses[:3])
    assert result.train_tokens > 0 and result.tokens_per_s > 0
    after = model.state_dict()
    for name, p in model.named_parameters():
        assert p.requires_grad
        if name == "signal_embedding.weight":
            pad = NUM_SIGNALS  # padding_idx: "no signal", zero by design
            assert torch.count_nonzero(after[name][pad]) == 0
            for row in range(NUM_SIGNALS):
                assert not torch.equal(before[name][row], after[name][row]), f"signal embedding row {row}"
        else:
            assert not torch.equal(before[name], after[name]), name
    for row in range(NUM_SIGNALS):
        assert not torch.equal(before["signal_head.weight"][row], after["signal_head.weight"][row])
    assert not model.training  # train() hands the model back in eval mode


def test_beta_zero_leaves_signal_head_untouched(world):
    model = world.student()
    before = state(model)
    result = train(model, world.data_copy(), cfg(beta=0.0), progress=False)
    after = model.state_dict()
    assert result.signal_losses == [0.0] * 5
    assert np.allclose(result.losses, result.token_losses)
    for name in ("signal_head.weight", "signal_head.bias"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["signal_embedding.weight"], after["signal_embedding.weight"])
    assert not torch.equal(before["backbone.model.embed_tokens.weight"], after["backbone.model.embed_tokens.weight"])


def test_beta_one_leaves_signal_embedding_untouched(world):
    model = world.student()
    before = state(model)
    result = train(model, world.data_copy(), cfg(beta=1.0), progress=False)
    after = model.state_dict()
    assert result.token_losses == [0.0] * 5
    assert np.allclose(result.losses, result.signal_losses)
    assert torch.equal(before["signal_embedding.weight"], after["signal_embedding.weight"])
    for name in ("signal_head.weight", "signal_head.bias", "backbone.model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_baseline_trains_token_loss_only(world):
    model = world.student(kind="baseline")
    before = state(model)
    result = train(model, world.data_copy("baseline"), cfg(kind="baseline", beta=0.3), progress=False)
    after = model.state_dict()
    assert result.signal_losses == [0.0] * 5
    assert result.losses == result.token_losses  # weight 1, not 1 - β
    assert result.losses[-1] < result.losses[0]
    for name in ("signal_embedding.weight", "signal_head.weight", "signal_head.bias"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["backbone.lm_head.weight"], after["backbone.lm_head.weight"])


# --- 4. loss normalisation over the accumulated batch ----------------------------------------------------


def test_grad_accum_equals_one_big_batch(world, monkeypatch):
    data = world.data_copy()
    n = data["input_ids"].size(0)
    rows4 = micro_batch_indices(n, 4, 0, 0)
    assert torch.equal(torch.cat([micro_batch_indices(n, 2, 0, 0), micro_batch_indices(n, 2, 0, 1)]), rows4)
    beta = 0.3
    # the expected first-step loss straight from the model forward, over the 4 rows as one batch
    model = world.student()
    with torch.no_grad():
        sums = {"token_loss_sum": 0.0, "token_count": 0, "signal_loss_sum": 0.0, "signal_count": 0}
        for i in rows4.tolist():
            out = run(model, {k: v[i : i + 1] for k, v in data.items()})
            for k in sums:
                sums[k] += out[k]
    expected = (1 - beta) * sums["token_loss_sum"] / sums["token_count"] + beta * sums["signal_loss_sum"] / sums[
        "signal_count"
    ]
    # the rows really differ in size, so a mean of per-micro-batch means would not match
    counts = [int((data["labels"][rows4[j : j + 2]] != -100).sum()) for j in (0, 2)]
    assert counts[0] != counts[1]

    # plain SGD instead of AdamW for this test, so the update is the (clipped) gradient itself: Adam's first step
    # is about lr * sign(g), which hides a wrongly scaled gradient
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    accum, big, start = world.student(), world.student(), state(world.student())
    r_accum = train(accum, data, cfg(max_steps=1, batch_size=2, grad_accum=2, beta=beta), progress=False)
    r_big = train(big, data, cfg(max_steps=1, batch_size=4, grad_accum=1, beta=beta), progress=False)
    assert abs(r_accum.losses[0] - expected) < 1e-4
    assert abs(r_big.losses[0] - expected) < 1e-4
    assert abs(r_accum.token_losses[0] - r_big.token_losses[0]) < 1e-4
    assert abs(r_accum.signal_losses[0] - r_big.signal_losses[0]) < 1e-4
    moved = 0
    for (name, a), b in zip(accum.state_dict().items(), big.state_dict().values()):
        assert torch.allclose(a - start[name], b - start[name], atol=1e-7), name
        moved += not torch.equal(a, start[name])
    assert moved >= len(start) - 1  # every parameter took a step (the tied lm_head is the embedding)


# --- 5. checkpoints and resume ---------------------------------------------------------------------------


def test_resume_from_checkpoint_matches_uninterrupted_run(world, tmp_path):
    data = world.data_copy()
    c = cfg(max_steps=10, checkpoint_every=5, keep_checkpoints=2, warmup_steps=2)
    straight = world.student()
    full = train(straight, data, c, checkpoint_dir=tmp_path / "a", progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert ckpts == ["step-0000005", "step-0000010"]  # no leftover .tmp dirs
    for name in ckpts:
        files = sorted(p.name for p in (tmp_path / "a" / name).iterdir())
        assert files == ["model.safetensors", "optim.pt", "trainer_state.json"]

    # "crash" after step 5: the step-10 checkpoint never got written
    shutil.copytree(tmp_path / "a" / "step-0000005", tmp_path / "b" / "step-0000005")
    resumed_model = world.student(seed=123)  # different head init: the checkpoint must overwrite everything
    resumed = train(resumed_model, data, c, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 5
    assert len(resumed.losses) == 10
    np.testing.assert_allclose(resumed.losses, full.losses, atol=1e-4, rtol=0)
    np.testing.assert_allclose(resumed.signal_losses, full.signal_losses, atol=1e-4, rtol=0)
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert latest_checkpoint(tmp_path / "b").name == "step-0000010"
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".tmp")]

    # a finished run resumes at its end and does no work
    again = train(world.student(), data, c, checkpoint_dir=tmp_path / "a", progress=False)
    assert again.resumed_from == 10 and again.losses == full.losses


def test_keep_checkpoints_prunes_old_ones(world, tmp_path):
    train(
        world.student(),
        world.data_copy(),
        cfg(max_steps=6, checkpoint_every=2, keep_checkpoints=2),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004", "step-0000006"]


# --- 6. persistence --------------------------------------------------------------------------------------


def test_save_and_load_round_trip(world, tmp_path):
    model = world.student()
    train(model, world.data_copy(), cfg(max_steps=2), progress=False)  # heads differ from any fresh init
    out = model.save_pretrained(tmp_path / "student", world.tokenizer)
    assert (out / "model.safetensors").exists() and (out / HEADS_FILE).exists()
    assert json.loads((out / SCAFFOLD_CONFIG).read_text()) == {
        "kind": "scaffold",
        "signals": list(SIGNALS),
        "hidden_size": TINY.hidden_size,
        "tokenizer_hash": tokenizer_hash(world.tokenizer),
        "signal_injection": "output",
    }
    assert not list(out.glob("*.bin"))
    torch.manual_seed(999)
    loaded = ScaffoldStudent.from_pretrained(out).eval()
    assert loaded.kind == "scaffold"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    batch = {k: v[:1] for k, v in world.data["scaffold"].items()}
    assert run(model.eval(), batch) == run(loaded, batch)


def test_baseline_saves_as_plain_checkpoint(world, tmp_path):
    model = world.student(kind="baseline")
    out = model.save_pretrained(tmp_path / "baseline")
    assert not (out / HEADS_FILE).exists()
    assert ScaffoldStudent.from_pretrained(out).kind == "baseline"


def test_pickled_checkpoint_is_refused(world, tmp_path):
    model = world.student()
    out = tmp_path / "pickled"
    model.backbone.save_pretrained(out, safe_serialization=False)
    if (out / "model.safetensors").exists():  # newer transformers ignore safe_serialization=False
        (out / "model.safetensors").unlink()
        torch.save(model.backbone.state_dict(), out / "pytorch_model.bin")
    assert (out / "pytorch_model.bin").exists() and not list(out.glob("*.safetensors"))
    with pytest.raises(OSError):
        ScaffoldStudent.from_pretrained(out)


def test_signal_set_mismatch_is_refused(world, tmp_path):
    out = world.student().save_pretrained(tmp_path / "s")
    (out / SCAFFOLD_CONFIG).write_text(json.dumps({"kind": "scaffold", "signals": ["a", "b"]}))
    with pytest.raises(ValueError, match="signals"):
        ScaffoldStudent.from_pretrained(out)


def test_loading_fails_loudly_naming_the_file(world, tmp_path):
    """A saved student with its heads missing or mismatched, or the wrong tokenizer, is an error, never a student with
    fresh heads or wrong ids."""
    from safetensors.torch import load_file, save_file

    from scaffold_lib.student.model import check_tokenizer

    out = world.student().save_pretrained(tmp_path / "s", world.tokenizer, {"tags": world.tags, "chat_template": False})
    heads = out / HEADS_FILE
    state = load_file(str(heads))
    heads.unlink()
    with pytest.raises(StudentLoadError, match=rf"{heads}.* is missing.*untrained signal heads"):
        ScaffoldStudent.from_pretrained(out)
    assert ScaffoldStudent.from_pretrained(out, fresh_heads=True).kind == "scaffold"  # on purpose only
    save_file({**state, "signal_head.weight": state["signal_head.weight"][:, :8].contiguous()}, str(heads))
    with pytest.raises(StudentLoadError, match=r"heads do not fit this backbone.*signal_head.weight"):
        ScaffoldStudent.from_pretrained(out)
    # a backbone that is not a saved student gets new heads: that is how training starts
    assert ScaffoldStudent.from_pretrained(world.base).kind == "scaffold"

    check_tokenizer(out, world.tokenizer, world.tags)  # the tokenizer it was trained with: fine
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(world.base)
    other.add_tokens(["<extra>"])
    with pytest.raises(StudentLoadError, match=r"is not the one the student was trained with"):
        check_tokenizer(out, other, world.tags)
    bare = tmp_path / "bare"
    world.student().save_pretrained(bare)  # no tokenizer recorded
    with pytest.raises(StudentLoadError, match=r"lacks the signal tokens \['\[made-up\] '\]"):
        check_tokenizer(bare, world.tokenizer, {**world.tags, "x": "[made-up] "})


def test_tiny_config_is_tiny(world):
    from scaffold_lib.student.model import count_parameters

    model = world.student()
    assert model.backbone.config.hidden_size == TINY.hidden_size
    assert count_parameters(model) < 100_000


# --- 9. the warehouse-level stages -----------------------------------------------------------------------


def test_student_stages_on_a_tiny_warehouse(tmp_path):
    from scaffold_lib.data.synthetic import GeneratorConfig
    from scaffold_lib.evaluation.evaluate import heldout_items
    from scaffold_lib.student.config import ShardsConfig
    from scaffold_lib.student.pack import pack_shards
    from scaffold_lib.student.train import fit_student
    from support.stages import labelled_store

    store = labelled_store(tmp_path, GeneratorConfig(n_problems=30, seed=1))
    wh = store.warehouse
    sc = ShardsConfig(pack=PackConfig(row_len=512, rows_per_shard=4))

    report = pack_shards(store, sc, TINY, run_id="run-1")
    n_train = wh.scalar(
        "SELECT count(*) FROM teacher_traces t JOIN problems p USING (problem_id) "
        "WHERE p.split = 'train' AND t.is_correct"
    )
    assert report.traces == n_train > 0 and report.skipped_incomplete == 0
    assert set(report.manifests) == {"scaffold", "baseline"}
    n_shards = wh.scalar("SELECT count(*) FROM shards")
    assert n_shards == sum(len(v) for v in report.shard_ids.values()) > 0
    for kind in report.manifests:
        paths = [r["path"] for r in wh.query("SELECT path FROM shards WHERE kind = ?", [kind])]
        assert paths and all(Path(p).exists() for p in paths)
        assert wh.scalar("SELECT count(DISTINCT manifest_hash) FROM shards WHERE kind = ?", [kind]) == 1
        members = wh.scalar(
            "SELECT count(DISTINCT m.trace_id) FROM shard_members m JOIN shards s USING (shard_id) WHERE s.kind = ?",
            [kind],
        )
        assert members == n_train
        assert report.stats[kind]["examples"] == n_train
    assert wh.scalar("SELECT count(*) FROM shards WHERE dagster_run_id = 'run-1'") == n_shards
    # the decoding budget comes from the training data: 99th percentiles of a step, an answer and a reply
    assert 0 < report.budget["answer_tokens_p99"] <= report.budget["reply_tokens_p99"]
    assert 0 < report.budget["step_tokens_p99"] <= report.budget["reply_tokens_p99"]

    # idempotent: same manifest, no new rows
    members_before = wh.scalar("SELECT count(*) FROM shard_members")
    again = pack_shards(store, sc, TINY, run_id="run-2")
    assert again.manifests == report.manifests and again.base_model == report.base_model
    assert wh.scalar("SELECT count(*) FROM shards") == n_shards
    assert wh.scalar("SELECT count(*) FROM shard_members") == members_before

    tc = TrainConfig(max_steps=3, batch_size=2, warmup_steps=0, checkpoint_every=3).resolved(pretrained=False)
    trained = fit_student(wh, store.artifacts, report.base_model, report.manifests["scaffold"], tc, progress=False)
    assert len(trained.result.losses) == 3 and trained.kind == "scaffold"
    assert sorted(trained.shard_ids) == sorted(report.shard_ids["scaffold"])
    student = ScaffoldStudent.from_pretrained(trained.path)
    assert student.kind == "scaffold"
    meta = json.loads((Path(trained.path) / "training.json").read_text())
    assert meta["manifest_hash"] == report.manifests["scaffold"]
    assert not list(Path(trained.path).parent.glob("*.tmp"))
    # a retry with the same inputs resumes from the finished checkpoint instead of training again
    retry = fit_student(wh, store.artifacts, report.base_model, report.manifests["scaffold"], tc, progress=False)
    assert retry.path == trained.path and retry.result.resumed_from == 3

    items = heldout_items(wh, "test")
    n_test = wh.scalar("SELECT count(*) FROM problems WHERE split = 'test'")
    assert len(items) == n_test > 0
    with_golden = [i for i in items if i.golden_signals]
    assert with_golden and all(len(i.golden_signals) == len(i.golden_steps) for i in with_golden)
    assert all(i.golden_signals[-1] == "response_generation" for i in with_golden)


# --- 6. memory and attention options (the large-student path, CPU-testable) -------------------------------


def test_gradient_checkpointing_trains_the_same_as_without(world):
    data = world.data_copy()
    plain, checkpointed = world.student(), world.student()
    a = train(plain, data, cfg(max_steps=4, warmup_steps=1), progress=False)
    b = train(checkpointed, data, cfg(max_steps=4, warmup_steps=1, gradient_checkpointing=True), progress=False)
    assert checkpointed.backbone.is_activation_checkpointing and not plain.backbone.is_activation_checkpointing
    np.testing.assert_allclose(b.losses, a.losses, atol=1e-5, rtol=0)  # recomputation, not a different model
    assert b.losses[-1] < b.losses[0]


def test_attention_implementation_is_a_loading_option_with_the_same_maths(world):
    losses = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)  # the same heads for both
        model = ScaffoldStudent.from_pretrained(world.base, attn_implementation=impl).float()
        assert model.backbone.config._attn_implementation == impl
        losses[impl] = train(model, world.data_copy(), cfg(max_steps=2, warmup_steps=1), progress=False).losses
    np.testing.assert_allclose(losses["eager"], losses["sdpa"], atol=1e-4, rtol=0)  # different kernels only


def test_lora_trains_adapters_and_heads_only_then_folds_into_a_plain_checkpoint(world, tmp_path):
    model = world.student()
    before = state(model)
    result = train(model, world.data_copy(), cfg(max_steps=6, lora_r=4, learning_rate=1e-2), progress=False)
    assert result.losses[-1] < result.losses[0]
    after = state(model)
    assert set(after) == set(before)  # merged back: the same parameter names as a plain student
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"signal_head.weight", "signal_embedding.weight"} <= changed
    assert any(".q_proj." in k for k in changed) and any(".v_proj." in k for k in changed)  # adapters folded in
    assert not any("mlp" in k or "embed_tokens" in k or "norm" in k for k in changed)  # the frozen rest
    model.save_pretrained(tmp_path / "lora", world.tokenizer)
    loaded = ScaffoldStudent.from_pretrained(tmp_path / "lora")
    for name, value in state(loaded).items():
        torch.testing.assert_close(value, after[name])


def test_compiled_forward_trains_like_eager(world):
    eager = train(world.student(), world.data_copy(), cfg(max_steps=3), progress=False)
    # aot_eager runs torch.compile's graph capture without a C++ toolchain; GPUs use the default inductor
    compiled = train(
        world.student(), world.data_copy(), cfg(max_steps=3, compile=True, compile_backend="aot_eager"), progress=False
    )
    np.testing.assert_allclose(compiled.losses, eager.losses, atol=1e-5, rtol=0)
