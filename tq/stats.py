"""How sure a quality figure is: per-token values summarized as mean ± standard error.

The statistics follow llama.cpp's ``llama-perplexity --kl-divergence``. Every figure is a mean
over scored tokens, and its standard error (SE) is the sample standard deviation over those
tokens divided by sqrt(n), the tokens taken as independent samples (neighbouring tokens of a text
are correlated, so the SE is a lower bound on the true uncertainty; a 95% interval is ±1.96 SE).

- perplexity ratio: exp(mean(d)) with d = quantized NLL - exact NLL per token (nats). The
  difference is paired, so what the two runs share (a hard token is hard for both) cancels;
  SE = ratio * SE(d) (delta method).
- KL(exact || quantized): mean ± SE, median, 99th percentile and maximum over tokens.
- top-1 agreement: share of tokens whose argmax agrees, ± its binomial SE.
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


def _scaled(se: float | None, factor: float) -> float | None:
    return None if se is None else se * factor


def quality_summary(per_token: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The record's quality figures from per-token arrays (fields :data:`PER_TOKEN_FIELDS`).

    Returns exact and quantized perplexity, ``perplexity_ratio`` (± ``perplexity_ratio_se``),
    ``kl_divergence`` (± SE, with ``_median``, ``_p99``, ``_max``), ``top1_agreement`` (± SE),
    ``delta_p_mean`` and ``delta_p_rms`` (± SE each) and ``scored_tokens``.
    """
    missing = [name for name in PER_TOKEN_FIELDS if name not in per_token]
    if missing:
        raise ValueError(f"per-token values lack {missing}")
    arrays = {name: np.asarray(per_token[name], dtype=np.float64) for name in PER_TOKEN_FIELDS}
    sizes = {name: array.shape for name, array in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"per-token arrays differ in shape: {sizes}")
    difference, difference_se = mean_se(arrays["quantized_nll"] - arrays["exact_nll"])
    ratio = float(np.exp(difference))
    kl, kl_se = mean_se(arrays["kl"])
    top1, top1_se = mean_se(arrays["top1_match"])
    delta_p, delta_p_se = mean_se(arrays["delta_p"])
    square, square_se = mean_se(arrays["delta_p"] ** 2)
    rms = float(np.sqrt(square))
    return {
        "exact_perplexity": float(np.exp(arrays["exact_nll"].mean())),
        "quantized_perplexity": float(np.exp(arrays["quantized_nll"].mean())),
        "perplexity_ratio": ratio,
        "perplexity_ratio_se": _scaled(difference_se, ratio),
        "kl_divergence": kl,
        "kl_divergence_se": kl_se,
        "kl_divergence_median": float(np.median(arrays["kl"])),
        "kl_divergence_p99": float(np.percentile(arrays["kl"], 99)),
        "kl_divergence_max": float(arrays["kl"].max()),
        "top1_agreement": top1,
        "top1_agreement_se": top1_se,
        "delta_p_mean": delta_p,
        "delta_p_mean_se": delta_p_se,
        "delta_p_rms": rms,
        "delta_p_rms_se": _scaled(square_se, 1 / (2 * rms)) if rms > 0 else None,
        "scored_tokens": int(arrays["kl"].size),
    }
