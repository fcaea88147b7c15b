"""Tiny student world shared by test_student.py, test_decoding.py (not a test module itself).

One tiny embedded base (byte-level BPE + 2-layer Qwen2, hidden 32) is built per test session from ~40 programmatic
teacher traces; `tiny_world(tmp_path_factory)` builds it on the first call and returns the same object afterwards,
so each module's session fixture can wrap it without building it twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import label_steps
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher
from scaffold_lib.student.config import PackConfig, StudentConfig
from scaffold_lib.student.examples import STEP_SEPARATOR, Example, Formatter, signal_tags, training_corpus
from scaffold_lib.student.model import ScaffoldStudent, build_embedded_base, load_tokenizer, tokenizer_hash
from scaffold_lib.student.shards import load_rows, pack_rows, write_shards

# Two threads fighting another process for two cores make a 25 ms step take a second (OpenMP spin-waits).
torch.set_num_threads(1)

TINY = StudentConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=512,
)
TRAIN_PACK = PackConfig(row_len=512, rows_per_shard=8)


@dataclass
class Trace:
    trace_id: str
    question: str
    answer: str
    steps: list[str]
    signals: list[str]


@dataclass
class TinyWorld:
    root: Path
    base: Path
    tokenizer: object
    tags: dict[str, str]
    fmt: Formatter
    traces: list[Trace]
    scaffold_examples: list[Example]
    baseline_examples: list[Example]
    shard_paths: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # kind -> load_rows(...) tensors

    def student(self, kind: str = "scaffold", seed: int = 0) -> ScaffoldStudent:
        """A fresh student from the base, with deterministically initialised heads (float32)."""
        torch.manual_seed(seed)
        return ScaffoldStudent.from_pretrained(self.base, kind=kind).float()

    def data_copy(self, kind: str = "scaffold") -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.data[kind])


_WORLD: TinyWorld | None = None


def make_traces(n_problems: int = 40) -> list[Trace]:
    problems = generate_problems(GeneratorConfig(n_problems=n_problems, seed=0))
    by_id = {p.problem_id: p for p in problems}
    out = []
    for t in ProgrammaticTeacher().generate(problems).traces:
        steps = segment(t.text)
        signals = [label.signal for label in label_steps(steps)]
        out.append(Trace(t.trace_id, by_id[t.problem_id].question, by_id[t.problem_id].answer, steps, signals))
    return out


def tiny_world(tmp_path_factory) -> TinyWorld:
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    root = tmp_path_factory.mktemp("tiny_student")
    traces = make_traces()
    tags = signal_tags()
    corpus = [training_corpus(t.question, t.steps, t.signals, tags) for t in traces]
    # as distill.prepare_base_model does: the step separator and the signal prefixes are single tokens
    base = build_embedded_base(TINY, corpus, root / "base", [STEP_SEPARATOR, *tags.values()])
    tokenizer = load_tokenizer(base)
    fmt = Formatter(tokenizer, tags)
    world = TinyWorld(
        root,
        base,
        tokenizer,
        tags,
        fmt,
        traces,
        [fmt.scaffold(t.trace_id, t.question, t.steps, t.signals) for t in traces],
        [fmt.baseline(t.trace_id, t.question, t.steps) for t in traces],
    )
    tok_hash = tokenizer_hash(tokenizer)
    for kind, examples in (("scaffold", world.scaffold_examples), ("baseline", world.baseline_examples)):
        rows, _ = pack_rows(examples, TRAIN_PACK)
        infos, _ = write_shards(rows, root / "shards" / kind, kind, tok_hash, TRAIN_PACK)
        world.shard_paths[kind] = [i.path for i in infos]
        world.data[kind] = load_rows(world.shard_paths[kind])
    _WORLD = world
    return world


def sharpen(model: ScaffoldStudent) -> ScaffoldStudent:
    """Make a random student sensitive: peaked attention (so positions and padding matter) and large signal vectors
    (so the conditioning signal changes what it predicts). A freshly initialised tiny model is too flat for a wrong
    position or a changed signal to move its argmax."""
    with torch.no_grad():
        for layer in model.backbone.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
        model.signal_embedding.weight.normal_(std=1.0)
        model.signal_embedding.weight[-1].zero_()
    return model


def tiny_llama(path: Path, tokenizer, layers: int = 1) -> Path:
    """A tiny Llama checkpoint with `tokenizer`, saved like a hub model: a backbone that is not the embedded Qwen2."""
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
