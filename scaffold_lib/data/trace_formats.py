"""The shapes of public reasoning-trace datasets, each read into one form: a question, its gold answer when the file
has one, and one or more samples (thinking, final answer, the verdict the dataset recorded).

| format | columns, as the public datasets have them | a row gives |
|---|---|---|
| `openr1` | `problem`, `answer`, `generations` (a list of R1 traces with `<think>`), optional lists `correctness_math_verify`, `is_reasoning_complete`, `finish_reasons` (OpenR1-Math-220k) | a sample per generation |
| `s1k` | `question`, `solution`, `thinking_trajectories` (a list) + `attempt` (s1K), or `deepseek_thinking_trajectory` + `deepseek_attempt` (s1K-1.1) | one sample |
| `columns` | `problem`, `generation` (open-r1's single-generation dumps), or any columns named by the field map | a sample per generation |
| `messages` | `messages`: [{`role`, `content`[, `reasoning_content`]}] (Mixture-of-Thoughts, the chats of OpenR1-Math / s1K) | one sample |
| `sharegpt` | `conversations`: [{`from`, `value`}], `human`/`gpt` or `user`/`assistant` (Bespoke-Stratos, OpenThoughts) | one sample |

`auto` picks the first format in this order whose marker column the file has (OpenR1-Math and s1K also carry a
`messages` column: their own columns decide first) and the report says which. In a chat the user turn is the question
and the assistant turn after it holds the reasoning (`<think>…</think>`, a `reasoning_content` field, or Bespoke's
`<|begin_of_thought|>` markers) and the answer. The gold answer is the `answer` column, else `solution` (its last
`\\boxed{}`), when the file has one. Every default column can be renamed with the field map (`--fields`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from scaffold_lib.core.answers import boxed_contents, gold_answer, normalise_number
from scaffold_lib.core.files import text_error

FORMATS = ("openr1", "s1k", "columns", "messages", "sharegpt")  # the order `auto` tries them in
TraceFormat = Literal["auto", "openr1", "s1k", "columns", "messages", "sharegpt"]

# s1K's (thinking, attempt, verdict) columns: v1.0's Gemini trajectories, then v1.1's R1 and Gemini ones
S1K_VARIANTS = (
    ("thinking_trajectories", "attempt", None),
    ("deepseek_thinking_trajectory", "deepseek_attempt", "deepseek_grade"),
    ("gemini_thinking_trajectory", "gemini_attempt", "gemini_grade"),
)
GOLD_COLUMNS = ("answer", "solution")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant"}
IGNORED_ROLES = ("system", "tool")
# Bespoke-Stratos / OpenThoughts wrap the reasoning and the answer in these instead of <think>
THOUGHT = ("<|begin_of_thought|>", "<|end_of_thought|>")
SOLUTION = ("<|begin_of_solution|>", "<|end_of_solution|>")


def split_reasoning(content: str | None, reasoning: str | None = None) -> tuple[str, str]:
    """(thinking, answer) from a reasoning model's message: the separate field wins, else `<think>` tags, else
    the content is all answer. An unterminated `<think>` (generation cut by max_tokens) is all thinking."""
    content = content or ""
    if reasoning and reasoning.strip():
        return reasoning.strip(), content.strip()
    body = content.lstrip()
    if body.startswith("<think>"):  # string search, not a regex: a trace can be tens of kilobytes
        end = body.find("</think>")
        if end < 0:
            return body[len("<think>") :].strip(), ""
        return body[len("<think>") : end].strip(), body[end + len("</think>") :].strip()
    return "", content.strip()


class TraceFieldMap(BaseModel):
    """Which columns hold what; a field left unset takes the format's column (see `scaffold_lib.data.trace_formats`).
    The `columns` format's defaults fit open-r1's single-generation files (`problem`, `generation` with <think>)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt mapping key must not be ignored

    question: str | None = Field(None, description="the question (chats: default the user turn)")
    thinking: str | None = Field(None, description="the reasoning: a string, or a list of samples")
    answer: str | None = Field(None, description="a separate final-answer column (s1K's attempt)")
    gold: str | None = Field(None, description="the gold answer (default: answer, else solution, when present)")
    verdict: str | None = Field(None, description="the dataset's own correctness verdict (a bool, or a list of them)")
    chat: str | None = Field(None, description="the chat list (messages / conversations)")
    problem_id: str | None = Field(None, description="a column of our problem ids (traces made from our export)")


