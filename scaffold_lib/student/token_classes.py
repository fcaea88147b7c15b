"""Token loss per class of target token (digits, signal tags, other text), teacher-forced.

The average token loss hides where a student fails: digits are about a fifth of a trace's tokens, and a student
whose digit loss is ten times another's can show the same average (it happened; see docs/results.md). Both arms are
measured on their own training format, so the scaffold student's tag tokens are a class of their own and the other
classes compare like with like.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from scaffold_lib.student.model import ScaffoldStudent, input_signal_ids

CLASSES = ("text", "digit", "tag")
TEXT, DIGIT, TAG = range(len(CLASSES))


def vocabulary_classes(tokenizer: PreTrainedTokenizerBase, tags: dict[str, str]) -> np.ndarray:
    """The class of every token id: a digit token spells digits only (around spaces), a tag token is the single
    token of a signal tag, everything else is text."""
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    classes = np.full(vocab, TEXT, dtype=np.int64)
    for i, t in enumerate(texts):
        if t.strip().isdigit():
            classes[i] = DIGIT
    for ids in tokenizer(list(tags.values()), add_special_tokens=False)["input_ids"]:
        if len(ids) == 1:
            classes[ids[0]] = TAG
    return classes


@torch.no_grad()
def token_loss_by_class(
    model: ScaffoldStudent, data: dict[str, torch.Tensor], classes: np.ndarray, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """{class: {"loss": mean cross-entropy (nats), "accuracy": argmax accuracy, "tokens": count}} over every labelled
    token of packed rows `data` (as `load_rows` gives them), with the signals of the rows (golden) conditioning the
    scaffold student. The model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lookup = torch.as_tensor(classes, device=device)
    loss_sum = torch.zeros(len(CLASSES), dtype=torch.float64)
    hits = torch.zeros(len(CLASSES), dtype=torch.float64)
    counts = torch.zeros(len(CLASSES), dtype=torch.float64)
    for start in range(0, data["input_ids"].size(0), batch_size):
        b = {k: v[start : start + batch_size].to(device) for k, v in data.items()}
        steps = input_signal_ids(b["signal_ids"]) if model.injects_input else None
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], steps)
        logits = model.token_logits(hidden, b["signal_ids"]).float()
        labels = b["labels"]
        keep = labels != -100
        target = labels[keep]
        logits = logits[keep]
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="none").double().cpu()
        right = (logits.argmax(-1) == target).double().cpu()
        cls = lookup[target].cpu()
        loss_sum.index_add_(0, cls, loss)
        hits.index_add_(0, cls, right)
        counts.index_add_(0, cls, torch.ones_like(loss))
    model.train(was_training)
    return {
        name: {
            "loss": float(loss_sum[c] / counts[c]) if counts[c] else float("nan"),
            "accuracy": float(hits[c] / counts[c]) if counts[c] else float("nan"),
            "tokens": int(counts[c]),
        }
        for c, name in enumerate(CLASSES)
    }
