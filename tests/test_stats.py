"""Mean ± standard error of per-token quality values (tq.tasks.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from tq.tasks.stats import PER_TOKEN_FIELDS, cluster_mean_se, cluster_means, mean_se, quality_summary


def _per_token(n: int, seed: int = 0, shift: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    exact = rng.exponential(2.0, n)
    return {
        "exact_nll": exact,
        "quantized_nll": exact + shift + 0.05 * rng.standard_normal(n),
        "kl": rng.exponential(0.1, n),
        "top1_match": rng.random(n) < 0.9,
        "delta_p": 0.02 * rng.standard_normal(n) - 0.01,
    }


def _alone(values: dict[str, np.ndarray]) -> np.ndarray:
    """Every token its own cluster: the cluster-robust SE is then the per-token one."""
    return np.arange(len(values["kl"]))


def test_mean_se_is_the_sample_std_over_root_n():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_se(values)
    assert mean == pytest.approx(3.5)
    assert se == pytest.approx(np.std(values, ddof=1) / 2)
    assert mean_se(np.array([3.0])) == (3.0, None)
    with pytest.raises(ValueError, match="non-empty 1-d"):
        mean_se(np.array([]))


def test_identical_runs_give_ratio_one_with_zero_error():
    values = _per_token(200)
    values["quantized_nll"] = values["exact_nll"].copy()
    summary = quality_summary(values, _alone(values))
    assert summary["perplexity_ratio"] == 1.0 and summary["perplexity_ratio_se"] == 0.0
    assert summary["exact_perplexity"] == summary["quantized_perplexity"]
    assert summary["scored_tokens"] == 200


def test_the_ratio_error_is_paired():
    values = _per_token(500)
    summary = quality_summary(values, _alone(values))
    difference = values["quantized_nll"] - values["exact_nll"]
    assert summary["perplexity_ratio"] == pytest.approx(np.exp(difference.mean()))
    assert summary["perplexity_ratio_se"] == pytest.approx(
        summary["perplexity_ratio"] * difference.std(ddof=1) / np.sqrt(500)
    )
    # The runs share the per-token difficulty (std 2 nats), the difference does not (0.05):
    # an unpaired error would be about 40 times larger.
    unpaired = np.hypot(*(values[name].std(ddof=1) for name in ("exact_nll", "quantized_nll"))) / np.sqrt(500)
    assert summary["perplexity_ratio_se"] < unpaired / 10


def test_kl_top1_and_delta_p_figures():
    values = _per_token(1000, seed=1)
    summary = quality_summary(values, _alone(values))
    assert summary["kl_divergence"] == pytest.approx(values["kl"].mean())
    assert summary["kl_divergence_median"] == pytest.approx(np.median(values["kl"]))
    assert summary["kl_divergence_p99"] == pytest.approx(np.percentile(values["kl"], 99))
    assert summary["kl_divergence_max"] == pytest.approx(values["kl"].max())
    share = values["top1_match"].mean()
    assert summary["top1_agreement"] == pytest.approx(share)
    assert summary["top1_agreement_se"] == pytest.approx(np.sqrt(share * (1 - share) / 999), rel=1e-3)
    assert summary["delta_p_rms"] == pytest.approx(np.sqrt(np.mean(values["delta_p"] ** 2)))
    assert summary["delta_p_mean"] < 0 < summary["delta_p_mean_se"] < abs(summary["delta_p_mean"])


def test_the_rms_error_covers_its_spread_across_resamples():
    """The delta-method SE of the RMS is close to the spread of the RMS over fresh samples."""
    rng = np.random.default_rng(2)
    rms = [np.sqrt(np.mean((0.03 * rng.standard_normal(400)) ** 2)) for _ in range(400)]
    values = _per_token(400, seed=3) | {"delta_p": 0.03 * rng.standard_normal(400)}
    summary = quality_summary(values, _alone(values))
    assert summary["delta_p_rms_se"] == pytest.approx(np.std(rms), rel=0.25)


def test_bad_per_token_values_are_refused():
    values = _per_token(10)
    with pytest.raises(ValueError, match="lack"):
        quality_summary({name: values[name] for name in PER_TOKEN_FIELDS[1:]}, _alone(values))
    with pytest.raises(ValueError, match="differ in shape"):
        quality_summary(values | {"kl": values["kl"][:5]}, _alone(values))
    with pytest.raises(ValueError, match="differ in shape"):
        quality_summary(values, np.zeros(4))


def test_cluster_se_of_equal_clusters_is_the_se_of_their_means():
    rng = np.random.default_rng(4)
    values = rng.standard_normal(60) + np.repeat(rng.standard_normal(6), 10)
    clusters = np.repeat(np.arange(6), 10)
    mean, se = cluster_mean_se(values, clusters)
    assert mean == pytest.approx(values.mean())
    assert se == pytest.approx(mean_se(values.reshape(6, 10).mean(axis=1))[1])
    assert cluster_mean_se(values, np.arange(60)) == pytest.approx(mean_se(values))
    assert cluster_mean_se(values, np.zeros(60)) == (pytest.approx(values.mean()), None)
    with pytest.raises(ValueError, match="label each value"):
        cluster_mean_se(values, clusters[:10])


def test_unequal_clusters_weigh_by_their_tokens():
    """A cluster of 1 token and one of 3: the sandwich formula by hand."""
    values, clusters = np.array([4.0, 1.0, 2.0, 3.0]), np.array([7, 9, 9, 9])
    mean = 2.5
    by_hand = np.sqrt(2 / 1 * ((4 - mean) ** 2 + (1 + 2 + 3 - 3 * mean) ** 2)) / 4
    assert cluster_mean_se(values, clusters) == (mean, pytest.approx(by_hand))


def test_window_intervals_cover_where_token_intervals_fall_short():
    """Simulated texts with a window effect (each window's tokens share an offset, SD 0.5, on top
    of token noise, SD 1): over 2000 repetitions of 16 windows x 128 tokens, the 95% interval
    from the window-level SE covers the true mean about 93% of the time (with 16 clusters and
    the normal quantile it is a t statistic with 15 degrees of freedom: 93.1%), the per-token
    interval about a third of the time."""
    rng = np.random.default_rng(5)
    repeats, windows, tokens = 2000, 16, 128
    values = rng.normal(0.0, 0.5, (repeats, windows, 1)) + rng.standard_normal((repeats, windows, tokens))
    clusters = np.repeat(np.arange(windows), tokens)
    covered = {"window": 0, "token": 0}
    for sample in values.reshape(repeats, -1):
        for unit, (mean, se) in (
            ("window", cluster_mean_se(sample, clusters)),
            ("token", mean_se(sample)),
        ):
            covered[unit] += abs(mean) <= 1.96 * se
    assert 0.91 <= covered["window"] / repeats <= 0.96
    assert covered["token"] / repeats < 0.5


def test_quality_summary_keeps_both_errors_and_the_cluster_means():
    values = _per_token(64, seed=6)
    clusters = np.repeat(np.arange(4), 16)
    summary = quality_summary(values, clusters)
    assert summary["clusters"] == 4 and summary["scored_tokens"] == 64
    kl = values["kl"].reshape(4, 16).mean(axis=1)
    assert summary["kl_divergence_se"] == pytest.approx(mean_se(kl)[1])
    assert summary["kl_divergence_se_token"] == pytest.approx(mean_se(values["kl"])[1])
    means = cluster_means(values, clusters)
    assert means["kl"] == pytest.approx(kl.tolist()) and means["tokens"] == [16] * 4
    assert means["delta_p_sq"] == pytest.approx((values["delta_p"] ** 2).reshape(4, 16).mean(axis=1).tolist())
