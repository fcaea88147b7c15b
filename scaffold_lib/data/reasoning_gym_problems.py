"""reasoning-gym generators as a problem source (offline, real GSM8K-derived language): `gsm_symbolic` items come
with a worked solution, and the item's template is its group.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from scaffold_lib.core.answers import gold_answer
from scaffold_lib.core.files import DataFileError
from scaffold_lib.core.ids import content_id
from scaffold_lib.data.problems import Problem, SplitConfig, make_problem_id, normalise_question, split_of


class ReasoningGymConfig(BaseModel):
    """A reasoning-gym dataset (`pip install reasoning-gym`): items with a question, an answer and, for
    `gsm_symbolic`, a worked solution. The item's template is its group."""

    dataset: str = "gsm_symbolic"
    size: int = Field(500, ge=1)
    seed: int = 0


def load_reasoning_gym(cfg: ReasoningGymConfig, split: SplitConfig = SplitConfig()) -> list[Problem]:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise DataFileError(
            "problems source 'reasoning_gym' needs the reasoning-gym package: pip install 'reasoning-scaffold[real]'"
        ) from exc
    dataset = reasoning_gym.create_dataset(cfg.dataset, size=cfg.size, seed=cfg.seed)
    templates = getattr(dataset, "task_indices", None)
    problems, seen = [], set()
    for i in range(len(dataset)):
        item = dataset[i]
        gold, answer_type = gold_answer(str(item["answer"]))
        solution = (item.get("metadata") or {}).get("answer_cot")
        group_id = (
            f"{cfg.dataset}:template-{templates[i]}"
            if templates is not None
            else content_id("question", normalise_question(item["question"]))
        )
        pid = make_problem_id(item["question"], gold)
        if pid in seen:
            continue
        seen.add(pid)
        problems.append(
            Problem(
                pid,
                f"reasoning-gym/{cfg.dataset}",
                split_of(group_id, split),
                item["question"].strip(),
                gold,
                answer_type,
                group_id,
                solution,
            )
        )
    return problems
