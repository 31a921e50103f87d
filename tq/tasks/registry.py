"""The evaluation tasks, one registry: what each measures, where it runs and where it is reported.

A task is run by ``tq bench --workload NAME`` (when it has a CLI runner) and by the pipeline
rules it names; its records carry ``"workload": NAME`` and are read by the report section it
names. The CLI's ``--workload`` choices are :data:`CLI_TASKS`; a test holds the rules to the
workflow, the config sections to the config schema and the report sections to
:mod:`tq.report`'s sections.

Adding a task: its module in :mod:`tq.tasks` (a ``run_*`` function that returns a record, see
:mod:`tq.tasks.records`), an entry here, its rule in ``workflow/rules/`` with a script in
``workflow/scripts/``, its config section in ``config.yaml`` and the schema, and its section
in :mod:`tq.report`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    Attributes:
        name: the records' ``workload`` and the CLI's ``--workload``.
        runner: ``"module:function"`` that runs it and returns one record.
        description: one line, for help texts and docs.
        cli: ``tq bench`` runs it.
        rules: the pipeline rules that run it.
        config_sections: the sections of ``config.yaml`` that shape it.
        report_section: the name of the :mod:`tq.report` section that reads its records, or
            None (not in the report).
    """

    name: str
    runner: str
    description: str
    cli: bool = True
    rules: tuple[str, ...] = ()
    config_sections: tuple[str, ...] = ()
    report_section: str | None = None


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "synthetic", "tq.tasks.synthetic:run_synthetic",
            "the quantizers on random unit vectors: distortion against the paper's bounds, speed",
            rules=("synthetic",), config_sections=("synthetic",), report_section="distortion",
        ),
        Task(
            "trace", "tq.tasks.trace_eval:run_trace",
            "attention on one recorded head (a KvTrace): score error, softmax KL, top-k overlap",
            rules=("trace_eval",), config_sections=("traces", "kv_caches"), report_section="traces",
        ),
        Task(
            "real-model", "tq.tasks.compare:run_real_model",
            "the decode loop on the prompt suite: exact and quantized caches side by side",
            rules=("compare_exact", "compare"), config_sections=("prompts", "kv_caches"),
            report_section="compare",
        ),
        Task(
            "perplexity", "tq.tasks.perplexity:run_perplexity",
            "perplexity and KL on windows drawn across the corpus, exact against quantized",
            rules=("perplexity_exact", "perplexity", "layer_sensitivity"),
            config_sections=("perplexity", "layer_sensitivity", "kv_caches"), report_section="perplexity",
        ),
        Task(
            "needle", "tq.tasks.needle:run_needle",
            "needle-in-a-haystack retrieval at several context lengths and depths",
            rules=("needle",), config_sections=("needle",), report_section="needle",
        ),
        Task(
            "attention", "tq.tasks.attention:run_attention",
            "decode attention read from the packed codes against float attention: speed and bytes",
        ),
        Task(
            "key-stats", "tq.tasks.key_stats:model_key_statistics",
            "per-layer statistics of a model's cached keys: offset share, channel imbalance",
            cli=False, rules=("key_stats",), config_sections=("key_stats",), report_section="across_models",
        ),
    )
}  # fmt: skip

CLI_TASKS = tuple(name for name, task in TASKS.items() if task.cli)
