"""Teachers that are real language models: an OpenAI-compatible endpoint (vLLM, SGLang, Ollama, OpenAI) and a
local Hugging Face causal LM through `generate`. Both honour the `Teacher` contract (trace ids computable before
generating) and write every completion to a `Journal` the moment it arrives: a killed run keeps all finished
traces and the next run sends only the prompts not yet answered.

A reasoning model's thinking becomes the trace `text` and its final content `answer_text` (segmentation makes the
answer the last step); a model without separate thinking has its whole content as `text`.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from scaffold_lib.data.config import EndpointConfig, EndpointConfigError, HFTeacherConfig, PromptConfig
from scaffold_lib.data.endpoint import Completion, EndpointClient, error_summary
from scaffold_lib.data.journal import Journal
from scaffold_lib.data.problems import Problem
from scaffold_lib.data.teachers import TeacherFailure, TeacherResult, Trace, make_trace_id, trace_from_record
from scaffold_lib.data.trace_formats import split_reasoning


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "teacher"


def run_stats(
    traces: Sequence[Trace], failures: Sequence[TeacherFailure], sent: int, from_journal: int, wall_s: float
) -> dict:
    latencies = sorted(t.latency_s for t in traces if t.latency_s is not None)
    errors = Counter(f.error.split(":", 1)[0] for f in failures)
    return {
        "requests_answered": sent,
        "answers_from_journal": from_journal,
        "failed": len(failures),
        "errors": dict(errors),
        "wall_s": round(wall_s, 2),
        "answered_per_s": round(sent / wall_s, 2) if wall_s > 0 else 0.0,
        "prompt_tokens": sum(t.prompt_tokens for t in traces),
        "completion_tokens": sum(t.completion_tokens for t in traces),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "truncated": sum(1 for t in traces if t.finish_reason == "length"),
    }


class _JournalledTeacher:
    """What both LLM teachers share: ids, the journal, and turning records into traces."""

    identity: str
    prompt: PromptConfig

    def __init__(self, identity: str, prompt: PromptConfig, sampling: dict, journal_dir: str | Path) -> None:
        self.identity = identity
        self.prompt = prompt
        self.samples = prompt.samples
        self._sampling = sampling
        self.journal_path = Path(journal_dir) / f"{_slug(identity)}.jsonl"

    def trace_id_for(self, problem: Problem, sample: int = 0) -> str:
        return make_trace_id(
            problem.problem_id, self.identity, repr(self.prompt.messages(problem)), {**self._sampling, "sample": sample}
        )

    def _pending(
        self, problems: Sequence[Problem], journal: Journal
    ) -> tuple[list[tuple[Problem, int, str]], list[Trace]]:
        todo, kept = [], []
        for problem in problems:
            for sample in range(self.samples):
                trace_id = self.trace_id_for(problem, sample)
                record = journal.get(trace_id)
                if record is None:
                    todo.append((problem, sample, trace_id))
                else:
                    kept.append(trace_from_record(record, problem, self.identity))
        return todo, kept

    @staticmethod
    def _record(trace_id: str, problem: Problem, sample: int, c: Completion) -> dict:
        return {
            "trace_id": trace_id,
            "problem_id": problem.problem_id,
            "sample": sample,
            "thinking": c.thinking,
            "answer": c.answer,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "latency_s": round(c.latency_s, 4),
            "attempts": c.attempts,
            "endpoint": c.endpoint,
        }


class EndpointTeacher(_JournalledTeacher):
    """Traces from an OpenAI-compatible chat endpoint at bounded concurrency, with retries and journalled resume."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        prompt: PromptConfig = PromptConfig(),
        journal_dir: str | Path = "journals",
        name: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(name or f"openai:{endpoint.model}", prompt, endpoint.sampling(), journal_dir)
        self.endpoint = endpoint
        self.progress = progress

    def generate(self, problems: Sequence[Problem]) -> TeacherResult:
        return asyncio.run(self.agenerate(problems))

    async def agenerate(self, problems: Sequence[Problem]) -> TeacherResult:
        started = time.perf_counter()
        result = TeacherResult()
        with Journal(self.journal_path, key="trace_id") as journal:
            todo, kept = self._pending(problems, journal)
            result.traces.extend(kept)
            client = EndpointClient(self.endpoint)

            async def ask(item: tuple[Problem, int, str]) -> bool:
                problem, sample, trace_id = item
                try:
                    completion = await client.complete(self.prompt.messages(problem))
                except EndpointConfigError:
                    raise
                except Exception as exc:  # any per-request error is recorded with the problem, never dropped
                    result.failures.append(
                        TeacherFailure(trace_id, problem.problem_id, self.identity, error_summary(exc))
                    )
                    return False
                record = self._record(trace_id, problem, sample, completion)
                journal.append(record)
                result.traces.append(trace_from_record(record, problem, self.identity))
                return True

            try:
                progress = await client.map(todo, ask, f"teacher {self.identity}", self.progress)
            finally:
                await client.aclose()
        result.stats = run_stats(
            result.traces, result.failures, progress.done, len(kept), time.perf_counter() - started
        )
        return result


