"""The two engines (tq.engines.registry, tq.engines.source): ONNX Runtime on a bundle and transformers on
the checkpoint it was exported from write the same records within the tolerance their float
arithmetic allows; the registry names the engines the config schema and the sweep accept; the
sweep's models entries are checked before any job runs (tq.pipeline.models, the workflow).

Tolerances. Both engines compute fp32 attention over the same reconstruction; their logits differ
by float rounding (about 1e-6 of the logit scale). With exact caches or the ``window`` protocol
(the quantized context is the prefill's, quantized once) the records' perplexity ratios agree
within RATIO_TOLERANCE (relative). With the ``decode`` protocol a rounding difference can put a
coordinate on the other side of a codebook boundary, and the runs drift apart token by token:
there the per-token NLL differences must average to zero within AGREEMENT_SE standard errors.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from tests.models_fixtures import tiny_llama
from tq.cache.config import EXACT, CacheConfig
from tq.engines.registry import DEVICES, DTYPES, ENGINES
from tq.engines.source import ModelSource
from tq.pipeline.models import SweepConfigError, resolve_models
from tq.tasks.compare import run_real_model
from tq.tasks.needle import run_needle_sweep
from tq.tasks.perplexity import run_perplexity
from tq.tasks.stats import mean_se

ROOT = Path(__file__).resolve().parent.parent
RATIO_TOLERANCE = 1e-4
AGREEMENT_SE = 3.0
THREE_BIT = CacheConfig(key_bits=3, value_bits=3)
FILLER = "\n\n".join(
    " ".join(["the quick brown fox jumps over the lazy dog"] * 6) + f" paragraph {n}" for n in range(40)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle source, checkpoint source) of one tiny random Llama."""
    from tq.models.prepare import prepare_bundle

    root = tmp_path_factory.mktemp("engines")
    checkpoint = tiny_llama(root / "hf")
    bundle = prepare_bundle(model_dir=checkpoint, out=root / "bundle")
    return ModelSource(bundle, name="tiny"), ModelSource(checkpoint, engine="transformers", name="tiny")


def assert_records_agree(onnx: dict, hf: dict, statistical: bool) -> None:
    assert onnx["config"]["engine"] == "onnxruntime" and hf["config"]["engine"] == "transformers"
    assert hf["config"]["device"] == "cpu" and hf["config"]["dtype"] == "float32"
    assert onnx["config"]["model"] == hf["config"]["model"]
    a, b = onnx["metrics"], hf["metrics"]
    assert a["scored_tokens"] == b["scored_tokens"]
    assert a["context_kv_nbytes"] == b["context_kv_nbytes"]
    if statistical:
        diff = np.subtract(a["per_token"]["quantized_nll"], b["per_token"]["quantized_nll"])
        mean, se = mean_se(diff)
        assert abs(mean) <= AGREEMENT_SE * se + 1e-6, (mean, se)
    else:
        assert b["perplexity_ratio"] == pytest.approx(a["perplexity_ratio"], rel=RATIO_TOLERANCE)
        assert b["exact_perplexity"] == pytest.approx(a["exact_perplexity"], rel=RATIO_TOLERANCE)


@pytest.mark.parametrize(
    "config, protocol, statistical",
    [(EXACT, "decode", False), (THREE_BIT, "window", False), (THREE_BIT, "decode", True)],
    ids=["exact-decode", "3bit-window", "3bit-decode"],
)
def test_tiny_llama_perplexity_records_agree_across_engines(tiny, config, protocol, statistical):
    shape = {"windows": 3, "window": 48, "context": 24}
    onnx, hf = (run_perplexity(source, config, protocol=protocol, **shape) for source in tiny)
    assert_records_agree(onnx, hf, statistical)


