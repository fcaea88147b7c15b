"""Scaffolded decoding (paper §3.3): predict the next signal with its confidence; if it is at least τ, write
the step conditioned on it (the signal's text prefix, and its embedding at every position of the step where the
student's `signal_injection` adds it) up to the blank-line boundary; otherwise, or when the signal is
`response_generation`, write the answer. The KV cache is kept across steps; greedy by default; guards on steps and
tokens.

Variants for the ablations: predicted signals, golden signals (the teacher's labels), random signals (each
predicted step signal replaced by a uniform draw), and summaries-only (the context keeps the question, the
`conclusion_summary` steps and the step just written).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from scaffold_lib.core.answers import extract_number
from scaffold_lib.data.signals import ANSWER_SIGNAL, CONCLUSION_SIGNAL, SIGNAL_INDEX, SIGNALS
from scaffold_lib.evaluation.config import DecodeConfig
from scaffold_lib.student.examples import STEP_SEPARATOR, Formatter, signal_tags
from scaffold_lib.student.model import NO_SIGNAL, ScaffoldStudent

Variant = Literal["predicted", "golden", "random", "summaries_only"]
STEP_SIGNALS = [s for s in SIGNALS if s != ANSWER_SIGNAL]


@dataclass
class GeneratedStep:
    signal: str
    text: str
    confidence: float | None  # the signal head's probability for the chosen signal (None when imposed)


@dataclass
class Generation:
    steps: list[GeneratedStep] = field(default_factory=list)
    answer_text: str = ""
    answer: str | None = None
    new_tokens: int = 0
    stopped_by: str = ""

    def render(self) -> str:
        lines = [f"[{s.signal}{'' if s.confidence is None else f' {s.confidence:.2f}'}] {s.text}" for s in self.steps]
        return "\n".join(lines + [f"[{ANSWER_SIGNAL}] {self.answer_text}"])


def left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with left padding, so every sequence's last token is in the last column."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


@dataclass
class _Sequence:
    """Decoding state of one question in a batch."""

    gen: Generation
    golden: Sequence[str] | None
    signal: str = ""
    queue: list[int] = field(default_factory=list)  # forced tokens still to feed (the signal's text prefix)
    written: list[int] = field(default_factory=list)  # tokens generated for the current step
    limit: int = 0
    step_start: int = 0  # cache column where the current step begins
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (signal, first column, end column) per step
    conf: float | None = None
    done: bool = False


class ScaffoldDecoder:
    """Batched scaffolded decoding: every sequence of a batch advances one token per forward pass, whether it is
    feeding a forced signal prefix or writing its step, so one KV cache serves the whole batch. Summaries-only
    drops pruned steps from the context by masking their cache columns."""

    def __init__(
        self,
        model: ScaffoldStudent,
        tokenizer: PreTrainedTokenizerBase,
        cfg: DecodeConfig = DecodeConfig(),
        fmt: Formatter | None = None,
    ) -> None:
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg.resolved(None)
        self.fmt = fmt or Formatter(tokenizer, signal_tags())
        self.device = next(model.parameters()).device
        # a step can only end on a token whose text holds a newline: the others skip the decode in _ends_step
        vocab = len(tokenizer)
        self.newline_ids = {i for i, t in enumerate(tokenizer.batch_decode([[i] for i in range(vocab)])) if "\n" in t}

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _ends_step(self, written: list[int]) -> bool:
        """A step ends at a blank line, however the model spelled it in tokens ("\n\n" as one token or two)."""
        return written[-1] in self.newline_ids and self.tokenizer.decode(written[-4:]).endswith(STEP_SEPARATOR)

    def generate(
        self,
        question: str,
        variant: Variant = "predicted",
        golden: Sequence[str] | None = None,
        rng: random.Random | None = None,
    ) -> Generation:
        return self.generate_batch([question], variant, [golden] if golden is not None else None, rng)[0]

    def _begin_step(
        self, seq: _Sequence, probs: torch.Tensor, variant: Variant, rng: random.Random, column: int
    ) -> None:
        """Choose the next signal (predicted with τ, golden, or random) under the guards, and queue its prefix."""
        cfg, gen = self.cfg, seq.gen
        k = len(gen.steps)
        conf: float | None = None
        if variant == "golden":
            signal = seq.golden[k] if k < len(seq.golden) else ANSWER_SIGNAL
        else:
            conf_t, idx = probs.max(-1)
            signal, conf = SIGNALS[int(idx)], float(conf_t)
            if conf < cfg.tau:
                signal, gen.stopped_by = ANSWER_SIGNAL, "tau"
            elif variant == "random" and signal != ANSWER_SIGNAL:
                signal, conf = rng.choice(STEP_SIGNALS), None
        budget = cfg.max_tokens - gen.new_tokens
        if signal != ANSWER_SIGNAL and (k >= cfg.max_steps or budget <= len(self.fmt.sep_ids)):
            signal, gen.stopped_by = ANSWER_SIGNAL, ("max_steps" if k >= cfg.max_steps else "max_tokens")
        gen.stopped_by = gen.stopped_by or ("answer" if signal == ANSWER_SIGNAL else "")
        seq.signal, seq.queue, seq.written, seq.step_start = signal, list(self.fmt.tag_ids[signal]), [], column
        # a step leaves at least one token of the budget to the answer, so new_tokens never exceeds max_tokens
        room = budget if signal == ANSWER_SIGNAL else budget - 1
        seq.limit = max(1, min(cfg.max_answer_tokens if signal == ANSWER_SIGNAL else cfg.max_step_tokens, room))
        seq.conf = conf

    @torch.no_grad()
    def generate_batch(
        self,
        questions: Sequence[str],
        variant: Variant = "predicted",
        goldens: Sequence[Sequence[str]] | None = None,
        rng: random.Random | None = None,
    ) -> list[Generation]:
        """Every question decoded in one batch, step by step, under `variant`'s signals (module docstring).

        Longer than 80 lines because the prefill, the token loop and the step boundaries share the batch's
        cache, mask and positions, which one forward pass per token advances for every sequence together;
        `_begin_step` holds what a new step decides."""
        if variant == "golden" and (goldens is None or any(g is None for g in goldens)):
            raise ValueError("the golden variant needs the teacher's signal sequence for every question")
        rng = rng or random.Random(self.cfg.seed)
        # one random stream per question, drawn in question order: the random variant then writes the same thing
        # whatever the batch size (the eval-config hash leaves the batch size out)
        rngs = [random.Random(rng.getrandbits(64)) for _ in questions]
        model, fmt, dev = self.model, self.fmt, self.device
        prompts = [fmt.question_ids(q) for q in questions]
        ids, mask = left_padded(prompts, fmt.eos_id)
        width = ids.size(1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.backbone.config)
        kw = _cache_keyword(model.decoder)
        out = model.decoder(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            use_cache=True,
            **{kw: cache},
        )
        cache, hidden = getattr(out, kw), out.last_hidden_state[:, -1]
        next_pos = torch.tensor([len(p) for p in prompts])
        seqs = [_Sequence(Generation(), goldens[i] if goldens else None) for i in range(len(prompts))]
        probs = torch.softmax(model.signal_head(hidden).float(), -1)
        for i, seq in enumerate(seqs):
            self._begin_step(seq, probs[i], variant, rngs[i], width)
        while not all(s.done for s in seqs):
            signal_ids = torch.tensor([SIGNAL_INDEX[s.signal] for s in seqs], device=dev)
            greedy = model.token_logits(hidden[:, None], signal_ids[:, None])[:, 0].argmax(-1).tolist()
            feed, active = [], []
            for i, s in enumerate(seqs):
                active.append(not s.done)
                if s.done:
                    feed.append(fmt.eos_id)
                elif s.queue:
                    feed.append(s.queue.pop(0))
                else:
                    s.written.append(greedy[i])
                    s.gen.new_tokens += 1
                    feed.append(greedy[i])
            # the fed token belongs to the current step (its tag or its text): input injection adds that signal
            fed_signals = torch.where(torch.tensor(active, device=dev), signal_ids, NO_SIGNAL)
            column = mask.size(1)
            mask = torch.cat([mask, torch.tensor(active, dtype=torch.long)[:, None]], dim=1)
            out = model.decoder(
                **model.decoder_inputs(torch.tensor(feed, device=dev)[:, None], fed_signals[:, None]),
                attention_mask=mask.to(dev),
                position_ids=next_pos[:, None].to(dev),
                use_cache=True,
                **{kw: cache},
            )
            cache, hidden = getattr(out, kw), out.last_hidden_state[:, -1]
            next_pos += torch.tensor(active, dtype=torch.long)
            probs = None
            for i, s in enumerate(seqs):
                if s.done or s.queue or not s.written:
                    continue
                w = s.written
                if not (w[-1] == fmt.eos_id or len(w) >= s.limit or self._ends_step(w)):
                    continue
                if s.signal == ANSWER_SIGNAL:
                    s.gen.answer_text = self._text(w)
                    s.gen.answer = extract_number(s.gen.answer_text)
                    s.done = True
                    continue
                s.gen.steps.append(GeneratedStep(s.signal, self._text(w), s.conf))
                s.spans.append((s.signal, s.step_start, column + 1))
                if variant == "summaries_only" and len(s.spans) > 1 and s.spans[-2][0] != CONCLUSION_SIGNAL:
                    _, first, end = s.spans[-2]  # the step before the one just written leaves the context
                    mask[i, first:end] = 0
                if probs is None:
                    probs = torch.softmax(model.signal_head(hidden).float(), -1)
                self._begin_step(s, probs[i], variant, rngs[i], column + 1)
        return [s.gen for s in seqs]


def _cache_keyword(decoder: torch.nn.Module) -> str:
    """The KV cache's argument and output name: `cache` in recent transformers, `past_key_values` before 5.2x (5.17 on
    the GPU machine); the old name still works but warns on every call where the new one exists."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_continuations(
    model: ScaffoldStudent, prompts: Sequence[list[int]], max_new_tokens: int, eos_id: int
) -> list[list[int]]:
    """The backbone's greedy continuation of each prompt (HF `generate`, one left-padded batch, until EOS): the new
    tokens only, EOS and the padding after it included."""
    ids, mask = left_padded(prompts, eos_id)
    device = next(model.parameters()).device
    out = model.backbone.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return out[:, ids.size(1) :].tolist()


