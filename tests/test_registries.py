"""One name, one place: the registries (cache strategies, cache presets, model presets, kernel
devices) against every list that repeats them (the config schema's enums, the CLI's choices,
the workflow's wildcards), and each strategy's stored-bytes accounting against what a cache
really holds."""

from __future__ import annotations

import argparse
import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tq.cache.config import FP8_SCALES, NORM_DTYPES, CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.cache.presets import CACHE_PRESETS
from tq.cache.strategies import FAMILIES, QUANTIZER_STRATEGIES, STRATEGIES, STRATEGY_NAMES
from tq.core.rotation import ROTATION_KINDS
from tq.kernels import DEVICES
from tq.models.presets import PRESETS
from tq.tasks.registry import CLI_TASKS, TASKS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


def _schema_enum(*path: str) -> list:
    node = SCHEMA
    for key in path:
        node = node[key]
    return node["enum"]


@pytest.mark.parametrize(
    ("path", "registry"),
    [
        (("definitions", "cache_strategy"), STRATEGY_NAMES),
        (("definitions", "strategy"), QUANTIZER_STRATEGIES),
        (("definitions", "preset"), tuple(PRESETS)),
        (("definitions", "norm_dtype"), NORM_DTYPES),
        (("definitions", "rotation"), ROTATION_KINDS),
        (("definitions", "fp8_scale"), FP8_SCALES),
        (("properties", "kv_caches", "items", "properties", "preset"), tuple(CACHE_PRESETS)),
        (("properties", "synthetic", "properties", "device"), DEVICES),
    ],
    ids=lambda value: value[-1] if isinstance(value[0], str) and value[0] in SCHEMA else "",
)
def test_the_config_schema_names_what_the_registries_hold(path, registry):
    assert sorted(_schema_enum(*path)) == sorted(registry)


def _cli_choices(*flag: str) -> dict[str, list]:
    """The choices of each of ``tq bench``'s options ``flag`` (by its first spelling)."""
    from tq.cli import build_parser

    bench = next(
        action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["bench"]
    return {option: next(a.choices for a in bench._actions if option in a.option_strings) for option in flag}


def test_the_cli_offers_the_registered_names():
    choices = _cli_choices("--strategy", "--value-strategy", "--cache-preset", "--norm-dtype", "--fp8-scale")
    assert list(choices["--strategy"]) == list(STRATEGY_NAMES)
    assert list(choices["--value-strategy"]) == list(STRATEGY_NAMES)
    assert list(choices["--cache-preset"]) == list(CACHE_PRESETS)
    assert list(choices["--norm-dtype"]) == list(NORM_DTYPES)
    assert list(choices["--fp8-scale"]) == list(FP8_SCALES)


def test_the_workflow_takes_its_strategy_wildcard_from_the_registry():
    common = (ROOT / "workflow/rules/common.smk").read_text()
    assert "strategy=one_of(QUANTIZER_STRATEGIES)" in common


def test_every_strategy_is_complete():
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name and strategy.family in FAMILIES and strategy.label
        assert (strategy.single_quantizer is None) == (strategy.family in ("exact", "turboquant"))
        assert strategy.outlier_groups == (strategy.family == "turboquant")


# Every strategy at the widths it takes, with the options that change its stored bytes.
ACCOUNTED = [
    *[{"key_strategy": s, "key_bits": b, "value_strategy": s, "value_bits": b}
      for s in ("mse", "prod") for b in (2, 3, 4)],
    {"key_bits": 2.5, "value_bits": 3.5},
    {"key_bits": 3, "value_bits": 3, "norm_dtype": "float16"},
    {"key_strategy": "prod", "key_bits": 3.5, "value_bits": 2, "norm_dtype": "float16"},
    *[{"key_strategy": s, "key_bits": b, "value_strategy": s, "value_bits": b, "group_size": g}
      for s in ("uniform", "rotated-uniform", "kivi") for b in (2, 4) for g in (16, 48)],
    {"key_strategy": "fp8", "key_bits": 8, "value_strategy": "fp8", "value_bits": 8},
    {"key_strategy": "fp8", "key_bits": 8, "value_strategy": "fp8", "value_bits": 8, "fp8_scale": "head"},
    {"key_strategy": "exact", "value_strategy": "mse", "value_bits": 4},
    {"key_strategy": "mse", "key_bits": 4, "value_strategy": "exact", "center_keys": True},
]  # fmt: skip


@pytest.mark.parametrize("fields", ACCOUNTED, ids=lambda f: "-".join(f"{v}" for v in f.values()))
def test_stored_bytes_are_what_the_registry_accounts(fields):
    """A cache's nbytes is tokens x heads x Strategy.vector_bytes per stream and channel group,
    plus what a layer stores once (mean key, fp8 per-head scales, outlier channel indices)."""
    kv_heads, head_dim, tokens = 2, 64, 96  # 96: whole groups of 16 and 48 tokens (kivi keys)
    config = CacheConfig(**fields)
    cache = QuantizedKVCache(kv_heads, head_dim, config)
    rng = np.random.default_rng(0)
    keys, values = (rng.normal(size=(kv_heads, tokens, head_dim)).astype(np.float32) for _ in range(2))
    cache.append(keys, values)
    expected = 0.0
    for part in ("key", "value"):
        strategy = STRATEGIES[getattr(config, f"{part}_strategy")]
        bits = getattr(config, f"{part}_bits")
        groups = [(bits, head_dim)]
        if strategy.outlier_groups and not float(bits).is_integer():
            groups = [(math.ceil(bits), round((bits % 1) * head_dim)), (math.floor(bits), None)]
            groups[1] = (groups[1][0], head_dim - groups[0][1])
            expected += 2 * kv_heads * head_dim  # uint16 channel indices, once per head
        expected += sum(
            tokens * kv_heads * strategy.vector_bytes(part, size, b, config) for b, size in groups
        )
        if strategy.family == "fp8" and config.fp8_scale == "head":
            expected += 4 * kv_heads
    if config.center_keys:
        expected += 4 * kv_heads * head_dim
    assert cache.nbytes == pytest.approx(expected, abs=0)


# ---------------------------------------------------------------- evaluation tasks


def _workflow_rules() -> set[str]:
    text = "\n".join(path.read_text() for path in (ROOT / "workflow/rules").glob("*.smk"))
    return set(re.findall(r"^\s*rule (\w+):", text, re.M))


def test_every_task_names_real_rules_config_sections_report_sections_and_runners():
    from tq.report.sections import REGISTRY

    rules = _workflow_rules()
    sections = {section.name for section in REGISTRY}
    for task in TASKS.values():
        assert task.report_section is None or task.report_section in sections, task.name
        assert set(task.rules) <= rules, task.name
        assert set(task.config_sections) <= set(SCHEMA["properties"]), task.name
        module, function = task.runner.split(":")
        assert callable(getattr(importlib.import_module(module), function)), task.runner


def test_the_cli_runs_every_cli_task():
    from tq.cli.bench import WORKLOAD_RUNNERS

    assert tuple(WORKLOAD_RUNNERS) == CLI_TASKS
    assert list(_cli_choices("--workload")["--workload"]) == list(CLI_TASKS)
