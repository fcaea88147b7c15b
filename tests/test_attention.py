"""Attention within each packed example (`packed_documents`, the trainer's default on the CPU) gives the losses and
gradients of the backbone's masked SDPA, and an example's logits in a packed row equal its logits alone."""

from __future__ import annotations

import json

import torch

from scaffold_lib.student.attention import PACKED_DOCUMENTS, example_bounds
from scaffold_lib.student.config import TrainConfig
from scaffold_lib.student.model import ScaffoldStudent, build_embedded_base
from scaffold_lib.student.training import train
from student_kit import TINY

LENGTHS = [(5, 9, 2), (12, 4)]  # two rows: three examples, two examples, then padding to 16


def _packed(vocab: int, row_len: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids, position_ids = [], []
    for lengths in LENGTHS:
        pieces = [*lengths, row_len - sum(lengths)]
        input_ids.append(torch.randint(0, vocab, (row_len,), generator=g))
        position_ids.append(torch.cat([torch.arange(n) for n in pieces]))
    ids = torch.stack(input_ids)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.stack(position_ids),
        "signal_ids": torch.randint(0, 7, ids.shape, generator=g),
        "signal_positions": torch.tensor([[2, 20], [3, -1]]),
        "signal_targets": torch.tensor([[1, 4], [2, 0]]),
    }


def _student(tmp_path, kind: str = "scaffold") -> ScaffoldStudent:
    base = build_embedded_base(TINY, ["a b c d e f g h"] * 20, tmp_path / "base")
    torch.manual_seed(0)
    return ScaffoldStudent.from_pretrained(base, kind=kind).double()


def _losses_and_grads(model: ScaffoldStudent, batch: dict, attention: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.decoder.config._attn_implementation = attention
    model.zero_grad()
    out = model(**batch)
    loss = out["token_loss_sum"] + out["signal_loss_sum"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_example_bounds_split_a_row_where_positions_restart():
    assert example_bounds(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])) == [0, 3, 5, 6, 8]
    assert example_bounds(torch.tensor([3, 4, 0, 1])) == [0, 2, 4]  # a row opening mid-example (a split chunk)


def test_packed_documents_equals_masked_sdpa_losses_and_gradients(tmp_path):
    model = _student(tmp_path)
    batch = _packed(model.backbone.config.vocab_size)
    sdpa_loss, sdpa_grads = _losses_and_grads(model, batch, "sdpa")
    docs_loss, docs_grads = _losses_and_grads(model, batch, PACKED_DOCUMENTS)
    assert torch.allclose(sdpa_loss, docs_loss, rtol=1e-10, atol=1e-10)
    assert len(sdpa_grads) == len(docs_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-10) for a, b in zip(sdpa_grads, docs_grads))


def test_an_example_in_a_packed_row_sees_only_itself(tmp_path):
    model = _student(tmp_path, kind="baseline")
    batch = _packed(model.backbone.config.vocab_size)
    model.decoder.config._attn_implementation = PACKED_DOCUMENTS
    with torch.no_grad():
        packed = model.token_logits(model.hidden_states(batch["input_ids"], batch["position_ids"]), None)
        alone = model.token_logits(
            model.hidden_states(batch["input_ids"][:1, 5:14], batch["position_ids"][:1, 5:14]), None
        )
    assert torch.allclose(packed[0, 5:14], alone[0], atol=1e-10)


def test_training_uses_it_on_cpu_and_saves_the_backbone_attention(tmp_path):
    model = _student(tmp_path).float()
    seen = []
    original = model.decoder.forward

    def spy(*args, **kwargs):
        seen.append(model.decoder.config._attn_implementation)
        return original(*args, **kwargs)

    model.decoder.forward = spy
    data = {k: v.repeat(2, 1) for k, v in _packed(model.backbone.config.vocab_size).items()}
    data["signal_positions"] = torch.full_like(data["signal_positions"], -1)
    cfg = TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, device="cpu").resolved(pretrained=False)
    train(model, data, cfg, progress=False)
    assert seen == [PACKED_DOCUMENTS] * 2
    out = model.save_pretrained(tmp_path / "student")
    assert PACKED_DOCUMENTS not in json.dumps(json.loads((out / "config.json").read_text()))
