"""Teacher backend `auto` (the default): the teacher is chosen per problem source, so an instance that holds the
built-in problems and a GSM8K file dropped into `incoming/` traces both without configuring anything.

| problems | teacher |
|---|---|
| the built-in synthetic generator (`synthetic-arith`, its OOD suites included) | the programmatic teacher |
| any other source, when an endpoint (`teacher.endpoint.base_urls` + `model`) or a local model (`teacher.hf.model`) is configured | that model |
| problem files whose answers are worked solutions (GSM8K's `… #### N`), reasoning-gym's `answer_cot` | `reference`: the solution itself |
| anything else | recorded as failed, with what to configure (asked again on the next run) |

Each trace keeps its own teacher's identity, so its id is the one that teacher alone would give: switching between
`auto` and a named backend never re-traces a problem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from scaffold_lib.data.problems import Problem
from scaffold_lib.data.synthetic import SYNTHETIC_SOURCE
from scaffold_lib.data.teachers import (
    ProgrammaticTeacher,
    ReferenceTeacher,
    Teacher,
    TeacherFailure,
    TeacherResult,
    make_trace_id,
)

NO_TEACHER = "auto:no-teacher"


class PerSourceTeacher:
    """Routes each problem to the teacher of its source (table above) and merges their results."""

    identity = "auto"

    def __init__(self, builtin: ProgrammaticTeacher, reference: ReferenceTeacher, model: Teacher | None = None) -> None:
        self.builtin, self.reference, self.model = builtin, reference, model
        self.identities = [t.identity for t in (builtin, reference, model) if t is not None]
        self.samples = max(t.samples for t in (builtin, reference, model) if t is not None)
        self.routed: Counter[tuple[str, str]] = Counter()  # (source, teacher) -> problems sent this run

    def route(self, problem: Problem) -> Teacher | None:
        if problem.source == SYNTHETIC_SOURCE:
            return self.builtin
        if self.model is not None:
            return self.model
        return self.reference if problem.solution else None

    def samples_for(self, problem: Problem) -> int:
        teacher = self.route(problem)
        return teacher.samples if teacher is not None else 1

    def trace_id_for(self, problem: Problem, sample: int = 0) -> str:
        teacher = self.route(problem)
        if teacher is None:  # the id of the failure recorded for it (and asked again next run)
            return make_trace_id(problem.problem_id, NO_TEACHER, "", {"sample": sample})
        return teacher.trace_id_for(problem, sample)

    def generate(self, problems: Sequence[Problem]) -> TeacherResult:
        groups: dict[str, tuple[Teacher, list[Problem]]] = {}
        result = TeacherResult()
        for problem in problems:
            teacher = self.route(problem)
            if teacher is None:
                result.failures.append(
                    TeacherFailure(
                        self.trace_id_for(problem),
                        problem.problem_id,
                        NO_TEACHER,
                        f"no teacher for source {problem.source!r}: its answers carry no worked solution (GSM8K "
                        "'#### N') and no endpoint is configured; set teacher.endpoint.base_urls and "
                        "teacher.endpoint.model (or teacher.hf.model), or import traces for it",
                    )
                )
                self.routed[problem.source, NO_TEACHER] += 1
                continue
            groups.setdefault(teacher.identity, (teacher, []))[1].append(problem)
            self.routed[problem.source, teacher.identity] += 1
        for teacher, batch in groups.values():
            part = teacher.generate(batch)
            result.traces += part.traces
            result.failures += part.failures
            result.quarantined += part.quarantined
            result.not_covered += part.not_covered
            result.stats.update(part.stats)  # only a model teacher has run statistics
        return result

    def by_source(self) -> str:
        """`source: teacher (n)` for each source this run sent problems of, for the report."""
        return "; ".join(f"{source}: {teacher} ({n})" for (source, teacher), n in sorted(self.routed.items()))
