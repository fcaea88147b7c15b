"""The pyfunc wrapper: a question in, the signal-tagged steps and the answer out (scaffolded decoding for a scaffold
student, plain greedy decoding for the CoT-SFT baseline), with the decoding settings the version was registered
with."""

from __future__ import annotations

import json

import mlflow.pyfunc
import pandas as pd

from scaffold_lib.store.registry import STUDENT_ARTIFACT
from scaffold_lib.student.stages import SERVING_DECODE


def questions_of(model_input) -> list[str]:
    """Questions from what a caller sends: a DataFrame with a `question` column, a dict, a list or one string."""
    if isinstance(model_input, pd.DataFrame):
        if "question" not in model_input.columns:
            raise ValueError(f"expected a 'question' column, got {list(model_input.columns)}")
        return [str(q) for q in model_input["question"]]
    if isinstance(model_input, dict):
        value = model_input.get("question")
        return [value] if isinstance(value, str) else [str(q) for q in value or []]
    if isinstance(model_input, str):
        return [model_input]
    return [str(q) for q in model_input]


class ScaffoldStudentModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from scaffold_lib.evaluation.decoding import DecodeConfig
        from scaffold_lib.evaluation.stages import load_for_eval

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
                "steps": [
                    json.dumps([{"signal": s.signal, "text": s.text, "confidence": s.confidence} for s in g.steps])
                    for g in gens
                ],
                "response": [g.render() for g in gens],
            }
        )
