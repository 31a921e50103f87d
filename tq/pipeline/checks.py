"""A whole sweep config, checked when the workflow starts, before any job runs.

The JSON schema (workflow/schemas/config.schema.yaml) checks types and ranges one value at a
time; :mod:`tq.pipeline.models` checks the ``models`` entries. This module checks what only the
values together can say, every error naming its key:

- every cache setting (``kv_caches``, ``needle.bits``, ``layer_sensitivity``) builds its
  :class:`~tq.cache.kvcache.CacheConfig`, fits each model's head size (fractional widths, Hadamard
  group sizes) and layer count (exact layers), and has a width that a result file can name;
- no two entries give the same result file or the same setting under two names (a report row
  would pool them and shrink its error bars): ``kv_caches``, ``needle.bits`` and the
  ``synthetic`` lists;
- shapes against each other: context below window, queries and top-k below the trace length;
- shapes against each model's geometry (:class:`~tq.models.presets.ModelGeometry`, from its
  preset or its checkpoint's config.json): trace layers and heads, ``num_layers``.

It also holds how a cache setting is named in result files (:func:`cache_label`) and what it
computes (:func:`setting_fields`, with named presets written out), so that the workflow and its
checks share one spelling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tq.cache.config import CacheConfig, exact_layers, split_widths
from tq.cache.presets import CachePresetError, expand_preset
from tq.cache.strategies import STRATEGIES
from tq.models.checkpoint import Checkpoint, CheckpointError
from tq.models.presets import PRESETS, ModelGeometry
from tq.pipeline.models import SweepConfigError

# Per-setting cache options (kv_caches items) and their code in a cache label: k3mse-v3mse-r64-ef2.
# A number follows its code (-r64); a true flag is its code alone (-kc); a string option is
# named by the code of its value (rotation hadamard: -hd); a list of layers is joined by dots
# (-x0.1.4).
CACHE_OPTION_CODES = {
    "residual_length": "r",
    "exact_first_layers": "ef",
    "exact_last_layers": "el",
    "exact_layers": "x",
    "group_size": "g",
    "center_keys": "kc",
    "renormalize": "nc",
}
VALUE_CODES = {
    ("rotation", "hadamard"): "hd",
    ("rotation", "haar"): "haar",
    ("norm_dtype", "float16"): "n16",
    ("norm_dtype", "float32"): "n32",
    ("fp8_scale", "head"): "sh",
    ("fp8_scale", "token"): "st",
}
# A bit width as result files spell it: 1 .. 8, with at most two decimals (3.5, 2.25).
BITS_PATTERN = r"\d(\.\d\d?)?"
# The cache options that keep whole layers exact (applied per model, not CacheConfig fields).
EXACT_LAYER_OPTIONS = ("exact_first_layers", "exact_last_layers", "exact_layers")
STREAM_FIELDS = ("key_bits", "key_strategy", "value_bits", "value_strategy")


def bits_label(bits: float) -> str:
    """3 -> "3", 3.5 -> "3.5": how a bit width appears in a file name."""
    return f"{bits:g}"


def _option_code(name: str, value: Any) -> str:
    if isinstance(value, str) and (name, value) in VALUE_CODES:
        return f"-{VALUE_CODES[name, value]}"
    code = CACHE_OPTION_CODES[name]
    if isinstance(value, bool):
        return f"-{code}" if value else f"-no{code}"
    if isinstance(value, (list, tuple)):
        return f"-{code}{'.'.join(str(int(item)) for item in value)}"
    return f"-{code}{value}"


def cache_label(cache: Mapping[str, Any]) -> str:
    """A ``kv_caches`` entry as a file name: ``k3.5mse-v3mse``, or the name of its preset
    (``vllm-4bit_nc``), then its own options in the order of :data:`CACHE_OPTION_CODES`:
    ``-r64`` (residual length), ``-ef2`` / ``-el2`` (exact first / last layers), ``-x0.4``
    (exact layers), ``-g64`` (baseline group size), ``-kc`` (centred keys), ``-nc``
    (renormalized), ``-hd`` (Hadamard rotation), ``-n16`` (float16 norms), ``-sh`` (fp8 per-head
    scale)."""
    if "preset" in cache:
        head = str(cache["preset"])
    else:
        fields = {"key_strategy": "mse", "value_strategy": "mse", **cache}
        head = (
            f"k{bits_label(fields['key_bits'])}{fields['key_strategy']}"
            f"-v{bits_label(fields['value_bits'])}{fields['value_strategy']}"
        )
    named = [*CACHE_OPTION_CODES, *dict.fromkeys(name for name, _ in VALUE_CODES)]
    return head + "".join(_option_code(name, cache[name]) for name in named if name in cache)


def setting_fields(entry: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``kv_caches`` entry computes: the shared ``cache_options``, then its preset's
    fields (:mod:`tq.cache.presets`), then its own; strategies default to "mse".

    Raises:
        SweepConfigError: an unknown preset.
    """
    try:
        own = expand_preset({name: value for name, value in entry.items() if name != "models"})
    except CachePresetError as error:
        raise SweepConfigError(str(error)) from None
    return {"key_strategy": "mse", "value_strategy": "mse", **options, **own}


