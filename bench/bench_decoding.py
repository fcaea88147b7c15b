"""Decoding throughput: scaffolded decoding (batched, KV cache, signal head + embedding per token) vs plain HF
`generate` (greedy, KV cache) on the same tiny model and the same questions, batch of 32.

Both are forced to produce the same number of tokens per question (an untrained model never stops on its own,
so every sequence runs to its budget). Metric: generated tokens per second.

    .venv/bin/python -m bench.bench_decoding [--questions 64] [--tokens 128]     # a module: it imports bench.common
"""

import argparse
import time

import torch
from transformers.utils import logging as hf_logging

from bench.common import tiny_student
from scaffold_lib.data.signals import ANSWER_SIGNAL
from scaffold_lib.evaluation.config import DecodeConfig
from scaffold_lib.evaluation.decoding import ScaffoldDecoder, plain_generate_batch
from scaffold_lib.student.model import ScaffoldStudent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    base, tokenizer, fmt, items = tiny_student(n_problems=300)
    questions = [q for _, q, _, _ in items][: args.questions]
    model = ScaffoldStudent.from_pretrained(base)
    # steps of up to 32 tokens until the whole budget is used
    cfg = DecodeConfig(tau=0.0, max_steps=1000, max_step_tokens=32, max_tokens=args.tokens, max_answer_tokens=1)
    decoder = ScaffoldDecoder(model, tokenizer, cfg)
    batches = [questions[i : i + args.batch] for i in range(0, len(questions), args.batch)]
    with torch.no_grad():
        start = time.perf_counter()
        # forced signals (an untrained head may predict the answer at once): steps until the budget is spent
        goldens = [["reasoning_analysis"] * args.tokens] * args.batch
        gens = [g for b in batches for g in decoder.generate_batch(b, "golden", goldens[: len(b)])]
        scaffold_s = time.perf_counter() - start
        scaffold_tokens = sum(g.new_tokens for g in gens)
        # the signal tags it feeds (one forward each, like a generated token) are tokens of its reply too
        tags = sum(len(decoder.fmt.tag_ids[s.signal]) for g in gens for s in g.steps)
        tags += len(gens) * len(decoder.fmt.tag_ids[ANSWER_SIGNAL])
        start = time.perf_counter()
        plain_tokens = sum(
            g.new_tokens for b in batches for g in plain_generate_batch(model, tokenizer, b, args.tokens)
        )
        plain_s = time.perf_counter() - start
    s, p = scaffold_tokens / scaffold_s, plain_tokens / plain_s
    reply = (scaffold_tokens + tags) / scaffold_s
    print(f"{len(questions)} questions, batch {args.batch}, budget {args.tokens} new tokens each")
    print(
        f"scaffolded decoding: {scaffold_tokens:,} generated + {tags:,} signal tags fed in {scaffold_s:.1f} s = "
        f"{s:,.0f} generated tokens/s, {reply:,.0f} reply tokens/s"
    )
    print(f"plain HF generate:   {plain_tokens:,} tokens in {plain_s:.1f} s = {p:,.0f} tokens/s")
    print(
        f"ratio scaffold / generate: {reply / p:.2f}x per reply token, {s / p:.2f}x per generated token (goal >= 1.0x)"
    )


if __name__ == "__main__":
    main()
