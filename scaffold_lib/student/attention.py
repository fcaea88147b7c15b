"""Attention within each packed example, for training on packed rows.

A packed row holds several examples, each with position ids restarting at 0. The backbone's default (SDPA with the
block-diagonal mask transformers builds from those position ids) computes every query against every key of the row
and masks most of it away: on the CPU, with rows of 1,024 tokens and examples of ~100, that is ten times the work.
`packed_documents` runs causal SDPA on each example's slice instead (no mask, the CPU's fused causal kernel), so the
cost is the sum of the examples' squares, not the row's. Registered with transformers' attention interface; the
trainer selects it on the CPU (`gpu_attention.document_attention` chooses for every device: flash-attention's varlen
kernel or FlexAttention with a document mask on CUDA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

PACKED_DOCUMENTS = "packed_documents"


def example_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start of every example in one row (where the position restarts at 0), then the row's length."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return sorted({0, *starts}) + [int(position_ids.shape[-1])]


DocumentKernel = Callable[..., torch.Tensor]  # (module, query, key, value, dropout, scaling, position_ids) -> output


def within_examples(kernel: DocumentKernel) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function for transformers' interface that runs `kernel` (causal attention inside each example of
    each row, output in (batch, heads, length, dim)) on packed rows; anything else (a padding mask, a KV cache, no
    position ids) goes to transformers' SDPA unchanged."""

    @functools.wraps(kernel)
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                position_ids=position_ids,
                **kwargs,
            )
        out = kernel(module, query, key, value, dropout, scaling, position_ids)
        return out.transpose(1, 2).contiguous(), None

    return attention


@within_examples
def packed_documents_attention(module, query, key, value, dropout, scaling, position_ids) -> torch.Tensor:
    """Causal SDPA on each example's slice of each row."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for b in range(query.shape[0]):
        bounds = example_bounds(position_ids[b])
        rows.append(
            torch.cat(
                [
                    F.scaled_dot_product_attention(
                        query[b : b + 1, :, s:e],
                        key[b : b + 1, :, s:e],
                        value[b : b + 1, :, s:e],
                        dropout_p=dropout,
                        is_causal=True,
                        scale=scaling,
                    )
                    for s, e in zip(bounds, bounds[1:])
                ],
                dim=2,
            )
        )
    return torch.cat(rows, dim=0)


AttentionInterface.register(PACKED_DOCUMENTS, packed_documents_attention)
