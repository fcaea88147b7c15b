"""The pyfunc wrapper: a question in, the signal-tagged steps and the answer out (scaffolded decoding for a scaffold
student, plain greedy decoding for the CoT-SFT baseline), with the decoding settings the version was registered
with. A question that is missing or empty is the caller's error (HTTP 400 from `mlflow models serve`, naming the
field and the row), never a generated answer to nothing."""

from __future__ import annotations

import math
import os

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from scaffold_lib.store.registry import STUDENT_ARTIFACT
from scaffold_lib.student.register import SERVING_DECODE

THREADS_ENV = "SCAFFOLD_SERVE_THREADS"


def serving_threads() -> int:
    """Torch threads for serving: $SCAFFOLD_SERVE_THREADS, else half the cores. All of them (torch's default) make
    OpenMP workers spin against every other process on a busy machine (docs/benchmarks.md, "Serving latency")."""
    given = os.environ.get(THREADS_ENV)
    if given:
        try:
            threads = int(given)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={given!r}: expected a whole number of threads") from None
        if threads < 1:
            raise ValueError(f"{THREADS_ENV}={given!r}: expected at least 1 thread")
        return threads
    return max(1, (os.cpu_count() or 2) // 2)


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # the scoring server answers it with 400


def questions_of(model_input) -> list[str]:
    """Questions from what a caller sends: a DataFrame with a `question` column, a dict, a list or one string. A
    question that is missing, not text, or blank is refused, naming the field and its row."""
    if isinstance(model_input, pd.DataFrame):
        if "question" not in model_input.columns:
            raise _bad_input(f"field 'question': missing; the input has columns {list(model_input.columns)}")
        values = list(model_input["question"])
    elif isinstance(model_input, dict):
        if "question" not in model_input:
            raise _bad_input(f"field 'question': missing; the input has fields {list(model_input)}")
        value = model_input["question"]
        values = [value] if isinstance(value, str) else list(value or [])
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    # pyfunc turns {"question": [q1, q2]} into one row holding the list: those are the questions
    values = [v for value in values for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value])]
    if not values:
        raise _bad_input("field 'question': no question given")
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise _bad_input(f"field 'question' (row {row}): missing")
        if not isinstance(value, str):
            raise _bad_input(f"field 'question' (row {row}): must be text, got {type(value).__name__}")
        if not value.strip():
            raise _bad_input(f"field 'question' (row {row}): empty")
    return [str(v) for v in values]


class ScaffoldStudentModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        import torch

        from scaffold_lib.evaluation.config import DecodeConfig
        from scaffold_lib.evaluation.evaluate import load_for_eval

        torch.set_num_threads(serving_threads())
        path = Path(context.artifacts[STUDENT_ARTIFACT])
        self.model, self.fmt = load_for_eval(path)
        settings = path / SERVING_DECODE
        self.decode = DecodeConfig.model_validate_json(settings.read_text()) if settings.exists() else DecodeConfig()

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        from scaffold_lib.evaluation.decoding import ScaffoldDecoder, plain_generate_batch

        questions = questions_of(model_input)
        decode = self.decode.model_copy(update={k: v for k, v in (params or {}).items() if k in ("tau",)})
        if self.model.kind == "scaffold":
            gens = ScaffoldDecoder(self.model, self.fmt.tokenizer, decode, self.fmt).generate_batch(questions)
        else:
            gens = plain_generate_batch(
                self.model, self.fmt.tokenizer, questions, decode.resolved(None).max_tokens, self.fmt
            )
        return pd.DataFrame(
            {
                "question": questions,
                "answer": [g.answer or "" for g in gens],
                # a list of objects, so a client reads it as JSON once (not a JSON string inside the JSON)
                "steps": [
                    [{"signal": s.signal, "text": s.text, "confidence": s.confidence} for s in g.steps] for g in gens
                ],
                "response": [g.render() for g in gens],
            }
        )
