"""Statistics for comparing two arms answered on the same items, with the item as the unit: per item, correctness is
averaged over the seeds of each arm, and the arms are compared paired over items (a bootstrap interval over items and
a sign-flip randomisation test on the item means); the exact McNemar test of one seed's paired answers is secondary.
Pooling seed x item pairs as if independent overstates certainty: the same item answers under every seed. Also the
number of items a comparison needs (from a pilot's items and seeds) and the calibration of the signal head."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest, norm


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


@dataclass(frozen=True)
class ItemComparison:
    """Arm A vs arm B over the same items, each answered under the same seeds by both arms: A − B in Pass@1 (item
    means), a 95 % bootstrap interval over items, a two-sided sign-flip randomisation p-value on the item differences,
    and how many items each arm did better on (averaged over seeds)."""

    n_items: int
    n_seeds: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    a_better: int
    b_better: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def significant(self) -> bool:
        return not (self.ci_low <= 0.0 <= self.ci_high)

    def line(self, a: str, b: str) -> str:
        verdict = "significant" if self.significant else "not significant"
        return (
            f"{a} − {b}: {100 * self.difference:+.1f} points (95 % CI {100 * self.ci_low:+.1f} to "
            f"{100 * self.ci_high:+.1f}, {verdict}), {self.n_items} items × {self.n_seeds} seed(s), "
            f"items better {self.a_better}/{self.b_better}, p = {self.p_value:.3g}"
        )


def item_comparison(
    a: np.ndarray | Sequence[Sequence[bool]],
    b: np.ndarray | Sequence[Sequence[bool]],
    n_boot: int = 10_000,
    seed: int = 0,
) -> ItemComparison:
    """Compare two arms on `a[i][s]`, `b[i][s]`: item i's correctness under seed s (the same items and seeds)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim == 1:
        x, y = x[:, None], y[:, None]
    if x.shape != y.shape or x.ndim != 2 or not x.size:
        raise ValueError(f"item comparison needs two equal, non-empty [items, seeds] arrays, got {x.shape}, {y.shape}")
    diff = x.mean(axis=1) - y.mean(axis=1)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return ItemComparison(
        len(diff),
        x.shape[1],
        float(x.mean()),
        float(y.mean()),
        float(diff.mean()),
        float(lo),
        float(hi),
        sign_flip_p(diff, n_boot, seed),
        int((diff > 0).sum()),
        int((diff < 0).sum()),
    )


def sign_flip_p(diff: np.ndarray, n_draws: int = 10_000, seed: int = 0) -> float:
    """Two-sided randomisation p-value of a mean paired difference: under no effect each item's difference is as
    likely negated (the observed statistic counts as one draw, so p is never 0)."""
    d = np.asarray(diff, dtype=float)
    observed = abs(d.mean())
    if not d.any():
        return 1.0
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n_draws, len(d)))
    extreme = int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    return (extreme + 1) / (n_draws + 1)


def required_items(
    a: np.ndarray, b: np.ndarray, effect: float, seeds: int, alpha: float = 0.05, power: float = 0.8
) -> dict:
    """Items needed to detect `effect` (a difference in Pass@1) with `power` at two-sided `alpha`, when each item is
    answered under `seeds` seeds per arm, from a pilot's [items, pilot seeds] correctness of both arms. The variance
    of an item's seed-averaged difference is split into a between-item part and a within-item (seed) part, which
    shrinks with more seeds; one pilot seed cannot split them, and then all of it counts as between-item
    (conservative)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim == 1:
        d = d[:, None]
    pilot_seeds = d.shape[1]
    within = float(d.var(axis=1, ddof=1).mean()) if pilot_seeds > 1 else 0.0
    between = max(0.0, float(d.mean(axis=1).var(ddof=1)) - within / pilot_seeds)
    variance = between + within / seeds
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return {
        "items": math.ceil(z**2 * variance / effect**2),
        "seeds": seeds,
        "effect": effect,
        "alpha": alpha,
        "power": power,
        "between_item_variance": between,
        "within_item_variance": within,
        "pilot_items": d.shape[0],
        "pilot_seeds": pilot_seeds,
    }


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
