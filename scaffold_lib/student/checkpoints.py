"""Training checkpoints: written whole or not at all (a temporary folder renamed into place), the newest few kept,
tied weights stored once; under FSDP gathered into full, unsharded state on rank 0, so a checkpoint resumes under any
number of processes (but with the same `fsdp` setting). Also where FSDP2 splits the student into units."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from scaffold_lib.student.model import ScaffoldStudent

if TYPE_CHECKING:  # the trainer imports this module
    from scaffold_lib.student.training import TrainResult


def latest_checkpoint(root: Path) -> Path | None:
    if not root.exists():
        return None
    done = sorted(
        (p for p in root.glob("step-*") if (p / "trainer_state.json").exists()), key=lambda p: int(p.name.split("-")[1])
    )
    return done[-1] if done else None


def shard(model: ScaffoldStudent) -> None:
    """FSDP2: each transformer block is its own unit (all-gathered only while it runs), the rest is the root's."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model.backbone, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module)
    fully_shard(model)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # gathered on rank 0, in CPU memory; keyed by parameter name, so any number of ranks can load it
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: ScaffoldStudent, sharded: bool) -> dict:
    """The unsharded weights. Under FSDP every rank must call it (it gathers) and rank 0 receives them."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_state(model: ScaffoldStudent, optimizer, sharded: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state for a checkpoint (a collective under FSDP, like full_model_state)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return full_model_state(model, sharded), get_optimizer_state_dict(model, optimizer, options=_full_options())


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict,
    optim_state: dict,
    scheduler,
    result: TrainResult,
    keep: int,
    sharded: bool = False,
) -> Path:
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    # tied weights share storage: safetensors wants each tensor once
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen[key] = k
            unique[k] = v
    save_file(unique, str(tmp / "model.safetensors"))
    torch.save(
        {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
        tmp / "optim.pt",
    )
    (tmp / "trainer_state.json").write_text(
        json.dumps(
            {
                "step": step,
                "optimizer_format": "full" if sharded else "local",
                "losses": result.losses,
                "token_losses": result.token_losses,
                "signal_losses": result.signal_losses,
                "tied": {k: seen[(v.data_ptr(), v.shape)] for k, v in state.items()},
            }
        )
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(path: Path, model: ScaffoldStudent) -> None:
    meta = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    model.load_state_dict({k: tensors[src] for k, src in meta["tied"].items()})


def load_checkpoint(
    path: Path, model: ScaffoldStudent, optimizer, scheduler, result: TrainResult, sharded: bool = False
) -> int:
    meta = json.loads((path / "trainer_state.json").read_text())
    written = meta.get("optimizer_format", "local")
    if written != ("full" if sharded else "local"):
        raise ValueError(
            f"{path} was written {'with' if written == 'full' else 'without'} fsdp; resume it with the "
            "same fsdp setting (any number of processes)"
        )
    if not sharded:  # under FSDP the weights went in before sharding (load_weights)
        load_weights(path, model)
    # weights_only: the optimizer file holds tensors and plain containers; nothing is unpickled as code
    extra = torch.load(path / "optim.pt", weights_only=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # every rank read the same full file: no broadcast needed
        set_optimizer_state_dict(model, optimizer, extra["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    result.losses, result.token_losses, result.signal_losses = (
        meta["losses"],
        meta["token_losses"],
        meta["signal_losses"],
    )
    return int(meta["step"])
