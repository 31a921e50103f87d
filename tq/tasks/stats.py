"""How sure a quality figure is: per-token values summarized as mean ± standard error.

The statistics follow llama.cpp's ``llama-perplexity --kl-divergence``. Every figure is a mean
over scored tokens. Its standard error (SE) takes the *cluster* as the unit: the text window of
a perplexity run, or the prompt of a compare run. Tokens of one text share its topic, style and
difficulty, so they are not independent samples; what varies between texts shows only in the
spread between clusters. The SE is the cluster-robust (sandwich) estimator of a mean,

    SE² = G / (G - 1) * sum_g (sum_{i in g} (y_i - ybar))² / N²

over G clusters holding N tokens; for clusters of equal size it is the sample standard deviation
of the cluster means divided by sqrt(G). Each figure also keeps the per-token SE (sample std /
sqrt(N), tokens taken as independent) as ``<name>_se_token``: smaller, and too small when texts
differ (measured here: 1.5x for the perplexity ratio, 2.5-3x for KL). A 95% interval is ±1.96 SE.

- perplexity ratio: exp(mean(d)) with d = quantized NLL - exact NLL per token (nats). The
  difference is paired, so what the two runs share (a hard token is hard for both) cancels;
  SE = ratio * SE(d) (delta method).
- KL(exact || quantized): mean ± SE, median, 99th percentile and maximum over tokens.
- top-1 agreement: share of tokens whose argmax agrees, ± SE.
- Δp: change in the probability of the reference (target) token, quantized - exact; its mean
  ± SE and its RMS, whose SE is SE(Δp²) / (2 RMS) (delta method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The per-token arrays a summary is built from, each float [n] (top1_match: bool [n]).
PER_TOKEN_FIELDS = ("exact_nll", "quantized_nll", "kl", "top1_match", "delta_p")


def mean_se(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of ``values`` [n]; SE None for n < 2."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-d array, got shape {values.shape}")
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    return mean, float(values.std(ddof=1) / np.sqrt(values.size))


def cluster_mean_se(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float | None]:
    """Mean of ``values`` [n] and its cluster-robust standard error, ``clusters`` [n] labelling
    the unit each value belongs to (a window, a prompt); SE None for fewer than 2 clusters.

    Equal to :func:`mean_se` of the cluster means when every cluster holds the same number of
    values, and to :func:`mean_se` when every value is its own cluster.
    """
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-d array, got shape {values.shape}")
    if clusters.shape != values.shape:
        raise ValueError(f"clusters must label each value: shape {clusters.shape}, values {values.shape}")
    mean = float(values.mean())
    labels, index = np.unique(clusters, return_inverse=True)
    groups = labels.size
    if groups < 2:
        return mean, None
    sums = np.bincount(index, weights=values - mean, minlength=groups)
    return mean, float(np.sqrt(groups / (groups - 1) * np.sum(sums**2)) / values.size)


def _scaled(se: float | None, factor: float) -> float | None:
    return None if se is None else se * factor


def _figures(arrays: Mapping[str, np.ndarray], mean_and_se: Any, suffix: str) -> dict[str, Any]:
    """The mean-based figures and their SEs (named ``<name><suffix>``) with one SE estimator."""
    difference, difference_se = mean_and_se(arrays["quantized_nll"] - arrays["exact_nll"])
    ratio = float(np.exp(difference))
    kl, kl_se = mean_and_se(arrays["kl"])
    top1, top1_se = mean_and_se(arrays["top1_match"])
    delta_p, delta_p_se = mean_and_se(arrays["delta_p"])
    square, square_se = mean_and_se(arrays["delta_p"] ** 2)
    rms = float(np.sqrt(square))
    return {
        "perplexity_ratio": ratio,
        f"perplexity_ratio{suffix}": _scaled(difference_se, ratio),
        "kl_divergence": kl,
        f"kl_divergence{suffix}": kl_se,
        "top1_agreement": top1,
        f"top1_agreement{suffix}": top1_se,
        "delta_p_mean": delta_p,
        f"delta_p_mean{suffix}": delta_p_se,
        "delta_p_rms": rms,
        f"delta_p_rms{suffix}": _scaled(square_se, 1 / (2 * rms)) if rms > 0 else None,
    }


def quality_summary(per_token: Mapping[str, np.ndarray], clusters: np.ndarray) -> dict[str, Any]:
    """The record's quality figures from per-token arrays (fields :data:`PER_TOKEN_FIELDS`), each
    token labelled by its cluster (``clusters`` [n]: the window or prompt it belongs to).

    Returns exact and quantized perplexity, ``perplexity_ratio``, ``kl_divergence`` (with
    ``_median``, ``_p99``, ``_max``), ``top1_agreement``, ``delta_p_mean`` and ``delta_p_rms``,
    each with ``<name>_se`` (cluster-robust, :func:`cluster_mean_se`) and ``<name>_se_token``
    (per token, :func:`mean_se`); ``clusters`` (how many) and ``scored_tokens``.
    """
    missing = [name for name in PER_TOKEN_FIELDS if name not in per_token]
    if missing:
        raise ValueError(f"per-token values lack {missing}")
    arrays = {name: np.asarray(per_token[name], dtype=np.float64) for name in PER_TOKEN_FIELDS}
    sizes = {name: array.shape for name, array in arrays.items()} | {"clusters": np.shape(clusters)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"per-token arrays differ in shape: {sizes}")
    return {
        "exact_perplexity": float(np.exp(arrays["exact_nll"].mean())),
        "quantized_perplexity": float(np.exp(arrays["quantized_nll"].mean())),
        **_figures(arrays, lambda values: cluster_mean_se(values, clusters), "_se"),
        **{name: value for name, value in _figures(arrays, mean_se, "_se_token").items() if "_se" in name},
        "kl_divergence_median": float(np.median(arrays["kl"])),
        "kl_divergence_p99": float(np.percentile(arrays["kl"], 99)),
        "kl_divergence_max": float(arrays["kl"].max()),
        "clusters": int(np.unique(clusters).size),
        "scored_tokens": int(arrays["kl"].size),
    }


def cluster_means(per_token: Mapping[str, np.ndarray], clusters: np.ndarray) -> dict[str, list[float]]:
    """Each cluster's mean of every per-token field (and of ``delta_p_sq`` = Δp²), with its
    ``tokens``: lists in the order of the sorted cluster labels. What a report needs for paired
    comparisons between two settings scored on the same clusters."""
    labels, index = np.unique(np.asarray(clusters), return_inverse=True)
    counts = np.bincount(index, minlength=labels.size)
    fields = {name: np.asarray(per_token[name], dtype=np.float64) for name in PER_TOKEN_FIELDS}
    fields["delta_p_sq"] = fields["delta_p"] ** 2
    means = {
        name: (np.bincount(index, weights=values, minlength=labels.size) / counts).tolist()
        for name, values in fields.items()
    }
    return means | {"tokens": counts.tolist()}
