"""Scaffolded decoding (paper §3.3): predict the next signal with its confidence; if it is at least τ, write
the step conditioned on it (signal embedding at every position + the signal's text prefix) up to the blank-line
boundary; otherwise, or when the signal is `response_generation`, write the answer. The KV cache is kept
across steps; greedy by default; guards on steps and tokens.

Variants for the ablations: predicted signals, golden signals (the teacher's labels), random signals (each
predicted step signal replaced by a uniform draw), and summaries-only (the context keeps the question, the
`conclusion_summary` steps and the step just written).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from pydantic import BaseModel, Field
from transformers import DynamicCache, PreTrainedTokenizerBase

from scaffold_lib.answers import extract_final_answer
from scaffold_lib.examples import Formatter, signal_tags
from scaffold_lib.model import ScaffoldStudent
from scaffold_lib.signals import ANSWER_SIGNAL, CONCLUSION_SIGNAL, SIGNAL_INDEX, SIGNALS

Variant = Literal["predicted", "golden", "random", "summaries_only"]
STEP_SIGNALS = [s for s in SIGNALS if s != ANSWER_SIGNAL]


class DecodeConfig(BaseModel):
    tau: float = Field(0.96, ge=0.0, le=1.0, description="confidence needed to write another step (paper: 0.96)")
    max_steps: int = Field(16, ge=0)
    max_step_tokens: int = Field(64, ge=1)
    max_answer_tokens: int = Field(24, ge=1)
    max_tokens: int = Field(512, ge=1, description="new tokens over the whole generation")
    seed: int = 0


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


class ScaffoldDecoder:
    def __init__(self, model: ScaffoldStudent, tokenizer: PreTrainedTokenizerBase, cfg: DecodeConfig = DecodeConfig(),
                 tags: dict[str, str] | None = None) -> None:
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.fmt = Formatter(tokenizer, tags or signal_tags())
        self.device = next(model.parameters()).device

    # -- low level: feed tokens through the decoder, keeping the cache and the last hidden state

    def _reset(self, ids: list[int]) -> None:
        self.cache = DynamicCache(config=self.model.backbone.config)
        self._feed(ids)

    def _feed(self, ids: list[int]) -> None:
        out = self.model.decoder(input_ids=torch.tensor([ids], device=self.device), cache=self.cache,
                                 use_cache=True)
        self.cache = out.cache
        self.h_last = out.last_hidden_state[0, -1]

    def predict_signal(self) -> tuple[str, float]:
        probs = torch.softmax(self.model.signal_head(self.h_last).float(), -1)
        conf, idx = probs.max(-1)
        return SIGNALS[int(idx)], float(conf)

    def _write(self, signal: str, limit: int) -> list[int]:
        """Greedy tokens conditioned on `signal` until the step boundary, EOS or `limit`."""
        sig = torch.tensor([SIGNAL_INDEX[signal]], device=self.device)
        sep, eos = self.fmt.sep_ids, self.fmt.eos_id
        self._feed(self.fmt.tag_ids[signal])
        out: list[int] = []
        while len(out) < limit:
            logits = self.model.token_logits(self.h_last[None], sig)[0]
            token = int(logits.argmax())
            out.append(token)
            self._feed([token])
            if token == eos or out[-len(sep):] == sep:
                break
        return out

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(self, question: str, variant: Variant = "predicted", golden: Sequence[str] | None = None,
                 rng: random.Random | None = None) -> Generation:
        cfg, gen = self.cfg, Generation()
        rng = rng or random.Random(cfg.seed)
        if variant == "golden" and golden is None:
            raise ValueError("the golden variant needs the teacher's signal sequence")
        question_ids = self.fmt.question_ids(question)
        self._reset(question_ids)
        kept: list[tuple[str, list[int]]] = []  # summaries-only: (signal, ids) of the steps still in the context
        while True:
            k = len(gen.steps)
            if variant == "golden":
                signal, conf = (golden[k] if k < len(golden) else ANSWER_SIGNAL), None
            else:
                signal, conf = self.predict_signal()
                if conf < cfg.tau:
                    signal = ANSWER_SIGNAL
                elif variant == "random" and signal != ANSWER_SIGNAL:
                    signal, conf = rng.choice(STEP_SIGNALS), None
            budget = cfg.max_tokens - gen.new_tokens
            if signal != ANSWER_SIGNAL and (k >= cfg.max_steps or budget <= len(self.fmt.sep_ids)):
                signal, gen.stopped_by = ANSWER_SIGNAL, ("max_steps" if k >= cfg.max_steps else "max_tokens")
            if signal == ANSWER_SIGNAL:
                gen.stopped_by = gen.stopped_by or ("tau" if conf is not None and conf < cfg.tau else "answer")
                ids = self._write(ANSWER_SIGNAL, min(cfg.max_answer_tokens, max(1, budget)))
                gen.new_tokens += len(ids)
                gen.answer_text = self._text(ids)
                gen.answer = extract_final_answer(gen.answer_text)
                return gen
            ids = self._write(signal, min(cfg.max_step_tokens, budget))
            gen.new_tokens += len(ids)
            gen.steps.append(GeneratedStep(signal, self._text(ids), conf))
            if variant == "summaries_only":
                kept = [(s, step_ids) for s, step_ids in kept if s == CONCLUSION_SIGNAL]
                kept.append((signal, self.fmt.tag_ids[signal] + ids))
                self._reset(question_ids + [t for _, step_ids in kept for t in step_ids])


def plain_generate(model: ScaffoldStudent, tokenizer: PreTrainedTokenizerBase, question: str,
                   max_new_tokens: int = 512, tags: dict[str, str] | None = None) -> Generation:
    """The CoT-SFT baseline's decoding: HF `generate`, greedy, until EOS."""
    fmt = Formatter(tokenizer, tags or signal_tags())
    device = next(model.parameters()).device
    prompt = torch.tensor([fmt.question_ids(question)], device=device)
    with torch.no_grad():
        out = model.backbone.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=fmt.eos_id, pad_token_id=fmt.eos_id)
    new = out[0, prompt.size(1):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    parts = [p.strip() for p in text.split("\n\n") if p.strip()]
    gen = Generation(new_tokens=len(new), stopped_by="eos" if fmt.eos_id in new else "max_tokens")
    gen.steps = [GeneratedStep("", p, None) for p in parts[:-1]]
    gen.answer_text = parts[-1] if parts else ""
    gen.answer = extract_final_answer(gen.answer_text) if parts else None
    return gen
