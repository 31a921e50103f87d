# Helpers shared by the rules: sweep coordinates from the config, and source hashes.
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from tq.pipeline.checks import (
    bits_label,
    cache_fields,
    cache_label,
    check_sweep,
    exact_layer_arguments,
    setting_fields,
    setting_runs_on,
    trace_cache_labels,
)
from tq.cache.strategies import QUANTIZER_STRATEGIES
from tq.pipeline.models import SweepConfigError, resolve_models
from tq.pipeline.sources import code_hash

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
CONDA_ENV = "../../envs/tq.yaml"
# name -> models entry (tq.pipeline.models): checked before any job runs. A cuda model needs a GPU
# here unless the jobs go to a cluster (there, a job on a node without one fails, saying so).
# The whole config is checked against itself and the models' geometry (tq.pipeline.checks).
try:
    MODELS = resolve_models(config["models"], local=workflow.local_exec and workflow.is_main_process)
    check_sweep(config, MODELS)
except SweepConfigError as error:
    raise WorkflowError(f"config: {error}") from None
PRESETS = sorted({model["preset"] for model in MODELS.values() if "preset" in model})
ONNX_MODELS = [name for name, model in MODELS.items() if model["engine"] == "onnxruntime"]
# Each kv_caches entry by its label (tq.pipeline.checks.cache_label): what it computes, presets
# written out. Jobs look their settings up here by the {cache} wildcard.
SETTINGS = {
    cache_label(entry): setting_fields(entry, config["cache_options"]) for entry in config["kv_caches"]
}
CACHES = list(SETTINGS)
# The models each setting runs on (an entry's own models list, else every model).
CACHE_MODELS = {
    cache_label(entry): [name for name in MODELS if setting_runs_on(entry, name)] for entry in config["kv_caches"]
}
# Those evaluated on traces: settings that differ only in exact layers are one setting there.
TRACE_CACHES = trace_cache_labels(config)
CACHE_OPTIONS = config["cache_options"]


def one_of(names) -> str:
    """A wildcard constraint matching exactly these names (nothing when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    model=one_of(MODELS),
    layer=r"\d\d",
    head=r"\d\d",
    strategy=one_of(QUANTIZER_STRATEGIES),
    cache=one_of(CACHES),


def script_code_hash(script: str) -> str:
    """The hash of the tq code a rule's script (a file of workflow/scripts/) runs, for the
    rule's params: Snakemake does not follow the modules a script imports, so an edit to the
    library re-runs exactly the jobs whose code changed (tq.pipeline.sources.code_hash)."""
    return code_hash(SCRIPTS / script)


def model_input(wildcards) -> str:
    """What a model's decode-loop jobs read: its ONNX bundle, or its checkpoint (transformers)."""
    if MODELS[wildcards.model]["engine"] == "onnxruntime":
        return f"results/bundles/{wildcards.model}"
    return checkpoint_input(wildcards)


def checkpoint_input(wildcards) -> str:
    """A model's Hugging Face checkpoint: its model_dir, or the one converted from its preset
    (shared by the models of one preset)."""
    model = MODELS[wildcards.model]
    return model["checkpoint"] or f"results/hf/{model['preset']}"


def engine_params(wildcards) -> dict:
    """The engine, device and dtype of a job's model (tq.engines.ModelSource fields)."""
    model = MODELS[wildcards.model]
    return {name: model[name] for name in ("engine", "device", "dtype")}


# Peak memory (MB, max RSS in results/benchmarks/<rule>/) of each decode-loop job per preset,
# measured on this machine; a job asks for its peak plus a quarter (SLURM's --mem kills a job
# beyond it). Models without an entry get DEFAULT_PEAK_MB.
PEAK_MB = {  # from the default sweep's make run of 2026-12-07, rounded up to 100 MB
    "smollm2-135m-instruct": {
        "compare_exact": 900, "compare": 1100, "perplexity_exact": 1400, "perplexity": 3600,
        "layer_sensitivity": 1900, "needle": 2600, "traces": 1200, "key_stats": 1300,
    },
    "qwen2.5-coder-0.5b-instruct": {
        "compare_exact": 2400, "compare": 2700, "perplexity_exact": 3600, "perplexity": 8100,
        "layer_sensitivity": 4600, "needle": 6000, "traces": 2900, "key_stats": 2900,
    },
}  # fmt: skip
DEFAULT_PEAK_MB = 4000


