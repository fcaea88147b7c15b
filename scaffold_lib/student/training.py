"""The trainer: multi-task loss L = (1 - β)·L_token + β·L_signal over packed rows, each term normalised by its
own count over the whole accumulated batch. The CoT-SFT baseline uses the same loop with the token term only.

CUDA with bf16 autocast when available, else CPU, on one code path. Checkpoints every N steps hold model,
optimizer, scheduler, RNG and data position (written to a temp dir, then renamed), and `train` resumes from
the newest one in `checkpoint_dir`. Batches are a pure function of (seed, micro-step), so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scaffold_lib.core.devices import pick_device
from scaffold_lib.core.errors import RunFailed
from scaffold_lib.student.checkpoints import (
    full_state,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    shard,
)
from scaffold_lib.student.config import TrainConfig
from scaffold_lib.student.gpu_attention import document_attention
from scaffold_lib.student.model import ScaffoldStudent


class LossNotFinite(RunFailed, FloatingPointError):
    """Training met a loss that is no finite number: nothing useful to register."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # total loss per optimizer step
    token_losses: list[float] = field(default_factory=list)
    signal_losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    resumed_from: int = 0
    train_tokens: int = 0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


def micro_batch_indices(n_rows: int, batch_size: int, seed: int, micro_step: int) -> torch.Tensor:
    """Row indices of micro-batch `micro_step`: epochs are seeded permutations, so this is resumable."""
    start = micro_step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx.extend(perm[offset : offset + batch_size - len(idx)].tolist())
    return torch.tensor(idx)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun / accelerate launch (rank 0 of 1 when started alone)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over all ranks (identity in one process)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun / accelerate set up through the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())


