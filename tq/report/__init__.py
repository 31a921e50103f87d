"""Turning result records (docs/design.md section 4) into one summary table and a markdown report.

The pipeline's ``aggregate`` rule reads result JSON files with :func:`load_records`, flattens
them with :func:`summary_table` and writes the CSV with :func:`write_summary`; beside it, the
perplexity records' per-window values (:func:`per_window_table`, per_window.csv) and per-token
values (:func:`per_token_table`, per_token.parquet). The ``report`` rule reads the summary and
the per-window values back (:func:`read_summary`, :func:`read_per_window`) and writes
``report.md`` and its PNG plots with :func:`write_report`, section by section as
:data:`REGISTRY` lists them; the rule's figures come from the same registry
(:func:`sweep_figures`). Every number in the report comes from those tables: nothing is
hard-coded, and a section without records is replaced by a one-line note. Perplexity figures
carry standard errors with the text window as the unit, and two settings are compared by their
paired per-window differences (:func:`paired_nll`).

Modules: records (reading and checking records), flatten (the aggregate tables), markdown,
grouping, labels, windows, uncertainty (± and paired tests), plotting (the plot style), rows
and inputs (what sections read), one module per section (headline, distortion, traces,
compare with quality_vs_bits, across_models with key_stats, perplexity, throughput,
layer_sensitivity, baselines and ablations with real_quality, needle, notes), sections (the
registry) and build (:func:`write_report`).
"""

from tq.report.across_models import figure_name_of_model
from tq.report.build import REPORT_NAME, write_report
from tq.report.flatten import (
    COORDINATES,
    WINDOW_SETTINGS,
    per_token_table,
    per_window_table,
    read_per_token,
    read_per_window,
    read_summary,
    summary_table,
    write_per_token,
    write_per_window,
    write_summary,
)
from tq.report.grouping import ReportError
from tq.report.markdown import markdown_table
from tq.report.plotting import BARS_NOTE
from tq.report.records import RecordError, load_records
from tq.report.sections import REGISTRY, Figure, Section, sweep_figures
from tq.report.uncertainty import Z95, Paired, paired_nll

__all__ = [
    "BARS_NOTE",
    "COORDINATES",
    "REGISTRY",
    "REPORT_NAME",
    "WINDOW_SETTINGS",
    "Z95",
    "Figure",
    "Paired",
    "RecordError",
    "ReportError",
    "Section",
    "figure_name_of_model",
    "load_records",
    "markdown_table",
    "paired_nll",
    "per_token_table",
    "per_window_table",
    "read_per_token",
    "read_per_window",
    "read_summary",
    "summary_table",
    "sweep_figures",
    "write_per_token",
    "write_per_window",
    "write_report",
    "write_summary",
]
