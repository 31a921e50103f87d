"""How sure the report's figures are: which standard errors it shows, and when it calls two
settings, or a setting and the exact cache, different (paired per-window differences, 95%
intervals)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from tq.report.grouping import column_or_nan
from tq.report.markdown import counted, format_cell, is_missing, plus_minus, se_of
from tq.report.windows import WindowValues, same_windows, window_sets
from tq.tasks.stats import cluster_mean_se

# A 95% interval is value ± Z95 · SE (normal approximation); every interval in the report uses it.
Z95 = 1.96
PAIRED_NOTE = (
    "Two settings of a model are compared by their paired per-window differences (both are scored "
    "on the same windows and share the exact reference): for the perplexity ratio, per window, the "
    "difference of the two settings' mean quantized NLL, averaged over the windows with its "
    f"window-level SE. They are called different only when its 95% interval (± {Z95} SE) excludes "
    '0, "not distinguishable on N windows" otherwise. A setting is compared with exact by its own '
    "per-window difference, quantized - exact NLL, the one its ratio's ± comes from."
)


class Paired:
    """A paired comparison over windows: per window a difference of mean NLLs (nats), and the
    token-weighted mean of those differences with its window-level (cluster-robust) standard
    error, :func:`tq.tasks.stats.cluster_mean_se` of the per-token differences they summarize."""

    def __init__(self, differences: np.ndarray, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        self.windows = len(tokens)
        values = np.repeat(np.asarray(differences, dtype=np.float64), tokens)
        self.mean, self.se = cluster_mean_se(values, np.repeat(np.arange(self.windows), tokens))

    @property
    def different(self) -> bool:
        """Whether the 95% interval of the mean difference, ± Z95 · SE, excludes 0 (no claim
        without an SE: fewer than two windows)."""
        return self.se is not None and abs(self.mean) > Z95 * self.se


def paired_nll(a: pd.DataFrame | None, b: pd.DataFrame | None) -> Paired | None:
    """Setting ``a`` against setting ``b`` by their paired per-window differences (per-window
    values as :meth:`WindowValues.of` returns them): per window, the mean quantized NLL of ``a``
    minus that of ``b``. The exact side is shared, so this is the difference of their quantized -
    exact NLLs, and its mean is log(ratio a / ratio b). None when a side has no per-window values
    or the two were not scored on the same windows."""
    if a is None or b is None or not same_windows(a, b):
        return None
    return Paired(a["quantized_nll"].to_numpy() - b["quantized_nll"].to_numpy(), a["tokens"].to_numpy())


def against_exact(row: pd.Series) -> bool | None:
    """Whether a setting's perplexity ratio differs from 1.0 (exact) by its own paired difference,
    quantized - exact NLL per unit (window or prompt): that difference's mean is log(ratio) and
    its SE ``perplexity_ratio_se`` / ratio (tq.tasks.stats, delta method), and it differs when the 95%
    interval excludes 0. None without a ratio or its standard error."""
    ratio, se = row.get("perplexity_ratio"), se_of(row, "perplexity_ratio")
    if is_missing(ratio) or is_missing(se) or ratio <= 0:
        return None
    return bool(abs(math.log(ratio)) > Z95 * se / ratio)


def se_units(rows: pd.DataFrame) -> str:
    """What the standard errors of some rows rest on: "8 windows" for perplexity records, "4
    prompts" for compare records."""
    if (column_or_nan(rows, "workload") == "perplexity").all():
        return counted(column_or_nan(rows, "windows"), "window")
    return counted(column_or_nan(rows, "prompts"), "prompt")


def not_distinguishable(found: Sequence[pd.DataFrame | None]) -> str:
    """How to say that differences between some records (their per-window values, None where a
    record has none) are not established: "not distinguishable on N windows", or why they were
    not tested."""
    if not found or any(windows is None for windows in found):
        return "not tested, no per-window values recorded"
    if any(not same_windows(found[0], windows) for windows in found[1:]):
        return "not tested, not scored on the same windows"
    return f"not distinguishable on {counted((len(windows) for windows in found), 'window')}"


def ranking(rows: pd.DataFrame, label: Callable[[pd.Series], str], windows: WindowValues) -> str:
    """Rows by perplexity ratio, lowest first, as "A 1.05 ± 0.01 ≈ B 1.06 ± 0.01 < C 1.30 ± 0.02".

    A "<" stands only where every row before it differs from every row after it by their paired
    per-window differences (:func:`paired_nll`: the 95% interval of the mean difference excludes
    0); elsewhere "≈", and the text ends by saying what "≈" means. Rows without a value are left
    out.
    """
    metric = "perplexity_ratio"
    rows = rows.dropna(subset=[metric]).sort_values(metric, kind="stable")
    found = [windows.of(row) for _, row in rows.iterrows()]
    parts = []
    for index, (_, row) in enumerate(rows.iterrows()):
        if index:
            separated = all(
                (paired := paired_nll(after, before)) is not None and paired.different
                for before in found[:index]
                for after in found[index:]
            )
            parts.append("<" if separated else "≈")
        parts.append(f"{label(row)} {plus_minus(row[metric], se_of(row, metric))}")
    note = f" (≈: {not_distinguishable(found)})" if "≈" in parts else ""
    return " ".join(parts) + note


def text_note(rows: pd.DataFrame, windows: WindowValues) -> str:
    """What text some perplexity rows were scored on and what their ± means (said once, in the
    perplexity section and the notes)."""
    texts = windows.texts(rows)
    tested = rows[column_or_nan(rows, "se_unit") == "window"]
    counts = sorted(column_or_nan(tested, "windows").dropna().unique())
    over = "-".join(format_cell(count) for count in ([counts[0], counts[-1]] if len(counts) > 1 else counts))
    note = (
        f"**The text and the ±.** {'; '.join(texts) + ': ' if texts else ''}{window_sets(rows, windows)}. "
        + (
            f"± is one standard error with the window as the unit, over {over} windows; the per-token "
            "SE, which treats tokens as independent, is `<name>_se_token` in summary.csv. "
            if counts
            else ""
        )
        + PAIRED_NOTE
    )
    older = len(rows) - len(tested)
    if older:
        note += (
            f" {older} record{'s' if older != 1 else ''} without window-level standard errors (older "
            f"runs) show{'' if older != 1 else 's'} values alone and {'are' if older != 1 else 'is'} not "
            "tested."
        )
    return note


def window_errors_only(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the standard errors of every perplexity record whose ± is not window-level
    (``se_unit`` "window") and every compare record whose ± is not prompt-level (``se_unit``
    "prompt") removed: older records' per-token SEs are too small to show as "how sure"."""
    unit = column_or_nan(table, "se_unit")
    perplexity = (table["workload"] == "perplexity") & (unit != "window").fillna(True)
    compare = table["workload"].eq("real-model") & table["mode"].eq("compare")
    drop = (perplexity | (compare & (unit != "prompt").fillna(True))).fillna(False).astype(bool)
    errors = [name for name in table.columns if name.endswith("_se")]
    table = table.copy()
    table.loc[drop, errors] = math.nan
    return table