@dataclass(frozen=True)
class Columns:
    """A file's format with its columns resolved: the format's defaults, the field map over them."""

    format: str
    detected: bool  # chosen by `auto`
    question: str | None  # None: a chat's user turn
    thinking: str | None  # None for chats
    answer: str | None
    chat: str | None
    gold: str | None
    verdict: str | None
    problem_id: str | None
    finish_reasons: str | None = None
    complete: str | None = None  # OpenR1's is_reasoning_complete

    @property
    def label(self) -> str:
        return f"{self.format} (auto)" if self.detected else self.format

    @property
    def key(self) -> str | None:
        """The column rows are matched on without parsing them (None: a chat's question is inside the chat)."""
        return self.problem_id or self.question

    def problem_columns(self) -> list[str]:
        """What the problems stage reads: the question (or the chat holding it) and the gold answer."""
        return [c for c in (self.question or self.chat, self.gold, self.problem_id) if c]


def detect(names: Collection[str], fields: TraceFieldMap = TraceFieldMap()) -> str:
    """The format a file's columns say; `columns` when none of the named formats' markers is there."""
    if "generations" in names:
        return "openr1"
    if any(thinking in names for thinking, _, _ in S1K_VARIANTS):
        return "s1k"
    if (fields.thinking or "generation") in names:
        return "columns"
    if (fields.chat and fields.chat in names) or "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    return "columns"  # its default columns are then missing: every row is quarantined with the field it lacks


def resolve_columns(fmt: str, names: Collection[str], fields: TraceFieldMap = TraceFieldMap()) -> Columns:
    """The columns of a file with these column names, read as `fmt` (`auto`: detected)."""
    detected = fmt == "auto"
    fmt = detect(names, fields) if detected else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    base: dict = {"question": None, "thinking": None, "answer": None, "chat": None, "verdict": None}
    extra: dict = {}
    if fmt == "openr1":
        base.update(question="problem", thinking="generations", verdict="correctness_math_verify")
        extra = {"finish_reasons": "finish_reasons", "complete": "is_reasoning_complete"}
    elif fmt == "s1k":
        thinking, attempt, verdict = next((v for v in S1K_VARIANTS if v[0] in names), S1K_VARIANTS[0])
        base.update(question="question", thinking=thinking, answer=attempt, verdict=verdict)
    elif fmt == "columns":
        base.update(question="problem", thinking="generation")
    else:
        base["chat"] = "messages" if fmt == "messages" else "conversations"
    given = fields.model_dump(exclude_none=True)
    base.update({k: v for k, v in given.items() if k in base})
    if "verdict" not in given and base["verdict"] not in names:
        base["verdict"] = None  # a default verdict column the file lacks is no verdict, not a missing field
    taken = {base["question"], base["thinking"], base["answer"], base["chat"]}
    gold = given.get("gold") or next((c for c in GOLD_COLUMNS if c in names and c not in taken), None)
    return Columns(fmt, detected, gold=gold, problem_id=fields.problem_id, **base, **extra)


# --- reading one row -----------------------------------------------------------------------------------------------


class RowError(NamedTuple):
    """Why a row (or one sample of it) cannot be used; `raw` is what to keep of a bad sample (default: the row)."""

    field: str
    error: str
    raw: str | None = None


@dataclass(frozen=True)
class Sample:
    thinking: str
    answer: str
    verdict: bool | None = None  # the dataset's own verdict, kept beside ours
    verdict_unreadable: bool = False  # a verdict value we could not read (counted, never guessed)
    finish_reason: str | None = None
    incomplete: bool = False  # the dataset says the reasoning did not finish


