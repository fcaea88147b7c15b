"""The item-level comparison of two arms: its interval covers a known effect as often as it claims, pooling seed x item
pairs as independent does not, the randomisation test holds its level, and the item count of the power analysis."""

import numpy as np
import pytest

from scaffold_lib.evaluation.stats import item_comparison, paired_comparison, required_items, sign_flip_p


def simulate(rng: np.random.Generator, n_items: int, n_seeds: int, effect: float) -> tuple[np.ndarray, np.ndarray]:
    """Items of varied difficulty (the item effect that makes one item's seeds alike) answered under several seeds
    by two arms whose success probabilities differ by exactly `effect` on every item."""
    p = rng.uniform(0.1, 0.8, size=n_items)
    b = rng.random((n_items, n_seeds)) < p[:, None]
    a = rng.random((n_items, n_seeds)) < (p + effect)[:, None]
    return a, b


def test_the_item_level_interval_covers_a_known_effect_and_the_pooled_one_does_not():
    rng = np.random.default_rng(0)
    effect, runs = 0.05, 200
    item_cover = pooled_cover = 0
    for r in range(runs):
        a, b = simulate(rng, n_items=300, n_seeds=3, effect=effect)
        c = item_comparison(a, b, n_boot=1000, seed=r)
        item_cover += c.ci_low <= effect <= c.ci_high
        pooled = paired_comparison(a.ravel().tolist(), b.ravel().tolist(), n_boot=1000, seed=r)
        pooled_cover += pooled.ci_low <= effect <= pooled.ci_high
    # 95 % nominal: the item-level interval is close; pooling 900 correlated pairs as independent is too narrow
    assert 0.91 <= item_cover / runs <= 0.99, item_cover
    assert pooled_cover < item_cover, (pooled_cover, item_cover)


def test_the_randomisation_test_holds_its_level_and_finds_a_large_effect():
    rng = np.random.default_rng(1)
    null_p = [item_comparison(*simulate(rng, 200, 2, 0.0), n_boot=500, seed=i).p_value for i in range(200)]
    assert 0.02 <= np.mean(np.asarray(null_p) < 0.05) <= 0.09
    strong = item_comparison(*simulate(rng, 400, 2, 0.15), n_boot=2000)
    assert strong.p_value < 0.001 and strong.significant and strong.a_better > strong.b_better
    assert "significant" in strong.line("a", "b") and "not significant" not in strong.line("a", "b")


def test_a_difference_of_nothing_is_reported_as_not_significant():
    same = np.array([[True, False], [False, False], [True, True]])
    c = item_comparison(same, same)
    assert c.difference == 0.0 and c.p_value == 1.0 and not c.significant
    assert "not significant" in c.line("a", "b")
    assert sign_flip_p(np.zeros(5)) == 1.0


def test_required_items_follows_the_normal_approximation_and_shrinks_with_seeds():
    rng = np.random.default_rng(2)
    a, b = simulate(rng, 2000, 2, 0.03)
    one, three = required_items(a, b, 0.03, seeds=1), required_items(a, b, 0.03, seeds=3)
    d = a.astype(float) - b.astype(float)
    within = d.var(axis=1, ddof=1).mean()
    between = d.mean(axis=1).var(ddof=1) - within / 2
    assert one["items"] == pytest.approx((1.959964 + 0.841621) ** 2 * (between + within) / 0.03**2, rel=1e-3)
    assert three["items"] < one["items"]
    # one pilot seed cannot split the variance: all of it counts per item (the conservative answer)
    single = required_items(a[:, :1], b[:, :1], 0.03, seeds=3)
    assert single["within_item_variance"] == 0.0 and single["items"] > three["items"]


def test_item_comparison_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="equal, non-empty"):
        item_comparison(np.ones((3, 2)), np.ones((3, 1)))