def plain_generate_batch(
    model: ScaffoldStudent,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 512,
    fmt: Formatter | None = None,
) -> list[Generation]:
    """The CoT-SFT baseline's decoding: HF `generate`, greedy, left-padded batch, until EOS."""
    fmt = fmt or Formatter(tokenizer, signal_tags())
    gens = []
    for row in greedy_continuations(model, [fmt.question_ids(q) for q in questions], max_new_tokens, fmt.eos_id):
        new = row[: row.index(fmt.eos_id) + 1] if fmt.eos_id in row else row
        parts = [p.strip() for p in tokenizer.decode(new, skip_special_tokens=True).split(STEP_SEPARATOR) if p.strip()]
        gen = Generation(new_tokens=len(new), stopped_by="eos" if fmt.eos_id in new else "max_tokens")
        gen.steps = [GeneratedStep("", p, None) for p in parts[:-1]]
        gen.answer_text = parts[-1] if parts else ""
        gen.answer = extract_number(gen.answer_text) if parts else None
        gens.append(gen)
    return gens


def plain_generate(
    model: ScaffoldStudent,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    max_new_tokens: int = 512,
    fmt: Formatter | None = None,
) -> Generation:
    return plain_generate_batch(model, tokenizer, [question], max_new_tokens, fmt)[0]