def string_error(value, required: bool = True) -> str | None:
    """Why `value` is not a usable text field, or None."""
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if required and not value.strip():
        return "is empty"
    return text_error(value)


def row_question(row: dict, cols: Columns) -> str | RowError:
    if cols.question is None:
        chat = _chat(row, cols)
        return chat if isinstance(chat, RowError) else chat[0]
    value = row.get(cols.question)
    error = string_error(value)
    return RowError(cols.question, error) if error else value


def row_problem_id(row: dict, cols: Columns) -> str | None | RowError:
    if cols.problem_id is None or row.get(cols.problem_id) is None:
        return None
    value = row[cols.problem_id]
    error = string_error(value)
    return RowError(cols.problem_id, error) if error else value


def row_gold(row: dict, cols: Columns) -> str | None | RowError:
    """The gold answer's text, None when the file has no gold column."""
    if cols.gold is None:
        return None
    value = row.get(cols.gold)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    error = string_error(value)
    return RowError(cols.gold, error) if error else value


def trace_gold(raw: str) -> tuple[str, str]:
    """(gold, answer_type) of a trace dataset's gold field: a number, else the last `\\boxed{}` of a worked solution,
    else the text, compared as math (math-verify) when it is one short line, as text otherwise."""
    gold, kind = gold_answer(raw)
    if kind == "number":
        return gold, kind
    boxed = boxed_contents(raw)
    if boxed:
        inner = boxed[-1].strip()
        number = normalise_number(inner)
        return (number, "number") if number is not None else (inner, "math")
    return gold, "math" if "\n" not in gold and len(gold) <= 200 else "text"


def row_samples(row: dict, cols: Columns) -> list[Sample | RowError] | RowError:
    """The row's samples; a bad one is a `RowError` in its place (the others still count), a bad row one error."""
    if cols.chat is not None and cols.thinking is None:
        chat = _chat(row, cols)
        if isinstance(chat, RowError):
            return chat
        turn = chat[1]
        content, reasoning = (
            turn.get("content", turn.get("value")),
            turn.get("reasoning_content", turn.get("reasoning")),
        )
        if reasoning is not None and (error := string_error(reasoning, required=False)):
            return RowError(f"{cols.chat}.reasoning_content", error)
        # a separate reasoning field (vLLM's reasoning parser, DeepSeek's API) is the thinking, the content the answer
        thinking, answer = (
            (reasoning.strip(), content.strip()) if reasoning and reasoning.strip() else split_text(content)
        )
        verdict, unreadable = _verdict(row.get(cols.verdict) if cols.verdict else None)
        return [Sample(thinking, answer, verdict, unreadable)]
    value = row.get(cols.thinking)
    answer = row.get(cols.answer) if cols.answer else None
    if answer is not None and (error := string_error(answer, required=False)):
        return RowError(cols.answer, error)
    if isinstance(value, str):
        if error := string_error(value):
            return RowError(cols.thinking, error)
        texts = [value]
    elif isinstance(value, (list, tuple)) and value:
        if cols.format == "s1k":  # s1K's trajectory list is one trajectory in parts, answered by one attempt
            bad = next((i for i, part in enumerate(value) if string_error(part)), None)
            if bad is not None:
                return RowError(f"{cols.thinking}[{bad}]", string_error(value[bad]))
            texts = ["\n\n".join(part.strip() for part in value)]
        else:
            texts = list(value)
    elif value is None or isinstance(value, (list, tuple)):
        return RowError(cols.thinking, "missing" if value is None else "is an empty list")
    else:
        return RowError(cols.thinking, f"must be a string or a list of strings, got {type(value).__name__}")
    verdicts = row.get(cols.verdict) if cols.verdict else None
    finish = row.get(cols.finish_reasons) if cols.finish_reasons else None
    complete = row.get(cols.complete) if cols.complete else None
    samples: list[Sample | RowError] = []
    for i, text in enumerate(texts):
        if error := string_error(text):
            name = f"{cols.thinking}[{i}]"  # the sample's own place: two bad samples of a row are two quarantine rows
            samples.append(RowError(name, error, f"{name}: {text!r}"[:500]))
            continue
        thinking, final = split_text(text, answer)
        verdict, unreadable = _verdict(_nth(verdicts, i, len(texts)))
        reason = _nth(finish, i, len(texts))
        done = _nth(complete, i, len(texts))
        samples.append(
            Sample(thinking, final, verdict, unreadable, reason if isinstance(reason, str) else None, done is False)
        )
    return samples


