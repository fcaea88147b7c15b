"""Which device the student and the local teacher run on."""

from __future__ import annotations


def pick_device(name: str = "auto"):
    """CUDA when present (with "auto"), else the CPU; or exactly the named device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
