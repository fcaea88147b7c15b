"""The scaffold student (paper §3.2): a causal LM backbone plus
(a) a signal embedding, one vector per signal, added for every token of a step, so the step is generated
    conditioned on its signal. Where it is added is `signal_injection` (the paper does not say): `output`, to the
    last hidden state before the LM head (after the final norm this is only a bias on the vocabulary logits);
    `input`, to the input embedding of each token of the step, so every layer is conditioned; `both`; or `none`
    (the signal reaches the step only through its tag token in the text: an ablation);
(b) a signal head, a classifier over the seven signals that predicts the *next* step's signal from the hidden
    state just before that step starts.

The backbone is any HF causal LM (hub id or local path) or the embedded default: a tiny Qwen2-architecture
model built from a config with a byte-level BPE tokenizer trained locally, saved with `save_pretrained` and
loaded back by path like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from scaffold_lib.core.errors import UserError
from scaffold_lib.data.signals import NUM_SIGNALS, SIGNALS
from scaffold_lib.student.config import SignalInjection, StudentConfig

HEADS_FILE = "scaffold_heads.safetensors"
SCAFFOLD_CONFIG = "scaffold.json"
NO_SIGNAL = -1  # signal id of tokens outside any step (the question, padding)
EOS_TOKEN = "<|endoftext|>"


class StudentLoadError(UserError):
    """A student directory cannot be used as it is; the message names the file and what is wrong."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, atomic: Iterable[str] = ()) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained on the training traces; digits split one by one (arithmetic needs them). `atomic`
    strings (the step separator, the signal prefixes) become single tokens, so a step boundary has one spelling."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(a, normalized=False, special=False) for a in atomic])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def build_embedded_base(
    cfg: StudentConfig, texts: Iterable[str], out_dir: str | Path, atomic: Iterable[str] = ()
) -> Path:
    """Train the tokenizer, initialise a tiny Qwen2 from a config, and save both as a normal HF checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, cfg.vocab_size, atomic)
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir)
    return out_dir


def prepare_pretrained_base(base_model: str, out_dir: str | Path, atomic: Iterable[str]) -> Path:
    """A pretrained backbone made ready for the scaffold format: the `atomic` strings (step separator, signal tags)
    become added tokens of its tokenizer, each new embedding row starting as the mean of the rows of the tokens that
    spelled the string before (so `[conclusion] ` starts near what "[conclusion] " meant), saved as safetensors."""
    from tokenizers import AddedToken

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(base_model)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), use_safetensors=True, dtype=torch.float32)
    before = {a: tokenizer(a, add_special_tokens=False)["input_ids"] for a in atomic}
    new = [a for a, ids in before.items() if len(ids) != 1]
    tokenizer.add_tokens([AddedToken(a, normalized=False, special=False) for a in new])
    if new:
        old_rows = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for table in {
                id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            }.values():
                for a in new:
                    row = tokenizer.convert_tokens_to_ids(a)
                    if row < old_rows:
                        raise ValueError(f"token {a!r} got id {row}, expected a new row past {old_rows}")
                    table.weight[row] = table.weight[before[a]].mean(0)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in float32 under bf16 autocast, but never below the model's own precision (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def input_signal_ids(signal_ids: torch.Tensor) -> torch.Tensor:
    """The signal of the step each *input* token belongs to, from `signal_ids` (the signal of the step the *next*
    token belongs to): shifted right by one. Input injection must use these: with `signal_ids` the token before a
    step would carry that step's signal, and the signal head, which reads that position, would see its own target.
    An example's last token has no signal, so the shift never carries one across packed examples."""
    shifted = torch.full_like(signal_ids, NO_SIGNAL)
    shifted[..., 1:] = signal_ids[..., :-1]
    return shifted