def setting_runs_on(entry: Mapping[str, Any], model: str) -> bool:
    """Whether a ``kv_caches`` entry runs on ``model``: every model, unless the entry lists its
    ``models``."""
    return "models" not in entry or model in entry["models"]


def cache_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~tq.cache.kvcache.CacheConfig` fields among cache options (exact layers are not one)."""
    return {name: value for name, value in options.items() if name not in EXACT_LAYER_OPTIONS}


def exact_layer_arguments(options: Mapping[str, Any]) -> dict[str, Any]:
    """The exact-layer options among cache options (exact_first_layers, exact_last_layers,
    exact_layers), with their defaults, as the tq.tasks functions take them: exact_first_layers,
    exact_last_layers and exact_layer_set (a sorted list)."""
    return {
        "exact_first_layers": int(options.get("exact_first_layers", 0)),
        "exact_last_layers": int(options.get("exact_last_layers", 0)),
        "exact_layer_set": sorted({int(layer) for layer in options.get("exact_layers", [])}),
    }


def model_geometry(model: Mapping[str, Any]) -> ModelGeometry | None:
    """A resolved ``models`` entry's cache shape: its preset's, or its checkpoint's config.json;
    None where neither states it."""
    if model.get("checkpoint"):
        try:
            return Checkpoint.load(model["checkpoint"]).geometry
        except CheckpointError:
            return None
    preset = PRESETS.get(model.get("preset", ""))
    return preset.geometry if preset is not None else None


def _number(value: Any) -> Any:
    """2 and 2.0 alike (settings are compared by value, not by how the YAML spelt them)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _identity(config: CacheConfig, exact: Sequence[Any]) -> str:
    """What a setting computes: equal for two entries whose results would be equal. Bits of an
    exact stream, the group size of a setting without a baseline stream, centring of exact keys
    and the fp8 scale of a setting without an fp8 stream do not count."""
    fields = config.describe()
    for part in ("key", "value"):
        if not STRATEGIES[fields[f"{part}_strategy"]].quantizes:
            fields[f"{part}_bits"] = None
    families = {STRATEGIES[name].family for name in (config.key_strategy, config.value_strategy)}
    if "uniform" not in families:
        fields["group_size"] = None
    if not STRATEGIES[config.key_strategy].quantizes:
        fields["center_keys"] = None
    if "fp8" not in families:
        fields["fp8_scale"] = None
    fields = {name: _number(value) for name, value in fields.items()}
    return json.dumps([fields, list(exact)], sort_keys=True)


class _Setting:
    """One cache setting of the config, built and checked: its key, label, CacheConfig and exact
    layers."""

    def __init__(self, key: str, entry: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        self.key = key
        merged = setting_fields(entry, options)
        for part in ("key", "value"):
            bits = merged[f"{part}_bits"]
            if not re.fullmatch(BITS_PATTERN, bits_label(bits)):
                raise SweepConfigError(
                    f"{key}.{part}_bits: {bits} cannot name a result file: give at most two "
                    "decimals (e.g. 2.25, 3.5)"
                )
        try:
            self.config = CacheConfig(**cache_fields(merged))
        except (TypeError, ValueError) as error:
            raise SweepConfigError(f"{key}: {error}") from None
        layers = exact_layer_arguments(merged)
        self.exact = (
            layers["exact_first_layers"],
            layers["exact_last_layers"],
            tuple(layers["exact_layer_set"]),
        )
        self.label = cache_label(entry)
        self.identity = _identity(self.config, self.exact)
        self.models = entry.get("models")

    def check_geometry(self, model: str, geometry: ModelGeometry) -> None:
        """The setting fits ``model``: fractional widths and Hadamard groups at its head_dim,
        exact layers within its layers."""
        for part in ("key", "value"):
            strategy = STRATEGIES[getattr(self.config, f"{part}_strategy")]
            if not strategy.quantizes:
                continue
            bits = getattr(self.config, f"{part}_bits")
            try:
                groups = split_widths(bits, geometry.head_dim)
            except ValueError:
                raise SweepConfigError(
                    f"{self.key}.{part}_bits: {bits} bits on {model} (head_dim {geometry.head_dim}) "
                    f"needs {bits} * {geometry.head_dim} to be a whole number of bits per vector"
                ) from None
            hadamard = self.config.rotation == "hadamard" and strategy.rotates
            odd = [size for _, size in groups if size & (size - 1)]
            if hadamard and odd:
                raise SweepConfigError(
                    f"{self.key}: the Hadamard rotation needs power-of-two channel groups, but "
                    f"{part}s at {bits} bits on {model} (head_dim {geometry.head_dim}) have a group of "
                    f"{odd[0]} channels; use rotation: haar or another width"
                )
        first, last, chosen = self.exact
        if max(first, last) > geometry.layers:
            name = EXACT_LAYER_OPTIONS[0] if first >= last else EXACT_LAYER_OPTIONS[1]
            raise SweepConfigError(
                f"{self.key}.{name}: {max(first, last)} exact layers, but {model} has {geometry.layers}"
            )
        beyond = [layer for layer in chosen if layer >= geometry.layers]
        if beyond:
            raise SweepConfigError(
                f"{self.key}.exact_layers: layer {beyond[0]} is out of range: {model} has "
                f"{geometry.layers} layers (0 .. {geometry.layers - 1})"
            )
        if len(exact_layers(geometry.layers, first, last, chosen)) == geometry.layers:
            raise SweepConfigError(
                f"{self.key}: exact_first_layers {first}, exact_last_layers {last} and exact_layers "
                f"{list(chosen)} keep every layer of {model} ({geometry.layers}) exact: nothing would "
                "be quantized"
            )


def trace_cache_labels(config: Mapping[str, Any]) -> list[str]:
    """The labels of the ``kv_caches`` settings evaluated on traces. A trace is one head of one
    layer, so exact layers (a whole-model option) do not apply to it: settings that differ only
    in them would give the same trace records twice, and are evaluated once (the first)."""
    labels, seen = [], set()
    for index, entry in enumerate(config["kv_caches"]):
        setting = _Setting(f"kv_caches[{index}]", entry, config["cache_options"])
        identity = _identity(setting.config, ())
        if identity not in seen:
            seen.add(identity)
            labels.append(setting.label)
    return labels


def _unique(key: str, values: Sequence[Any]) -> None:
    seen: dict[Any, int] = {}
    for index, value in enumerate(values):
        number = _number(value)
        if number in seen:
            raise SweepConfigError(
                f"{key}[{index}]: {value} repeats {key}[{seen[number]}]; each value would give the same "
                "results twice (and a report row would pool them): list it once"
            )
        seen[number] = index


def _check_settings(settings: Sequence[_Setting], what: str) -> None:
    """No two settings share a result file (their label) or compute the same thing."""
    by_label: dict[str, _Setting] = {}
    by_identity: dict[str, _Setting] = {}
    for setting in settings:
        other = by_label.get(setting.label) or by_identity.get(setting.identity)
        if other is not None:
            raise SweepConfigError(
                f"{setting.key} ({setting.label}) is the same {what} as {other.key} ({other.label}): both "
                "would give the same results, and the report would pool them as if they were two "
                "measurements; list it once"
            )
        by_label[setting.label] = by_identity[setting.identity] = setting


def _check_shape(section: str, settings: Mapping[str, Any]) -> None:
    if settings["context"] >= settings["window"]:
        raise SweepConfigError(
            f"{section}.context: {settings['context']} context tokens leave nothing to score in a window of "
            f"{settings['window']}: context must be below window"
        )


def _check_models(models: Mapping[str, Mapping[str, Any]], geometries: Mapping[str, ModelGeometry]) -> None:
    for index, (name, model) in enumerate(models.items()):
        geometry = geometries.get(name)
        if geometry is None:
            continue
        key = f"models[{index}]"
        for field, limit, what in (
            ("trace_layers", geometry.layers, "layers"),
            ("trace_heads", geometry.kv_heads, "KV heads"),
        ):
            beyond = [value for value in model[field] if value >= limit]
            if beyond:
                raise SweepConfigError(
                    f"{key}.{field}: {beyond[0]} is out of range: {name} has {limit} {what} "
                    f"(0 .. {limit - 1})"
                )
        if model.get("num_layers", 0) > geometry.layers:
            raise SweepConfigError(
                f"{key}.num_layers: {model['num_layers']}, but {name} has {geometry.layers}"
            )


def check_sweep(config: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> None:
    """Check a schema-validated sweep config (defaults filled in) against itself and its models.

    Args:
        config: the config, as Snakemake holds it after ``validate(..., set_default=True)``.
        models: :func:`tq.pipeline.models.resolve_models` of its ``models``.

    Raises:
        SweepConfigError: the first problem, its message starting with the key
            (``kv_caches[3].key_bits``, ``perplexity.context``).
    """
    geometries = {name: geometry for name, model in models.items() if (geometry := model_geometry(model))}
    _check_models(models, geometries)
    options = config["cache_options"]
    caches = [
        _Setting(f"kv_caches[{index}]", entry, options) for index, entry in enumerate(config["kv_caches"])
    ]
    _check_settings(caches, "cache setting")
    needle = config["needle"]
    _unique("needle.bits", needle["bits"])
    _unique("needle.context_lengths", needle["context_lengths"])
    _unique("needle.depths", needle["depths"])
    settings = list(caches)
    settings += [
        _Setting(f"needle.bits[{index}]", {"key_bits": bits, "value_bits": bits}, options)
        for index, bits in enumerate(needle["bits"])
    ]
    if any("num_layers" in model for model in models.values()):
        sensitivity = config["layer_sensitivity"]
        settings.append(
            _Setting("layer_sensitivity", {name: sensitivity[name] for name in STREAM_FIELDS}, options)
        )
    for setting in caches:
        unknown = [name for name in setting.models or () if name not in models]
        if unknown:
            raise SweepConfigError(
                f"{setting.key}.models: {unknown[0]!r} is not a model of this sweep (models: "
                f"{', '.join(models)})"
            )
    for setting in settings:
        for name, geometry in geometries.items():
            if setting.models is None or name in setting.models:
                setting.check_geometry(name, geometry)
    for section in ("perplexity", "layer_sensitivity"):
        _check_shape(section, config[section])
    synthetic = config["synthetic"]
    for name in ("dims", "bits", "strategies"):
        _unique(f"synthetic.{name}", synthetic[name])
    if synthetic["rotation"] == "hadamard":
        odd = [dim for dim in synthetic["dims"] if dim & (dim - 1)]
        if odd:
            raise SweepConfigError(
                f"synthetic.dims: {odd[0]} is not a power of two, which the Hadamard rotation "
                "(synthetic.rotation) needs"
            )
    traces = config["traces"]
    if traces["queries_per_sample"] > traces["max_seq"]:
        raise SweepConfigError(
            f"traces.queries_per_sample: {traces['queries_per_sample']} queries do not fit in a sample of "
            f"max_seq {traces['max_seq']} tokens"
        )
    if traces["top_k"] >= traces["max_seq"]:
        raise SweepConfigError(
            f"traces.top_k: {traces['top_k']} is not below max_seq {traces['max_seq']}: every visible key "
            "would be in the top-k and the overlap would be 1 by construction"
        )
