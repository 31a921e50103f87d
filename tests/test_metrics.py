"""The comparison metrics, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from tq.tasks import metrics


def test_identical_logits_give_zero_drift():
    logits = np.random.default_rng(0).standard_normal((6, 50))
    assert metrics.logit_rmse(logits, logits) == 0.0
    assert metrics.kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert metrics.topk_agreement(logits, logits, 5) == 1.0
    assert metrics.top1_agreement(logits, logits) == 1.0


def test_hand_computed_values():
    exact = np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]])
    quantized = np.array([[0.0, 2.0, 0.5], [0.0, 1.0, 2.0]])
    assert metrics.logit_rmse(exact, quantized) == pytest.approx(np.sqrt((4 + 2.25 + 0.25 + 1) / 6))
    assert metrics.top1_agreement(exact, quantized) == 0.5
    assert metrics.topk_agreement(exact, quantized, 2) == pytest.approx((1 / 2 + 2 / 2) / 2)
    p = np.exp(exact) / np.exp(exact).sum(axis=1, keepdims=True)
    q = np.exp(quantized) / np.exp(quantized).sum(axis=1, keepdims=True)
    assert metrics.kl_divergence(exact, quantized) == pytest.approx(
        np.mean(np.sum(p * np.log(p / q), axis=1))
    )
    nll = metrics.cross_entropy(exact, [0, 2])
    assert nll == pytest.approx(-np.mean([np.log(p[0, 0]), np.log(p[1, 2])]))
    assert metrics.perplexity(nll) == pytest.approx(np.exp(nll))


def test_log_softmax_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]])
    out = metrics.log_softmax(logits)
    assert np.all(np.isfinite(out[:, :2])) and out[0, 0] == pytest.approx(0.0)


def test_uniform_logits_have_perplexity_of_the_vocabulary():
    assert metrics.perplexity(metrics.cross_entropy(np.zeros((4, 10)), [1, 2, 3, 4])) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("reference", "other", "rate", "first"),
    [
        ([1, 2, 3], [1, 2, 3], 1.0, None),
        ([1, 2, 3], [1, 5, 3], 2 / 3, 1),
        ([1, 2, 3], [1, 2], 1.0, 2),
        ([], [], 1.0, None),
    ],
)
def test_token_match_and_first_divergence(reference, other, rate, first):
    assert metrics.token_match_rate(reference, other) == pytest.approx(rate)
    assert metrics.first_divergence(reference, other) == first


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="logits must be two"):
        metrics.logit_rmse(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        metrics.topk_agreement(np.zeros((2, 3)), np.zeros((2, 3)), 3)  # every token: 1 by construction
    with pytest.raises(ValueError, match="targets"):
        metrics.cross_entropy(np.zeros((2, 3)), [1])
