"""A backbone that is not the embedded Qwen2: a tiny Llama checkpoint on disk, given by path like a hub model."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaffold_lib.evaluation.decoding import DecodeConfig, ScaffoldDecoder
from scaffold_lib.student.stages import ShardsConfig, build_packed_shards, train_student
from scaffold_lib.student.model import ScaffoldStudent, StudentConfig, load_tokenizer
from scaffold_lib.data.problems import GeneratorConfig, generate_problems
from scaffold_lib.student.shards import PackConfig
from scaffold_lib.data.stages import generate_teacher_traces, label_signals, segment_traces, store_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher
from scaffold_lib.student.training import TrainConfig
from scaffold_lib.store.warehouse import Warehouse
from tests.student_kit import tiny_world


def test_a_llama_checkpoint_trains_as_scaffold_student(tmp_path_factory, tmp_path):
    world = tiny_world(tmp_path_factory)
    llama_dir = tmp_path / "tiny-llama"
    tokenizer = load_tokenizer(world.base)  # any tokenizer: the step separator need not be one token here
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
                     ).save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)

    wh = Warehouse(tmp_path / "warehouse.duckdb")
    store_problems(wh, generate_problems(GeneratorConfig(n_problems=30, max_ops=2)))
    generate_teacher_traces(wh, ProgrammaticTeacher())
    segment_traces(wh)
    label_signals(wh)
    report = build_packed_shards(wh, tmp_path / "art", ShardsConfig(student=StudentConfig(base_model=str(llama_dir)),
                                                                    pack=PackConfig(row_len=512)))
    assert report.base_model == str(llama_dir)  # used as given, not rebuilt

    trained = train_student(wh, tmp_path / "art", report.base_model, report.manifests["scaffold"],
                            TrainConfig(max_steps=4, batch_size=2, warmup_steps=1), progress=False)
    assert trained.result.losses[-1] < trained.result.losses[0]
    student = ScaffoldStudent.from_pretrained(trained.path)
    assert student.backbone.config.model_type == "llama" and student.kind == "scaffold"
    gen = ScaffoldDecoder(student, load_tokenizer(trained.path), DecodeConfig(tau=0.0, max_steps=2, max_tokens=40)
                          ).generate("Ava has 3 apples. Ava buys 2 more apples. How many apples does Ava have now?")
    assert len(gen.steps) <= 2 and gen.new_tokens <= 40
