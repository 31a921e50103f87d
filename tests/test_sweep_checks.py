"""A sweep config is checked as a whole when the workflow starts (tq.pipeline.checks): every value
a job would reject, and every entry that would repeat another's results, stops ``snakemake -n``
before the DAG is built, with a message that names the key."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.workflow_runs import QUICK, copy_workflow, snakemake

pytest.importorskip("snakemake")

# (override of config/quick.yaml: tiny-llama, 2 layers, 2 KV heads, head_dim 16; the message)
BAD_CONFIGS = {
    "context-not-below-window": ("perplexity:\n  window: 64\n  context: 64\n", "perplexity.context: 64"),
    "layer-context-not-below-window": (
        "layer_sensitivity:\n  window: 40\n  context: 48\n",
        "layer_sensitivity.context: 48",
    ),
    "bits-times-head-dim-not-whole": (
        "kv_caches:\n  - {key_bits: 3.1, value_bits: 3}\n",
        "kv_caches[0].key_bits: 3.1 bits on tiny-llama (head_dim 16) needs 3.1 * 16",
    ),
    "bits-with-three-decimals": (
        "kv_caches:\n  - {key_bits: 2.125, value_bits: 2}\n",
        "kv_caches[0].key_bits: 2.125 cannot name a result file",
    ),
    "fractional-kivi": (
        "kv_caches:\n  - {key_bits: 2.5, key_strategy: kivi, value_bits: 2, value_strategy: kivi}\n",
        "kv_caches[0]: key_bits must be a whole number for kivi",
    ),
    "prod-at-one-bit": (
        "kv_caches:\n  - {key_bits: 1, key_strategy: prod, value_bits: 2}\n",
        "kv_caches[0]: key_bits must be in [2, 8] for prod",
    ),
    "hadamard-odd-group": (
        "cache_options:\n  rotation: hadamard\nkv_caches:\n  - {key_bits: 2.75, value_bits: 2}\n",
        "kv_caches[0]: the Hadamard rotation needs power-of-two channel groups",
    ),
    "exact-layers-beyond-model": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2, exact_first_layers: 3}\n",
        "kv_caches[0].exact_first_layers: 3 exact layers, but tiny-llama has 2",
    ),
    "trace-layer-out-of-range": (
        "models:\n  - {preset: tiny-llama, trace_layers: [0, 2], trace_heads: [0]}\n",
        "models[0].trace_layers: 2 is out of range: tiny-llama has 2 layers",
    ),
    "trace-head-out-of-range": (
        "models:\n  - {preset: tiny-llama, trace_layers: [0], trace_heads: [2]}\n",
        "models[0].trace_heads: 2 is out of range: tiny-llama has 2 KV heads",
    ),
    "num-layers-beyond-model": (
        "models:\n  - {preset: tiny-llama, trace_layers: [0], trace_heads: [0], num_layers: 3}\n",
        "models[0].num_layers: 3, but tiny-llama has 2",
    ),
    "queries-beyond-max-seq": (
        "traces:\n  max_seq: 8\n  queries_per_sample: 9\n",
        "traces.queries_per_sample: 9 queries do not fit",
    ),
    "top-k-not-below-max-seq": (
        "traces:\n  max_seq: 8\n  queries_per_sample: 4\n  top_k: 8\n",
        "traces.top_k: 8 is not below max_seq 8",
    ),
    "same-entry-twice": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2}\n  - {key_bits: 2, value_bits: 2}\n",
        "kv_caches[1] (k2mse-v2mse) is the same cache setting as kv_caches[0] (k2mse-v2mse)",
    ),
    "same-setting-spelt-otherwise": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2}\n"
        "  - {key_bits: 2.0, key_strategy: mse, value_bits: 2}\n",
        "kv_caches[1] (k2mse-v2mse) is the same cache setting as kv_caches[0]",
    ),
    "default-option-under-another-label": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2}\n"
        "  - {key_bits: 2, value_bits: 2, residual_length: 0}\n",
        "kv_caches[1] (k2mse-v2mse-r0) is the same cache setting as kv_caches[0] (k2mse-v2mse)",
    ),
    "exact-stream-bits-do-not-count": (
        "kv_caches:\n  - {key_bits: 2, key_strategy: exact, value_bits: 2}\n"
        "  - {key_bits: 4, key_strategy: exact, value_bits: 2}\n",
        "kv_caches[1] (k4exact-v2mse) is the same cache setting as kv_caches[0] (k2exact-v2mse)",
    ),
    "exact-layer-set-beyond-model": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2, exact_layers: [2]}\n",
        "kv_caches[0].exact_layers: layer 2 is out of range: tiny-llama has 2 layers",
    ),
    "exact-layer-set-covers-the-model": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2, exact_first_layers: 1, exact_layers: [1]}\n",
        "kv_caches[0]: exact_first_layers 1, exact_last_layers 0 and exact_layers [1] keep every layer",
    ),
    "fp8-at-four-bits": (
        "kv_caches:\n  - {key_bits: 4, key_strategy: fp8, value_bits: 2}\n",
        "kv_caches[0]: key_bits must be 8 for fp8",
    ),
    "setting-on-an-unknown-model": (
        "kv_caches:\n  - {key_bits: 2, value_bits: 2, models: [qwen]}\n",
        "kv_caches[0].models: 'qwen' is not a model of this sweep",
    ),
    "preset-spelt-out": (
        "kv_caches:\n  - {preset: vllm-4bit_nc, exact_first_layers: 0, exact_last_layers: 0}\n"
        "  - {key_bits: 4, rotation: hadamard, renormalize: true, norm_dtype: float16, value_bits: 4,"
        " value_strategy: uniform, group_size: 256}\n",
        "kv_caches[1] (k4mse-v4uniform-g256-nc-hd-n16) is the same cache setting as kv_caches[0] "
        "(vllm-4bit_nc-ef0-el0)",
    ),
    "centring-exact-keys-does-not-count": (
        "kv_caches:\n  - {key_bits: 2, key_strategy: exact, value_bits: 2}\n"
        "  - {key_bits: 2, key_strategy: exact, value_bits: 2, center_keys: true}\n",
        "kv_caches[1] (k2exact-v2mse-kc) is the same cache setting as kv_caches[0] (k2exact-v2mse)",
    ),
    "needle-bits-twice": ("needle:\n  bits: [2, 2]\n", "needle.bits[1]: 2 repeats needle.bits[0]"),
    "synthetic-dims-twice": (
        "synthetic:\n  dims: [16, 16]\n",
        "synthetic.dims[1]: 16 repeats synthetic.dims[0]",
    ),
    "hadamard-synthetic-dim": (
        "synthetic:\n  dims: [24]\n  rotation: hadamard\n",
        "synthetic.dims: 24 is not a power of two",
    ),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("checks"))


@pytest.fixture(scope="module")
def dry_runs(workdir) -> dict[str, subprocess.CompletedProcess]:
    """``snakemake -n`` with each bad config, two at a time (each is a second of start-up)."""

    def dry_run(case: str) -> subprocess.CompletedProcess:
        (workdir / f"{case}.yaml").write_text(BAD_CONFIGS[case][0])
        return snakemake(workdir, "--dry-run", "--configfile", QUICK, f"{case}.yaml", check=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BAD_CONFIGS, pool.map(dry_run, BAD_CONFIGS), strict=True))


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_stops_the_dry_run_naming_the_key(dry_runs, case):
    result = dry_runs[case]
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"config: {BAD_CONFIGS[case][1]}" in output, output[-2000:]
    assert "Building DAG of jobs" not in output


def test_settings_that_differ_pass(workdir):
    """Distinct settings, group sizes of one baseline included, are no duplicates."""
    (workdir / "good.yaml").write_text(
        "kv_caches:\n"
        "  - {key_bits: 2, value_bits: 2}\n"
        "  - {key_bits: 2, value_bits: 2, residual_length: 8}\n"
        "  - {key_bits: 2, key_strategy: kivi, value_bits: 2, value_strategy: kivi}\n"
        "  - {key_bits: 2, key_strategy: kivi, value_bits: 2, value_strategy: kivi, group_size: 16}\n"
        "  - {key_bits: 2.5, value_bits: 2.5}\n"
        "  - {key_bits: 2, value_bits: 2, center_keys: true, models: [tiny-llama]}\n"
        "  - {key_bits: 8, key_strategy: fp8, value_bits: 2}\n"
        "  - {key_bits: 8, key_strategy: fp8, fp8_scale: head, value_bits: 2}\n"
        "  - {key_bits: 2, value_bits: 2, exact_layers: [1]}\n"
        "  - {preset: vllm-k8v4, exact_first_layers: 1, exact_last_layers: 0}\n"
    )
    result = snakemake(workdir, "--dry-run", "--configfile", QUICK, "good.yaml", check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