class HFTeacher(_JournalledTeacher):
    """Traces from a local causal LM through transformers `generate`, in left-padded batches (for a GPU box with no
    inference server). Uses the tokenizer's chat template when it has one."""

    def __init__(
        self,
        config: HFTeacherConfig,
        prompt: PromptConfig = PromptConfig(),
        journal_dir: str | Path = "journals",
        progress: bool = True,
    ) -> None:
        sampling = config.model_dump(exclude={"device", "batch_size"})
        super().__init__(f"hf:{Path(config.model).name or config.model}", prompt, sampling, journal_dir)
        self.config = config
        self.progress = progress

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from scaffold_lib.core.devices import pick_device

        device = pick_device(self.config.device)
        tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=dtype, use_safetensors=True).to(device)
        return torch, tokenizer, model.eval(), device

    def _prompt_text(self, tokenizer, problem: Problem) -> str:
        messages = self.prompt.messages(problem)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def generate(self, problems: Sequence[Problem]) -> TeacherResult:
        started = time.perf_counter()
        result = TeacherResult()
        with Journal(self.journal_path, key="trace_id") as journal:
            todo, kept = self._pending(problems, journal)
            result.traces.extend(kept)
            if todo:
                torch, tokenizer, model, device = self._load()
                cfg = self.config
                for start in tqdm(
                    range(0, len(todo), cfg.batch_size),
                    desc=f"teacher {self.identity}",
                    unit="batch",
                    disable=not self.progress,
                ):
                    batch = todo[start : start + cfg.batch_size]
                    texts = [self._prompt_text(tokenizer, p) for p, _, _ in batch]
                    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                    # each batch's seed depends on its first trace id, so a resumed run draws the same samples
                    torch.manual_seed(int(batch[0][2][:8], 16) ^ cfg.seed)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        out = model.generate(
                            **enc,
                            max_new_tokens=cfg.max_new_tokens,
                            do_sample=cfg.temperature > 0,
                            temperature=cfg.temperature or None,
                            top_p=cfg.top_p if cfg.temperature else None,
                            pad_token_id=tokenizer.pad_token_id,
                        )
                    latency = (time.perf_counter() - t0) / len(batch)
                    prompt_len = enc["input_ids"].shape[1]
                    for row, (problem, sample, trace_id) in enumerate(batch):
                        new = out[row, prompt_len:]
                        eos = (new == tokenizer.eos_token_id).nonzero()
                        n_new = int(eos[0]) if len(eos) else len(new)
                        thinking, answer = split_reasoning(tokenizer.decode(new[:n_new], skip_special_tokens=True))
                        if not (thinking or answer):
                            result.failures.append(
                                TeacherFailure(
                                    trace_id,
                                    problem.problem_id,
                                    self.identity,
                                    "EmptyCompletion: the model generated no text",
                                )
                            )
                            continue
                        record = self._record(
                            trace_id,
                            problem,
                            sample,
                            Completion(
                                thinking,
                                answer,
                                "stop" if len(eos) else "length",
                                int(enc["attention_mask"][row].sum()),
                                n_new,
                                latency,
                                1,
                                f"local:{device.type}",
                            ),
                        )
                        journal.append(record)
                        result.traces.append(trace_from_record(record, problem, self.identity))
        sent = len(result.traces) - len(kept)
        result.stats = run_stats(result.traces, result.failures, sent, len(kept), time.perf_counter() - started)
        return result
