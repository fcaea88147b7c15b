"""Shared set-up for the benchmarks: a tiny embedded student and examples from the programmatic teacher."""

import tempfile
from pathlib import Path

from scaffold_lib.data.segmentation import segment
from scaffold_lib.data.signals import label_steps
from scaffold_lib.data.synthetic import GeneratorConfig, generate_problems
from scaffold_lib.data.teachers import ProgrammaticTeacher
from scaffold_lib.student.config import StudentConfig
from scaffold_lib.student.examples import Formatter, signal_tags, training_corpus
from scaffold_lib.student.model import build_embedded_base, load_tokenizer

STUDENT = StudentConfig(hidden_size=192, num_attention_heads=6, intermediate_size=512)


def tiny_student(n_problems: int = 1500, out: str | None = None):
    """(base model path, tokenizer, formatter, [(trace_id, question, steps, signals)]) on the embedded default."""
    problems = generate_problems(GeneratorConfig(n_problems=n_problems, max_ops=3))
    by_id = {p.problem_id: p for p in problems}
    traces = [t for t in ProgrammaticTeacher().generate(problems).traces if t.is_correct]
    items = []
    for t in traces:
        steps = segment(t.text)
        items.append((t.trace_id, by_id[t.problem_id].question, steps, [label.signal for label in label_steps(steps)]))
    tags = signal_tags()
    out_dir = Path(out or tempfile.mkdtemp(prefix="bench-")) / "base"
    build_embedded_base(
        STUDENT, [training_corpus(q, s, g, tags) for _, q, s, g in items], out_dir, ["\n\n", *tags.values()]
    )
    tokenizer = load_tokenizer(out_dir)
    return out_dir, tokenizer, Formatter(tokenizer, tags), items