def peak_mem_mb(model: str, stage: str) -> int:
    """The mem_mb resource of a job of ``stage`` (its rule's name) on ``model``: its preset's measured
    peak plus a quarter (PEAK_MB)."""
    return int(1.25 * PEAK_MB.get(MODELS[model].get("preset"), {}).get(stage, DEFAULT_PEAK_MB))


def job_mem_mb(stage: str):
    """The mem_mb resource function of the jobs of ``stage`` (:func:`peak_mem_mb`)."""
    return lambda wildcards: peak_mem_mb(wildcards.model, stage)


def model_gpus(wildcards) -> int:
    """GPUs a job of this model asks SLURM for (the gpu resource: sbatch --gpus)."""
    return 1 if MODELS[wildcards.model]["device"] == "cuda" else 0


def trace_names(model: str) -> list[str]:
    """``layer00-head00`` ... for the traces of ``model`` (tq.tasks.trace_export.trace_filename)."""
    spec = MODELS[model]
    return [f"layer{layer:02d}-head{head:02d}" for layer in spec["trace_layers"] for head in spec["trace_heads"]]


def model_caches(model: str) -> list[str]:
    """The labels of the kv_caches settings that run on ``model``."""
    return [cache for cache in CACHES if model in CACHE_MODELS[cache]]


def cache_params(wildcards) -> dict:
    """A job's tq.cache.kvcache.CacheConfig fields: its setting's, with the cache options (exact layers
    apart: they are not a CacheConfig field)."""
    return cache_fields(SETTINGS[wildcards.cache])


def exact_layer_params(wildcards) -> dict:
    """A job's exact layers, as the tq.tasks functions take them
    (tq.pipeline.checks.exact_layer_arguments)."""
    return exact_layer_arguments(SETTINGS[wildcards.cache])


def perplexity_params(section: str) -> dict:
    """The protocol, batch and windows of config section ``section`` (perplexity or
    layer_sensitivity)."""
    return {
        name: config[section][name]
        for name in ("protocol", "batch", "sample_seed", "windows", "window", "context")
    }


def exact_perplexity_file(section: str) -> str:
    """The exact reference a job of config section ``section`` reads ({model} left open): one
    per window set (seed, windows x window, context)."""
    settings = config[section]
    return (
        f"results/perplexity_exact/{{model}}/perplexity-s{settings['sample_seed']}-{settings['windows']}x"
        f"{settings['window']}-c{settings['context']}.safetensors"
    )


PROMPTS = config["prompts"]
SUITE = Path(PROMPTS["file"]).stem


def all_records(wildcards) -> list[str]:
    """Every result record of the sweep."""
    synthetic = config["synthetic"]
    records = [
        f"results/synthetic/d{dim}-b{bits}-{strategy}.json"
        for dim in synthetic["dims"]
        for bits in synthetic["bits"]
        for strategy in synthetic["strategies"]
        if not (strategy == "prod" and bits < 2)  # Prod spends one bit on QJL signs
    ]
    for model in MODELS:
        caches = model_caches(model)
        records += expand(
            "results/trace_eval/{model}/{trace}/{cache}.json",
            model=model,
            trace=trace_names(model),
            cache=[cache for cache in TRACE_CACHES if cache in caches],
        )
        records.append(f"results/compare_exact/{model}/{SUITE}.json")
        records += expand("results/compare/{model}/{suite}/{cache}.json", model=model, suite=SUITE, cache=caches)
        records += expand("results/perplexity/{model}/{cache}.json", model=model, cache=caches)
        records += [f"results/needle/{model}/b{bits_label(bits)}.json" for bits in config["needle"]["bits"]]
        if "num_layers" in MODELS[model]:
            records += [
                f"results/layer_sensitivity/{model}/layer{layer:02d}.json"
                for layer in range(MODELS[model]["num_layers"])
            ]
    return records
