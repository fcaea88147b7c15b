"""Attention within each packed example on a GPU: FlexAttention with a document mask, and the automatic choice of the
attention implementation for training on packed rows.

A packed row holds several examples whose position ids restart at 0 (`student/shards.py`). `flex_documents` turns
those position ids into a FlexAttention block mask (causal, and a query sees only keys of its own example): blocks of
the row that lie wholly outside every example are skipped, not computed and masked, so the cost follows the
examples' squares like flash-attention's varlen kernel, without the `flash-attn` package (PyTorch's own kernel,
compiled by Triton on first use). The mask is built once per batch and shared by every layer.

`document_attention(device)` picks, for packed rows: flash-attention's varlen kernel when `flash-attn` is installed
(CUDA), else `flex_documents` (CUDA, compute capability 8.0+), else SDPA with the dense block-diagonal mask
transformers builds from the position ids; on the CPU `packed_documents` (`student/attention.py`).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import AttentionInterface

from scaffold_lib.student.attention import PACKED_DOCUMENTS, within_examples

FLEX_DOCUMENTS = "flex_documents"
_state: dict = {}  # the compiled kernel, and the last block mask with the position ids it was built from


def flex_supported(device: torch.device) -> bool:
    """FlexAttention's fused kernels (forward and backward) exist on CUDA; the CPU has a forward only."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def document_attention(device: torch.device) -> str | None:
    """The attention implementation for training on packed rows on `device` (None: the backbone's own)."""
    if device.type == "cpu":
        return PACKED_DOCUMENTS
    if device.type != "cuda":
        return None
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return FLEX_DOCUMENTS if flex_supported(device) else "sdpa"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its example within the row: a new example starts where the position is 0."""
    return (position_ids == 0).cumsum(-1)


def document_block_mask(position_ids: torch.Tensor, batch: int, length: int):
    """The block mask of causal attention inside each example. Every layer of one forward pass gets the same
    position ids tensor, so the mask of the last one is kept and reused."""
    from torch.nn.attention.flex_attention import create_block_mask

    last = _state.get("mask")
    if last is not None and last[0] is position_ids and last[1] == position_ids._version:
        return last[2]
    docs = document_ids(position_ids.expand(batch, -1))

    def same_example_causal(b, h, q, kv):
        return (docs[b, q] == docs[b, kv]) & (q >= kv)

    mask = create_block_mask(same_example_causal, batch, None, length, length, device=position_ids.device)
    # holding the tensor keeps its id from being reused by another batch while the mask is cached
    _state["mask"] = (position_ids, position_ids._version, mask)
    return mask


def _flex(device: torch.device):
    """flex_attention compiled (the fused Triton kernel) on CUDA; eager (an unfused reference) elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "kernel" not in _state:
        _state["kernel"] = torch.compile(flex_attention, dynamic=False)
    return _state["kernel"]


@within_examples
def flex_documents_attention(module, query, key, value, dropout, scaling, position_ids) -> torch.Tensor:
    """FlexAttention with the document block mask."""
    if dropout:
        raise ValueError("flex_documents has no attention dropout; train with attention_dropout 0 or another kernel")
    batch, heads, length, _ = query.shape
    mask = document_block_mask(position_ids, batch, length)
    return _flex(query.device)(query, key, value, block_mask=mask, scale=scaling, enable_gqa=heads != key.shape[1])


AttentionInterface.register(FLEX_DOCUMENTS, flex_documents_attention)