class ScaffoldStudent(nn.Module):
    """Backbone + signal embedding + signal head. `kind="baseline"` is the same backbone with the heads unused
    (the CoT-SFT baseline); it saves as a plain HF checkpoint."""

    def __init__(self, backbone: nn.Module, kind: str = "scaffold", injection: SignalInjection = "output") -> None:
        super().__init__()
        if kind not in ("scaffold", "baseline"):
            raise ValueError(f"kind must be 'scaffold' or 'baseline', got {kind!r}")
        if injection not in ("output", "input", "both", "none"):
            raise ValueError(f"signal injection must be output, input, both or none, got {injection!r}")
        self.kind = kind
        self.injection: SignalInjection = injection
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        # row NUM_SIGNALS is "no signal": fixed at zero, so question and padding tokens get nothing added
        self.signal_embedding = nn.Embedding(NUM_SIGNALS + 1, hidden, padding_idx=NUM_SIGNALS)
        nn.init.normal_(self.signal_embedding.weight, std=0.02)
        with torch.no_grad():
            self.signal_embedding.weight[NUM_SIGNALS].zero_()
        self.signal_head = nn.Linear(hidden, NUM_SIGNALS)

    @property
    def decoder(self) -> nn.Module:
        # a LoRA-wrapped backbone (peft) hides the causal LM behind get_base_model()
        backbone = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return getattr(backbone, backbone.base_model_prefix)

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def signal_vectors(self, signal_ids: torch.Tensor) -> torch.Tensor:
        return self.signal_embedding(torch.where(signal_ids < 0, NUM_SIGNALS, signal_ids))

    @property
    def injects_input(self) -> bool:
        return self.kind == "scaffold" and self.injection in ("input", "both")

    @property
    def injects_output(self) -> bool:
        return self.kind == "scaffold" and self.injection in ("output", "both")

    def decoder_inputs(self, input_ids: torch.Tensor, step_signal_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What the decoder is fed: the token ids, or with input injection their embeddings plus the signal vector
        of the step each token belongs to (`step_signal_ids`, see `input_signal_ids`)."""
        if not self.injects_input or step_signal_ids is None:
            return {"input_ids": input_ids}
        embeds = self.backbone.get_input_embeddings()(input_ids)
        return {"inputs_embeds": embeds + self.signal_vectors(step_signal_ids).to(embeds.dtype)}

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        step_signal_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # use_cache=False matters for packed rows: with a cache (HF's default, config.use_cache=True) the backbone
        # skips its packed-sequence detection from position_ids and every token attends across example borders
        kwargs.setdefault("use_cache", False)
        inputs = self.decoder_inputs(input_ids, step_signal_ids)
        return self.decoder(**inputs, position_ids=position_ids, **kwargs).last_hidden_state

    def token_logits(self, hidden: torch.Tensor, signal_ids: torch.Tensor | None) -> torch.Tensor:
        if self.injects_output and signal_ids is not None:
            hidden = hidden + self.signal_vectors(signal_ids).to(hidden.dtype)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        signal_ids: torch.Tensor | None = None,
        signal_positions: torch.Tensor | None = None,
        signal_targets: torch.Tensor | None = None,
        token_loss: bool = True,
        signal_loss: bool = True,
    ) -> dict:
        """Summed (not averaged) losses and their counts, so the trainer can normalise each term by its own count
        over the whole accumulated batch. `labels[t]` is the target of position t (already shifted).
        `signal_positions` are flat indices into batch*seq; -1 entries are padding."""
        step_signals = input_signal_ids(signal_ids) if self.injects_input and signal_ids is not None else None
        hidden = self.hidden_states(input_ids, position_ids, step_signals)
        out: dict[str, torch.Tensor] = {}
        if token_loss:
            logits = _at_least_fp32(self.token_logits(hidden, signal_ids))
            out["token_loss_sum"] = nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100, reduction="sum"
            )
            out["token_count"] = (labels != -100).sum()
        if signal_loss and self.kind == "scaffold" and signal_positions is not None:
            valid = signal_positions >= 0
            flat = hidden.reshape(-1, hidden.size(-1))[signal_positions[valid]]
            signal_logits = _at_least_fp32(self.signal_head(flat))
            out["signal_loss_sum"] = nn.functional.cross_entropy(signal_logits, signal_targets[valid], reduction="sum")
            out["signal_count"] = valid.sum()
            out["signal_correct"] = (signal_logits.argmax(-1) == signal_targets[valid]).sum()
        return out

    # --- persistence: backbone as a normal HF checkpoint (safetensors), heads in their own safetensors file

    def save_pretrained(
        self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, text_format: dict | None = None
    ) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        if self.kind == "scaffold":
            save_file(
                {
                    "signal_embedding.weight": self.signal_embedding.weight.detach().contiguous().cpu(),
                    "signal_head.weight": self.signal_head.weight.detach().contiguous().cpu(),
                    "signal_head.bias": self.signal_head.bias.detach().contiguous().cpu(),
                },
                str(out_dir / HEADS_FILE),
            )
        meta = {
            "kind": self.kind,
            **({"signal_injection": self.injection} if self.kind == "scaffold" else {}),
            "signals": list(SIGNALS),
            "hidden_size": self.backbone.config.hidden_size,
            **({"format": text_format} if text_format else {}),
            **({"tokenizer_hash": tokenizer_hash(tokenizer)} if tokenizer is not None else {}),
        }
        (out_dir / SCAFFOLD_CONFIG).write_text(json.dumps(meta, indent=2))
        return out_dir

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        kind: str | None = None,
        *,
        fresh_heads: bool = False,
        injection: SignalInjection | None = None,
        **model_kwargs,
    ) -> ScaffoldStudent:
        """Any HF causal LM path/id; a saved scaffold student also gets its heads back. Weights load from
        safetensors only (`use_safetensors=True`): a pickled checkpoint is refused.

        Fails loudly (`StudentLoadError`, naming the file) when a saved scaffold student's heads file is missing or
        does not fit the backbone, or when its signals differ from this build's. New, untrained heads are made only
        for a backbone that is not a saved scaffold student (the start of training) or with `fresh_heads=True`."""
        path_obj = Path(str(path))
        meta_path = path_obj / SCAFFOLD_CONFIG
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("signals", list(SIGNALS)) != list(SIGNALS):
            raise StudentLoadError(
                f"{meta_path}: trained with signals {meta['signals']}, this build has {list(SIGNALS)}"
            )
        backbone = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **model_kwargs)
        saved_injection = meta.get("signal_injection", "output" if meta.get("kind") == "scaffold" else None)
        if injection and saved_injection and injection != saved_injection and not fresh_heads:
            raise StudentLoadError(
                f"{meta_path}: trained with signal injection {saved_injection!r}, asked to load it with {injection!r}"
            )
        student = cls(
            backbone, kind=kind or meta.get("kind", "scaffold"), injection=injection or saved_injection or "output"
        )
        heads = path_obj / HEADS_FILE
        saved_scaffold = meta.get("kind") == "scaffold"
        if student.kind != "scaffold":
            return student
        if not heads.exists():
            if (saved_scaffold or meta.get("kind") == "baseline") and not fresh_heads:
                raise StudentLoadError(
                    f"{heads} is missing: {path_obj} is a saved {meta.get('kind')} student, and loading it as a scaffold "
                    "student would give it untrained signal heads (pass fresh_heads=True to start new heads on purpose)"
                )
            return student
        state = load_file(str(heads))
        expected = {
            "signal_embedding.weight": student.signal_embedding.weight.shape,
            "signal_head.weight": student.signal_head.weight.shape,
            "signal_head.bias": student.signal_head.bias.shape,
        }
        wrong = {
            k: tuple(state[k].shape) if k in state else None
            for k, shape in expected.items()
            if k not in state or tuple(state[k].shape) != tuple(shape)
        }
        if wrong:
            raise StudentLoadError(
                f"{heads}: heads do not fit this backbone (hidden {backbone.config.hidden_size}, "
                f"{NUM_SIGNALS} signals): {wrong} vs expected "
                f"{ {k: tuple(v) for k, v in expected.items()} }"
            )
        student.signal_embedding.weight.data.copy_(state["signal_embedding.weight"])
        student.signal_head.weight.data.copy_(state["signal_head.weight"])
        student.signal_head.bias.data.copy_(state["signal_head.bias"])
        return student


def check_tokenizer(path: str | Path, tokenizer: PreTrainedTokenizerBase, tags: dict[str, str]) -> None:
    """The tokenizer of a student directory is the one it was trained with and spells every signal tag as one token;
    else `StudentLoadError` naming the directory."""
    meta_path = Path(str(path)) / SCAFFOLD_CONFIG
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    recorded = meta.get("tokenizer_hash")
    if recorded and recorded != tokenizer_hash(tokenizer):
        raise StudentLoadError(
            f"{path}: its tokenizer (hash {tokenizer_hash(tokenizer)}) is not the one the student "
            f"was trained with ({recorded}, {meta_path})"
        )
    split = {
        tag: len(ids)
        for tag, ids in zip(tags.values(), tokenizer(list(tags.values()), add_special_tokens=False)["input_ids"])
        if len(ids) != 1
    }
    if split:
        raise StudentLoadError(
            f"{path}: the tokenizer lacks the signal tokens {sorted(split)} (each must be one token; "
            "prepare the backbone with the pipeline's pack stage, which adds them)"
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
