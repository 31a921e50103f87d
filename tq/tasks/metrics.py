"""Metrics that compare a quantized run of a model with the exact run.

Logits are [steps, vocab] arrays: row t holds the logits that predict token t of a run. All
probabilities are computed in float64 with a stable log-softmax; logs are natural (nats).

- ``logit_rmse``: sqrt(mean((exact - quantized)^2)) over every step and vocabulary entry.
- ``topk_agreement``: mean over steps of |top-k(exact) & top-k(quantized)| / k.
- ``top1_agreement``: share of steps whose argmax agrees.
- ``kl_divergence``: mean over steps of KL(exact || quantized) of the next-token distributions.
- ``cross_entropy``: mean negative log-likelihood of given target tokens; ``perplexity`` is its
  exponential. Scored on the exact run's tokens, this measures distribution drift, not a
  dataset perplexity (except on real text, see :mod:`tq.tasks.perplexity`).
- ``token_match_rate``: share of positions where two free-running generations agree, over the
  shorter length; ``first_divergence``: the first step where they differ (None if never).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_pair(exact: np.ndarray, quantized: np.ndarray) -> None:
    if exact.shape != quantized.shape or exact.ndim != 2:
        raise ValueError(
            f"logits must be two [steps, vocab] arrays of one shape, got {exact.shape} and {quantized.shape}"
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: [steps, vocab] -> [steps, vocab]."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_rmse(exact: np.ndarray, quantized: np.ndarray) -> float:
    """Root mean square difference of the logits over all steps and vocabulary entries."""
    _check_pair(exact, quantized)
    difference = np.asarray(exact, np.float64) - np.asarray(quantized, np.float64)
    return float(np.sqrt(np.mean(difference**2)))


def topk_agreement(exact: np.ndarray, quantized: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k tokens that are also in the quantized top-k."""
    _check_pair(exact, quantized)
    if not 1 <= k < exact.shape[1]:
        raise ValueError(
            f"k must be in [1, {exact.shape[1] - 1}] (below the vocabulary size: at {exact.shape[1]} "
            f"every token is in both top-k sets), got {k}"
        )
    best_exact = np.argpartition(-exact, k - 1, axis=1)[:, :k]
    best_quantized = np.argpartition(-quantized, k - 1, axis=1)[:, :k]
    shared = [len(np.intersect1d(a, b)) for a, b in zip(best_exact, best_quantized, strict=True)]
    return float(np.mean(shared) / k)


def top1_agreement(exact: np.ndarray, quantized: np.ndarray) -> float:
    """Share of steps where the most likely token is the same."""
    _check_pair(exact, quantized)
    return float(np.mean(np.argmax(exact, axis=1) == np.argmax(quantized, axis=1)))


def kl_divergence(exact: np.ndarray, quantized: np.ndarray) -> float:
    """Mean over steps of KL(exact || quantized), nats."""
    _check_pair(exact, quantized)
    log_p, log_q = log_softmax(exact), log_softmax(quantized)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def cross_entropy(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` [steps] under ``logits`` [steps, vocab]."""
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits [steps, vocab] and targets [steps], got {logits.shape} and {targets.shape}"
        )
    return float(-np.mean(log_softmax(logits)[np.arange(len(targets)), targets]))


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood)."""
    return float(np.exp(mean_nll))


def token_match_rate(reference: Sequence[int], other: Sequence[int]) -> float:
    """Share of positions (over the shorter sequence) where two generations agree."""
    length = min(len(reference), len(other))
    if length == 0:
        return 1.0
    return float(np.mean(np.asarray(reference[:length]) == np.asarray(other[:length])))


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """The first step where two generations differ (a shorter one differs where it ends)."""
    for step, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return step
    return None if len(reference) == len(other) else min(len(reference), len(other))
