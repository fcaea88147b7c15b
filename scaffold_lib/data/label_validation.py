"""LLM validation of signal labels (the paper's second labelling stage): an LLM confirms or corrects each
keyword label and labels the steps no keyword matched, constrained to the seven signal names.

The reply is parsed strictly (one signal name, or JSON `{"signal": name}` when structured output is on); an
invalid reply is answered with a correction and asked again, up to `max_reasks` times. Verdicts are keyed by
(validator, step text, proposed signal) so identical steps are asked once, a re-run asks nothing twice (the
warehouse table `llm_label_cache` holds them), and a killed run keeps every verdict already received (journal).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from scaffold_lib.core.ids import content_id
from scaffold_lib.data.config import EndpointConfig, EndpointConfigError
from scaffold_lib.data.endpoint import EndpointClient, error_summary
from scaffold_lib.data.journal import Journal
from scaffold_lib.data.signals import FALLBACK, KEYWORD, LLM, LLM_AGREE, LLM_OVERRIDE, PATTERN, SIGNALS

PROMPT_VERSION = "signal-validation-v1"
SIGNAL_GUIDE = {
    "addition_elaboration": "adds information or takes the next step (Also, In addition, Moreover, Next, Then)",
    "examples_illustration": "gives an example or illustration (For example, For instance, Consider)",
    "opinion_recall": "a personal opinion, belief or recollection (I think, I remember, I recall, Hmm)",
    "contrast_concession": "contrasts, doubts or corrects what came before (But, However, Wait, Although)",
    "reasoning_analysis": "reasons, computes or analyses (So, Because, Since, That means, Let me compute)",
    "conclusion_summary": "concludes or summarises the reasoning so far (Therefore, Thus, In summary)",
    "response_generation": "states the final answer to the question (The answer is …)",
}
SYSTEM_PROMPT = (
    "You label one step of a step-by-step reasoning trace with the semantic signal it carries. "
    "The seven signals are:\n"
    + "\n".join(f"- {name}: {what}" for name, what in SIGNAL_GUIDE.items())
    + "\nReply with exactly one signal name from this list and nothing else."
)
REASK = '"{reply}" is not one of the seven signal names. Reply with exactly one of: ' + ", ".join(SIGNALS) + "."
_CLEAN = re.compile(r"[`*\"'.\s]+")


class ValidatorConfig(BaseModel):
    endpoint: EndpointConfig
    max_reasks: int = Field(2, ge=0, description="corrections sent after an invalid reply")
    structured_output: bool = Field(
        False,
        description="send a JSON schema with the seven names as an enum "
        "(vLLM guided decoding, OpenAI structured outputs)",
    )


@dataclass(frozen=True)
class Verdict:
    signal: str | None  # None: no valid name after every re-ask
    reply: str
    attempts: int


def parse_signal(reply: str) -> str | None:
    """The signal name a reply gives, or None. Accepts the bare name (any case, quotes, backticks, a trailing
    period, spaces for underscores) or JSON {"signal": name}; anything else is invalid, never guessed."""
    text = reply.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text).get("signal", "")
        except (json.JSONDecodeError, AttributeError):
            return None
        text = value if isinstance(value, str) else ""
    name = _CLEAN.sub(" ", text).strip().lower().replace(" ", "_").replace("-", "_")
    return name if name in SIGNALS else None


def validation_messages(step: str, proposed: str | None) -> list[dict[str, str]]:
    hint = (
        f"The keyword labeller proposes: {proposed}. Confirm it or give the right signal."
        if proposed
        else "No keyword matched this step; give its signal."
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{hint}\n\nStep:\n<<<\n{step}\n>>>"},
    ]


def decide(labeller: str, keyword_signal: str | None, verdict: Verdict | None) -> tuple[str, str] | None:
    """(signal, labeller) after validation, or None to keep the keyword stage's label (no valid verdict)."""
    if verdict is None or verdict.signal is None:
        return None
    if labeller in (KEYWORD, PATTERN):
        return (keyword_signal, LLM_AGREE) if verdict.signal == keyword_signal else (verdict.signal, LLM_OVERRIDE)
    if labeller == FALLBACK:
        return verdict.signal, LLM
    return None


class LabelValidator:
    """Asks the LLM for verdicts, journalled by cache key."""

    def __init__(self, config: ValidatorConfig, journal_dir: str | Path = "journals", progress: bool = True) -> None:
        self.config = config
        self.identity = f"{config.endpoint.model}|{PROMPT_VERSION}|{config.endpoint.temperature}"
        self.journal_path = Path(journal_dir) / f"labels-{content_id('validator', self.identity)}.jsonl"
        self.progress = progress

    def cache_key(self, step: str, proposed: str | None) -> str:
        return content_id("llm-label", self.identity, step, proposed)

    def _extra(self) -> dict:
        if not self.config.structured_output:
            return {}
        schema = {
            "type": "object",
            "properties": {"signal": {"type": "string", "enum": list(SIGNALS)}},
            "required": ["signal"],
            "additionalProperties": False,
        }
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "signal", "schema": schema, "strict": True},
            }
        }

    async def _ask(self, client: EndpointClient, step: str, proposed: str | None) -> Verdict:
        messages = validation_messages(step, proposed)
        reply = ""
        for attempt in range(1, self.config.max_reasks + 2):
            completion = await client.complete(messages, **self._extra())
            reply = completion.answer or completion.thinking
            signal = parse_signal(reply)
            if signal is not None:
                return Verdict(signal, reply, attempt)
            messages = messages + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": REASK.format(reply=reply[:200])},
            ]
        return Verdict(None, reply, self.config.max_reasks + 1)

    def validate(self, items: Sequence[tuple[str, str, str | None]]) -> tuple[dict[str, Verdict], dict[str, str]]:
        return asyncio.run(self.avalidate(items))

    async def avalidate(
        self, items: Sequence[tuple[str, str, str | None]]
    ) -> tuple[dict[str, Verdict], dict[str, str]]:
        """Verdicts for (cache key, step text, proposed signal) items, and the errors of those that failed
        (transport errors: not cached, retried on the next run)."""
        verdicts: dict[str, Verdict] = {}
        errors: dict[str, str] = {}
        unique = list({key: (key, step, proposed) for key, step, proposed in items}.values())
        with Journal(self.journal_path, key="cache_key") as journal:
            todo = []
            for key, step, proposed in unique:
                record = journal.get(key)
                if record is None:
                    todo.append((key, step, proposed))
                else:
                    verdicts[key] = Verdict(record["signal"], record["reply"], record["attempts"])
            client = EndpointClient(self.config.endpoint)

            async def ask(item: tuple[str, str, str | None]) -> bool:
                key, step, proposed = item
                try:
                    verdict = await self._ask(client, step, proposed)
                except EndpointConfigError:
                    raise
                except Exception as exc:  # recorded and retried next run, never dropped
                    errors[key] = error_summary(exc)
                    return False
                journal.append(
                    {
                        "cache_key": key,
                        "signal": verdict.signal,
                        "reply": verdict.reply,
                        "attempts": verdict.attempts,
                        "proposed_signal": proposed,
                    }
                )
                verdicts[key] = verdict
                return True

            try:
                await client.map(todo, ask, "llm label validation", self.progress)
            finally:
                await client.aclose()
        return verdicts, errors