def _batch(data: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    b = {k: v[idx].to(device) for k, v in data.items()}
    seq = b["input_ids"].size(1)
    rows = torch.arange(len(idx), device=device).unsqueeze(1) * seq
    b["signal_positions"] = torch.where(b["signal_positions"] >= 0, b["signal_positions"] + rows, -1)
    return b


def _prepare_backbone(model: ScaffoldStudent, cfg: TrainConfig, device: torch.device) -> str:
    """Attention within each packed example, gradient checkpointing and LoRA adapters, as configured; returns the
    backbone's own attention implementation, which `train` restores before the model is saved."""
    backbone_config = model.decoder.config
    own_attention = backbone_config._attn_implementation
    backbone_config._attn_implementation = cfg.attn_implementation or document_attention(device) or own_attention
    if cfg.gradient_checkpointing:
        # transformers 5.17 (the GPU machine's) names it gradient_checkpointing_enable
        enable = getattr(model.backbone, "activation_checkpointing_enable", None)
        (enable or model.backbone.gradient_checkpointing_enable)({"use_reentrant": False})
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        # freezes the backbone but its adapters; the heads live outside the backbone and stay trainable
        model.backbone = get_peft_model(
            model.backbone,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return own_attention


def _loss_terms(cfg: TrainConfig) -> tuple[bool, bool]:
    """Which loss terms train: the token term unless β = 1, the signal term for the scaffold student unless β = 0."""
    return cfg.kind == "baseline" or cfg.beta < 1.0, cfg.kind == "scaffold" and cfg.beta > 0.0


def _accumulate(
    forward: torch.nn.Module,
    data: dict[str, torch.Tensor],
    cfg: TrainConfig,
    dist: Distributed,
    n_rows: int,
    step: int,
    device: torch.device,
    autocast: torch.autocast,
) -> tuple[float, float, int]:
    """One optimiser step's forward and backward passes over its `grad_accum` micro-batches (gradients accumulate on
    the parameters): this rank's token and signal loss terms, and the label tokens it saw."""
    use_token, use_signal = _loss_terms(cfg)
    tokens_seen = 0
    # the global micro-batch comes from the same pure (seed, step) mapping whatever the world size, and each
    # rank takes its slice: 2 ranks x B rows see exactly the rows 1 rank x 2B sees, and a checkpoint resumes
    # under any world size (a DistributedSampler's order would depend on the world size)
    batches = [
        _batch(
            data,
            micro_batch_indices(n_rows, cfg.batch_size * dist.world, cfg.seed, step * cfg.grad_accum + m)[
                dist.rank * cfg.batch_size : (dist.rank + 1) * cfg.batch_size
            ],
            device,
        )
        for m in range(cfg.grad_accum)
    ]
    # each term is normalised by its own count over the whole accumulated (global) batch
    n_tok, n_sig = (
        max(1.0, n)
        for n in dist.sum(
            sum(int((b["labels"] != -100).sum()) for b in batches),
            sum(int((b["signal_positions"] >= 0).sum()) for b in batches),
        )
    )
    tok_total = sig_total = 0.0
    for b in batches:
        with autocast:
            out = forward(
                b["input_ids"],
                b["labels"],
                b["position_ids"],
                b["signal_ids"],
                b["signal_positions"],
                b["signal_targets"],
                token_loss=use_token,
                signal_loss=use_signal,
            )
        loss = 0.0
        if use_token:
            weight = 1.0 if cfg.kind == "baseline" else 1.0 - cfg.beta
            loss = loss + weight * out["token_loss_sum"] / n_tok
            tok_total += out["token_loss_sum"].detach().item() / n_tok
        if use_signal:
            loss = loss + cfg.beta * out["signal_loss_sum"] / n_sig
            sig_total += out["signal_loss_sum"].detach().item() / n_sig
        (loss * dist.world).backward()
        tokens_seen += int((b["labels"] != -100).sum())
    return tok_total, sig_total, tokens_seen


def train(
    model: ScaffoldStudent,
    data: dict[str, torch.Tensor],
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` on packed rows (in this process, or as one rank of a torchrun launch), resuming from the latest
    checkpoint in `checkpoint_dir`; hands the model back in eval mode with the backbone's own attention.

    Longer than 80 lines because the set-up (sharding, optimiser, scheduler, resume, the DDP wrap) and the loop
    share that state, and the order of the collectives under DDP and FSDP (loss counts, checkpoints, barriers) must
    be read in one place; a step's forward and backward passes are `_accumulate`."""
    if cfg.learning_rate is None or cfg.warmup_steps is None:
        raise ValueError("the learning rate and warm-up depend on the backbone: pass cfg.resolved(pretrained=...)")
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model.to(device).train()
    own_attention = _prepare_backbone(model, cfg, device)
    use_token, use_signal = _loss_terms(cfg)
    sharded = cfg.fsdp and dist.world > 1
    if sharded and (cfg.lora_r or not (use_token and use_signal)):
        raise ValueError(
            "fsdp trains the scaffold student with both loss terms (0 < beta < 1) and no LoRA; "
            "use DDP (fsdp=false) for the baseline, beta 0/1 or LoRA"
        )
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else None
    last = latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    if sharded:
        if last is not None:  # full weights go in before the parameters are split over the ranks
            load_weights(last, model)
        shard(model)
    # parameters whose term is switched off get no gradient at all (not a zero gradient), so AdamW's weight
    # decay cannot move them: β = 0 leaves the signal head untouched, β = 1 the signal embedding.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler  # imported here: its module pulls in much of transformers

    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    result = TrainResult(steps=cfg.max_steps)
    start_step = 0
    if last is not None:
        start_step = load_checkpoint(last, model, optimizer, scheduler, result, sharded)
        result.resumed_from = start_step
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    # DDP (and FSDP) average gradients over ranks; the losses below are scaled by the world size so that the average
    # is the gradient of the one-process loss over the global batch. Unused parameters (a switched-off term) are
    # allowed under DDP.
    forward = (
        torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=cfg.kind == "baseline" or not (use_token and use_signal)
        )
        if dist.world > 1 and not sharded
        else model
    )
    if cfg.compile:
        forward = torch.compile(forward, backend=cfg.compile_backend)
    n_rows = cfg.rows_used(data["input_ids"].size(0))
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not progress or not dist.is_main,
        desc=f"train {cfg.kind}",
        unit="step",
    )
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start_step, cfg.max_steps):
        tok_total, sig_total, step_tokens = _accumulate(forward, data, cfg, dist, n_rows, step, device, autocast)
        tokens_seen += step_tokens
        tok_total, sig_total, global_tokens = dist.sum(tok_total, sig_total, tokens_seen)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total = ((1.0 if cfg.kind == "baseline" else 1.0 - cfg.beta) * tok_total if use_token else 0.0) + (
            cfg.beta * sig_total if use_signal else 0.0
        )
        if not math.isfinite(total):
            raise LossNotFinite(f"loss became {total} at step {step + 1}; lower the learning rate")
        result.losses.append(total)
        result.token_losses.append(tok_total)
        result.signal_losses.append(sig_total)
        elapsed = time.perf_counter() - t0
        result.tokens_per_s = global_tokens / elapsed if elapsed > 0 else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{result.tokens_per_s:,.0f}")
        if on_log is not None and dist.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
            on_log(
                step + 1,
                {
                    "loss": total,
                    "token_loss": tok_total,
                    "signal_loss": sig_total,
                    "tokens_per_s": result.tokens_per_s,
                    "lr": scheduler.get_last_lr()[0],
                },
            )
        if ckpt_root is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            model_state, optim_state = full_state(model, optimizer, sharded)  # a collective under FSDP
            if dist.is_main:  # one writer; the others wait so no rank runs ahead of a checkpoint being written
                save_checkpoint(
                    ckpt_root, step + 1, model_state, optim_state, scheduler, result, cfg.keep_checkpoints, sharded
                )
            dist.barrier()
    bar.close()
    result.train_tokens = int(global_tokens) if cfg.max_steps > start_step else 0
    if cfg.lora_r:  # the student is saved and served as a plain checkpoint: fold the adapters in
        model.backbone = model.backbone.merge_and_unload()
    model.decoder.config._attn_implementation = own_attention
    model.eval()
    return result
