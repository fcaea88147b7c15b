"""Statistics for comparing two arms answered on the same items: the exact McNemar test on the discordant pairs, a
paired bootstrap interval for the difference in Pass@1, pooling over seeds, and the calibration of the signal head
(reliability table, expected calibration error)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class PairedComparison:
    """Arm A vs arm B on the same items: A − B in Pass@1 with a 95 % paired bootstrap interval and the exact
    McNemar p-value (two-sided) from the items only one arm got right."""

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    a_only: int  # items A answered right and B wrong
    b_only: int
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self, a: str, b: str) -> str:
        return (
            f"{a} − {b}: {100 * self.difference:+.1f} points (95 % CI {100 * self.ci_low:+.1f} to "
            f"{100 * self.ci_high:+.1f}), n = {self.n}, discordant {self.a_only}/{self.b_only}, "
            f"McNemar p = {self.p_value:.3g}"
        )


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def paired_comparison(a: Sequence[bool], b: Sequence[bool], n_boot: int = 10_000, seed: int = 0) -> PairedComparison:
    """Compare two arms' correctness on the same items (position i of `a` and `b` is one item)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError(f"paired comparison needs two equal, non-empty lists of outcomes, got {x.shape}, {y.shape}")
    diff = x - y
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    return PairedComparison(
        len(x),
        float(x.mean()),
        float(y.mean()),
        float(diff.mean()),
        float(lo),
        float(hi),
        a_only,
        b_only,
        mcnemar_exact(a_only, b_only),
    )


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


@dataclass(frozen=True)
class Calibration:
    """How well the signal head's confidence matches its accuracy: per confidence bin (count, mean confidence,
    accuracy) and the expected calibration error (bin-weighted |accuracy − confidence|)."""

    bins: list[dict]
    ece: float
    n: int

    def markdown(self) -> str:
        lines = ["| confidence | boundaries | mean confidence | accuracy |", "|---|---:|---:|---:|"]
        lines += [
            f"| {b['low']:.2f}–{b['high']:.2f} | {b['n']} | {b['confidence']:.3f} | {b['accuracy']:.3f} |"
            for b in self.bins
            if b["n"]
        ]
        return "\n".join(lines + ["", f"ECE = {self.ece:.4f} over {self.n} step boundaries"])


def calibration(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> Calibration:
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        inside = (conf > edges[i]) & (conf <= edges[i + 1]) if i else (conf >= 0) & (conf <= edges[1])
        n = int(inside.sum())
        mean_conf = float(conf[inside].mean()) if n else math.nan
        accuracy = float(hit[inside].mean()) if n else math.nan
        if n:
            ece += n / len(conf) * abs(accuracy - mean_conf)
        bins.append(
            {"low": float(edges[i]), "high": float(edges[i + 1]), "n": n, "confidence": mean_conf, "accuracy": accuracy}
        )
    return Calibration(bins, float(ece), len(conf))
