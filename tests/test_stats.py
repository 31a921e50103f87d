"""Mean ± standard error of per-token quality values (tq.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from tq.stats import PER_TOKEN_FIELDS, mean_se, quality_summary


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
    summary = quality_summary(values)
    assert summary["perplexity_ratio"] == 1.0 and summary["perplexity_ratio_se"] == 0.0
    assert summary["exact_perplexity"] == summary["quantized_perplexity"]
    assert summary["scored_tokens"] == 200


def test_the_ratio_error_is_paired():
    values = _per_token(500)
    summary = quality_summary(values)
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
    summary = quality_summary(values)
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
    summary = quality_summary(_per_token(400, seed=3) | {"delta_p": 0.03 * rng.standard_normal(400)})
    assert summary["delta_p_rms_se"] == pytest.approx(np.std(rms), rel=0.25)


def test_bad_per_token_values_are_refused():
    values = _per_token(10)
    with pytest.raises(ValueError, match="lack"):
        quality_summary({name: values[name] for name in PER_TOKEN_FIELDS[1:]})
    with pytest.raises(ValueError, match="differ in shape"):
        quality_summary(values | {"kl": values["kl"][:5]})