def _nth(value, i: int, n: int):
    """The i-th of a per-sample list, or a scalar that belongs to the row's only sample."""
    if isinstance(value, (list, tuple)):
        return value[i] if i < len(value) else None
    return value if n == 1 else None


_VERDICTS = {"yes": True, "true": True, "correct": True, "no": False, "false": False, "incorrect": False}


def _verdict(value) -> tuple[bool | None, bool]:
    """(verdict, unreadable): a bool, 0/1, or yes/no/true/false/correct/incorrect as s1K-1.1's grades are written."""
    if value is None:
        return None, False
    if isinstance(value, bool):
        return value, False
    if isinstance(value, int) and value in (0, 1):
        return bool(value), False
    if isinstance(value, str) and value.strip().lower() in _VERDICTS:
        return _VERDICTS[value.strip().lower()], False
    return None, True


def split_text(text: str, answer: str | None = None) -> tuple[str, str]:
    """(thinking, final answer) of a trace text: `<think>` tags, else Bespoke's thought/solution markers, else all
    answer. With its own non-empty answer, the text is all reasoning even untagged."""
    thinking, final = split_reasoning(text)
    if not thinking and text.lstrip().startswith(THOUGHT[0]):
        body = text.lstrip()[len(THOUGHT[0]) :]
        end = body.find(THOUGHT[1])
        thinking, final = (body, "") if end < 0 else (body[:end], body[end + len(THOUGHT[1]) :])
        final = final.strip().removeprefix(SOLUTION[0]).split(SOLUTION[1], 1)[0]
        thinking, final = thinking.strip(), final.strip()
    if answer and answer.strip():
        return thinking or text.strip(), answer.strip()
    return thinking, final


def _chat(row: dict, cols: Columns) -> tuple[str, dict] | RowError:
    """(question, the assistant turn answering it) of a single-question chat."""
    name = cols.chat
    turns = row.get(name)
    if not isinstance(turns, (list, tuple)) or not turns:
        error = "missing" if turns is None else "is empty" if isinstance(turns, (list, tuple)) else None
        return RowError(name, error or f"must be a list of turns, got {type(turns).__name__}")
    roles: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return RowError(f"{name}[{i}]", f"must be an object with role and content, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        if not isinstance(role, str) or (role.lower() not in ROLES and role.lower() not in IGNORED_ROLES):
            return RowError(f"{name}[{i}].role", f"unknown role {role!r}; expected user/human or assistant/gpt")
        content = turn.get("content", turn.get("value"))
        if error := string_error(content, required=ROLES.get(role.lower()) == "user"):
            return RowError(f"{name}[{i}].content", error)
        roles.append(ROLES.get(role.lower(), "other"))
    users = [i for i, r in enumerate(roles) if r == "user"]
    if not users:
        return RowError(name, "no user turn (the question)")
    if len(users) > 1:
        return RowError(name, f"{len(users)} user turns: only single-question chats are imported")
    reply = next((i for i in range(users[0] + 1, len(turns)) if roles[i] == "assistant"), None)
    if reply is None:
        return RowError(name, "no assistant turn after the question")
    first = turns[users[0]]
    return first.get("content", first.get("value")).strip(), turns[reply]