@pytest.mark.parametrize(
    "config",
    [
        CacheConfig(key_bits=3, value_bits=3, center_keys=True),
        CacheConfig(key_bits=8, key_strategy="fp8", fp8_scale="head", value_bits=4, value_strategy="uniform"),
    ],
    ids=["centred-keys", "fp8-keys"],
)
def test_the_fixes_for_biased_keys_agree_across_engines(tiny, config):
    """Centred keys, FP8 keys and a set of exact layers give the same record on both engines."""
    shape = {"windows": 3, "window": 48, "context": 24}
    onnx, hf = (
        run_perplexity(source, config, protocol="window", exact_layer_set=[1], **shape) for source in tiny
    )
    assert_records_agree(onnx, hf, statistical=False)
    assert onnx["config"]["exact_layers"] == hf["config"]["exact_layers"] == [1]
    assert onnx["config"]["cache"] == hf["config"]["cache"] == config.describe()


def test_tiny_llama_compare_and_needle_agree_across_engines(tiny):
    prompts = ["the quick brown fox", "a cache holds the keys and the values"]
    onnx, hf = (run_real_model(source, prompts, "compare", THREE_BIT, max_new_tokens=6) for source in tiny)
    for side in ("exact_text", "quantized_text"):
        assert [row[side] for row in onnx["metrics"]["per_prompt"]] == [
            row[side] for row in hf["metrics"]["per_prompt"]
        ]
    assert hf["metrics"]["quantized_kv"] == onnx["metrics"]["quantized_kv"]
    needle = [
        run_needle_sweep(source, [THREE_BIT, EXACT], (192,), (0.5,), trials=2, max_new_tokens=4, text=FILLER)
        for source in tiny
    ]
    for onnx_record, hf_record in zip(*needle, strict=True):
        for field in ("exact_answer", "quantized_answer"):
            answers = [
                [row[field] for row in record["metrics"]["trials"]] for record in (onnx_record, hf_record)
            ]
            assert answers[0] == answers[1]
        assert hf_record["metrics"]["kv_nbytes"] == onnx_record["metrics"]["kv_nbytes"]
        assert hf_record["config"]["engine"] == "transformers"


def test_smollm2_checkpoint_records_agree_with_its_bundle(smollm2_bundle, smollm2_checkpoint):
    """The converted checkpoint through transformers and its ONNX export: 4-bit window protocol
    (within float tolerance) and 4-bit decode protocol (statistically), two 160-token windows."""
    sources = (ModelSource(smollm2_bundle), ModelSource(smollm2_checkpoint, engine="transformers"))
    shape = {"windows": 2, "window": 160, "context": 96, "threads": 2}
    config = CacheConfig(key_bits=4, value_bits=4)
    for protocol, statistical in (("window", False), ("decode", True)):
        onnx, hf = (run_perplexity(source, config, protocol=protocol, **shape) for source in sources)
        assert_records_agree(onnx, hf, statistical)


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_names_the_engines_of_the_config_schema_and_the_sweep():
    """The schema's engine, device and dtype enums are the registry's; every engine the
    registry names runs a models entry on each device and dtype it lists."""
    import yaml

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    fields = schema["properties"]["models"]["items"]["properties"]
    assert fields["engine"]["enum"] == list(ENGINES)
    assert fields["device"]["enum"] == list(DEVICES) and fields["dtype"]["enum"] == list(DTYPES)
    for name, engine in ENGINES.items():
        assert engine.reads in ("bundle", "checkpoint")
        for device in engine.devices:
            for dtype in engine.dtypes:
                model = entry(preset="tiny-llama", engine=name, device=device, dtype=dtype)
                resolved = resolve_models([model], local=False)["tiny-llama"]
                assert resolved == model | {"name": "tiny-llama", "checkpoint": None}


def test_the_registry_and_model_sources_import_no_engine():
    """The workflow imports tq.engines.source when it starts: neither torch nor ONNX Runtime."""
    code = "import sys, tq.engines.source; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_source_opens_its_engines_runner(tiny):
    from tq.engines.onnx import OnnxRunner
    from tq.engines.transformers import TransformersRunner

    for source, kind in zip(tiny, (OnnxRunner, TransformersRunner), strict=True):
        runner = source.open(threads=1)
        assert type(runner) is kind and runner.name == "tiny"
        assert ENGINES[source.engine].runner == f"{kind.__module__}:{kind.__name__}"


# --- models entries ----------------------------------------------------------------------------


