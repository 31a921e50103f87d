"""The sections of report.md, in order, and the figures each draws: the report is written from
:data:`REGISTRY` (tq.report.build) and the workflow's ``report`` rule lists its figures from it
(:func:`sweep_figures`).

A section is a module with a ``write(inputs: ReportInputs) -> list[str]`` function that returns
its markdown lines below the heading and saves its figures beside report.md; adding one to the
report is adding its entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tq.report import (
    ablations,
    across_models,
    baselines,
    compare,
    distortion,
    headline,
    key_stats,
    layer_sensitivity,
    needle,
    notes,
    perplexity,
    throughput,
    traces,
)
from tq.report.inputs import ReportInputs


@dataclass(frozen=True)
class Figure:
    """A PNG a section saves beside report.md, and how Snakemake's report shows it.

    Attributes:
        name: its file stem; with ``{model}`` in it, one figure per model (``perplexity-{model}``).
        category: the category of Snakemake's HTML report it is filed under.
        caption: the stem of its caption file, ``workflow/report/<caption>.rst``.
        stage: the optional stage of the sweep whose records it is drawn from (``needle``), or
            None when every sweep has them.
    """

    name: str
    category: str
    caption: str
    stage: str | None = None

    def names(self, models: Sequence[str]) -> list[str]:
        """Its file stems in a report of ``models``: one per model for a per-model figure."""
        return [self.name.format(model=model) for model in models] if "{model}" in self.name else [self.name]


@dataclass(frozen=True)
class Section:
    """A section of report.md: its ``name``, its heading (``## <title>``), the function that writes
    its markdown lines below the heading (saving its figures), and the figures it draws."""

    name: str
    title: str
    write: Callable[[ReportInputs], list[str]]
    figures: tuple[Figure, ...] = ()


REGISTRY: tuple[Section, ...] = (
    Section("headline", "Headline", headline.write),
    Section(
        "distortion",
        "1. Distortion vs bits (synthetic unit vectors)",
        distortion.write,
        (Figure(distortion.FIGURE, "Distortion", "distortion_vs_bits"),),
    ),
    Section(
        "traces",
        "2a. Attention quality vs bits (KV traces)",
        traces.write,
        (Figure(traces.FIGURE, "Attention quality (traces)", "quality_trace"),),
    ),
    Section(
        "compare",
        "2b. Next-token quality vs bits (real model, compare mode)",
        compare.write,
        (Figure(compare.FIGURE, "Next-token quality (compare)", "quality_compare"),),
    ),
    Section(
        "across_models",
        "Across models: where TurboQuant breaks, and which fix holds",
        across_models.write,
        (
            Figure(across_models.MODEL_FIGURE, "Across models", "perplexity_model"),
            Figure(key_stats.FIGURE, "Across models", "key_statistics"),
        ),
    ),
    Section("perplexity", "3. Perplexity and KV memory vs bits (real text)", perplexity.write),
    Section(
        "throughput",
        "4. Throughput",
        throughput.write,
        (Figure(throughput.FIGURE, "Throughput", "throughput"),),
    ),
    Section(
        "layer_sensitivity",
        "5. Per-layer sensitivity (one layer quantized at a time)",
        layer_sensitivity.write,
        (
            Figure(
                layer_sensitivity.FIGURE, "Per-layer sensitivity", "layer_sensitivity", "layer_sensitivity"
            ),
        ),
    ),
    Section("baselines", "6. Compared to what: baselines at equal bits", baselines.write),
    Section("ablations", "7. Ablations: what stays exact", ablations.write),
    Section(
        "needle",
        "8. Needle in a haystack",
        needle.write,
        (Figure(needle.FIGURE, "Needle in a haystack", "needle", "needle"),),
    ),
    Section("notes", "What these numbers mean (and do not)", notes.write),
)


def sweep_figures(models: Sequence[str], stages: Mapping[str, bool]) -> dict[str, tuple[str, str]]:
    """The figures the report of a sweep draws, in report order: file stem -> (category, caption).

    ``models``: the sweep's models (a per-model figure is drawn for each); ``stages``: whether the
    sweep runs each optional stage a figure is drawn from (its :attr:`Figure.stage`).

    Raises:
        ValueError: ``stages`` does not say whether the sweep runs a figure's stage.
    """
    figures = [figure for section in REGISTRY for figure in section.figures]
    unknown = sorted({figure.stage for figure in figures if figure.stage is not None} - set(stages))
    if unknown:
        raise ValueError(f"say whether the sweep runs the report's optional stages {', '.join(unknown)}")
    return {
        name: (figure.category, figure.caption)
        for figure in figures
        if figure.stage is None or stages[figure.stage]
        for name in figure.names(models)
    }
