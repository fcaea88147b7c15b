"""A backbone that is not the embedded Qwen2: a tiny Llama checkpoint on disk, given by path like a hub model."""

from scaffold_lib.data.synthetic import GeneratorConfig
from scaffold_lib.evaluation.config import DecodeConfig
from scaffold_lib.evaluation.decoding import ScaffoldDecoder
from scaffold_lib.evaluation.evaluate import load_for_eval
from scaffold_lib.student.config import PackConfig, ShardsConfig, StudentConfig, TrainConfig
from scaffold_lib.student.model import load_tokenizer
from scaffold_lib.student.pack import pack_shards
from scaffold_lib.student.train import fit_student
from student_kit import tiny_llama, tiny_world
from support.stages import labelled_store


def test_a_llama_checkpoint_trains_as_scaffold_student(tmp_path_factory, tmp_path):
    world = tiny_world(tmp_path_factory)
    llama_dir = tmp_path / "tiny-llama"
    tokenizer = load_tokenizer(world.base)  # any tokenizer: the step separator need not be one token here
    tiny_llama(llama_dir, tokenizer, layers=2)

    store = labelled_store(tmp_path, GeneratorConfig(n_problems=30, max_ops=2))
    wh = store.warehouse
    report = pack_shards(store, ShardsConfig(pack=PackConfig(row_len=512)), StudentConfig(base_model=str(llama_dir)))
    assert report.source_model == str(llama_dir) and report.pretrained
    # prepared beside the artifacts (tokenizer with the signal tags), the given checkpoint left as it was
    assert report.base_model.startswith(str(store.artifacts)) and not (llama_dir / "scaffold.json").exists()

    trained = fit_student(
        wh,
        store.artifacts,
        report.base_model,
        report.manifests["scaffold"],
        TrainConfig(max_steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=1),
        progress=False,
    )
    assert trained.result.losses[-1] < trained.result.losses[0]
    student, fmt = load_for_eval(trained.path)
    assert student.backbone.config.model_type == "llama" and student.kind == "scaffold"
    gen = ScaffoldDecoder(student, fmt.tokenizer, DecodeConfig(tau=0.0, max_steps=2, max_tokens=40), fmt).generate(
        "Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?"
    )
    assert len(gen.steps) <= 2 and gen.new_tokens <= 40