def entry(**fields):
    return {
        "engine": "onnxruntime",
        "device": "cpu",
        "dtype": "float32",
        "trace_layers": [0],
        "trace_heads": [0],
    } | fields


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"model_dir": "/nonexistent/ckpt", "engine": "transformers"},
            "models[0].model_dir: /nonexistent/ckpt: no such directory",
        ),
        ({"preset": "tiny-llama", "model_dir": "/x"}, "models[0]: give either preset or model_dir"),
        (
            {"preset": "tiny-llama", "device": "cuda"},
            "models[0].device: engine onnxruntime runs on cpu in float32 (got device cuda, dtype float32); "
            "use engine: transformers",
        ),
        ({"preset": "tiny-llama", "dtype": "bfloat16"}, "models[0].dtype: engine onnxruntime"),
        ({"preset": "tiny-llama", "engine": "vllm"}, "models[0].engine: engine must be one of"),
        ({"preset": "tiny-llama", "name": "a/b"}, "models[0].name: 'a/b' cannot name result files"),
    ],
)
def test_bad_models_entries_name_their_key(fields, message):
    with pytest.raises(SweepConfigError, match=re.escape(message)):
        resolve_models([entry(**fields)], local=True)


def test_model_dir_needs_the_transformers_engine_and_files(tmp_path):
    with pytest.raises(SweepConfigError, match=re.escape("models[0].engine: a model_dir")):
        resolve_models([entry(model_dir=str(tmp_path))], local=True)
    with pytest.raises(SweepConfigError, match=re.escape("missing config.json, tokenizer.json, weights")):
        resolve_models([entry(model_dir=str(tmp_path), engine="transformers")], local=True)


def test_names_are_distinct_and_default_to_preset_or_directory(tiny):
    checkpoint = str(tiny[1].path)
    models = resolve_models(
        [entry(preset="tiny-llama"), entry(model_dir=checkpoint, engine="transformers")], local=True
    )
    assert list(models) == ["tiny-llama", "hf"] and models["hf"]["checkpoint"] == checkpoint
    with pytest.raises(
        SweepConfigError, match=re.escape("models[1].name: 'tiny-llama' also names models[0]")
    ):
        resolve_models(
            [entry(preset="tiny-llama"), entry(preset="tiny-llama", engine="transformers")], local=True
        )


def test_cuda_model_needs_a_gpu_here_but_not_for_a_cluster_submission(monkeypatch):
    import tq.pipeline.models

    monkeypatch.setattr(tq.pipeline.models, "_cuda_available", lambda: False)
    cuda = [entry(preset="tiny-llama", engine="transformers", device="cuda", dtype="bfloat16")]
    with pytest.raises(
        SweepConfigError, match=re.escape("models[0].device: cuda, but this machine has no CUDA GPU")
    ):
        resolve_models(cuda, local=True)
    assert resolve_models(cuda, local=False)["tiny-llama"]["device"] == "cuda"


def test_transformers_runner_refuses_cuda_without_a_gpu(tiny, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = ModelSource(tiny[1].path, engine="transformers", device="cuda")
    with pytest.raises(RuntimeError, match="device cuda was asked for, but torch sees no CUDA GPU"):
        source.open()


@pytest.mark.parametrize(
    "model, message",
    [
        (
            "{model_dir: /nonexistent/ckpt, engine: transformers, trace_layers: [0], trace_heads: [0]}",
            "config: models[0].model_dir: /nonexistent/ckpt: no such directory",
        ),
        (
            "{preset: tiny-llama, engine: transformers, device: cuda, trace_layers: [0], trace_heads: [0]}",
            "config: models[0].device: cuda, but this machine has no CUDA GPU",
        ),
    ],
    ids=["missing-checkpoint", "cuda-without-gpu"],
)
def test_workflow_stops_before_any_job_naming_the_key(tmp_path, model, message):
    pytest.importorskip("snakemake")
    import torch

    from tests.workflow_runs import QUICK, copy_workflow, snakemake

    if "cuda" in model and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    work = copy_workflow(tmp_path / "wf")
    (work / "models.yaml").write_text(f"models:\n  - {model}\n")
    result = snakemake(work, "--configfile", QUICK, "models.yaml", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output[-3000:]
    assert "Building DAG of jobs" not in output and not (work / "results").exists()
