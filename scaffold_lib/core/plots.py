"""Small PNG plots (a training run's loss curves, the experiment's τ sweep), drawn without a display."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def png(
    path: Path, size: tuple[float, float], dpi: int, *, title: str, xlabel: str, ylabel: str, legend: str = "best"
) -> Iterator:
    """Axes to draw on; on leaving, titled, labelled, with a legend, written to `path` (its folder made) and closed."""
    import matplotlib

    matplotlib.use("Agg")  # a training node or CI has no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc=legend)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
