"""The synthetic benchmark and the ``tq bench`` command."""

from __future__ import annotations

import json

import pytest

from tq.bench.synthetic import run_synthetic
from tq.cli import main
from tq.records import SCHEMA


def test_synthetic_record_has_every_field_and_sane_values() -> None:
    record = run_synthetic(dim=64, bits=3, strategy="mse", n=2000, quick=True)
    assert record["schema"] == SCHEMA and record["source"] == "synthetic"
    assert set(record) == {"schema", "source", "config", "metrics", "timing", "env", "created"}
    metrics = record["metrics"]
    # 2000 vectors: the standard error of D_mse is about 2% of its value at d = 64.
    assert metrics["d_mse"] == pytest.approx(metrics["d_mse_expected"], rel=0.1)
    assert metrics["d_mse_lower_bound"] < metrics["d_mse"] < metrics["d_mse_upper_bound"]
    assert metrics["bits_per_vector"] == 64 * 3
    assert record["timing"]["repeats"] >= 5
    assert record["timing"]["quantize_vectors_per_s"] > 0
    assert record["env"]["threads"] >= 1


def test_prod_record_is_nearly_unbiased() -> None:
    metrics = run_synthetic(dim=64, bits=3, strategy="prod", n=2000, quick=True)["metrics"]
    assert metrics["d_mse_expected"] is None
    assert metrics["ip_slope"] == pytest.approx(1.0, abs=0.1)
    assert metrics["bits_per_vector"] == 64 * 2 + 64 + 32


def test_cli_writes_the_record(tmp_path, capsys) -> None:
    out = tmp_path / "nested" / "result.json"
    code = main(
        [
            "bench",
            "--workload",
            "synthetic",
            "--dim",
            "32",
            "--bits",
            "2",
            "--strategy",
            "prod",
            "--n",
            "512",
            "--quick",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["config"]["strategy"] == "prod" and record["config"]["n"] == 512
    assert "M vectors/s" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp files left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "9"], "bits must be in"),
        (["--strategy", "prod", "--bits", "1"], "bits >= 2"),
        (["--n", "0"], "n must be at least 1"),
        (["--repeats", "2"], "repeats must be at least 5"),
    ],
)
def test_cli_reports_bad_input(args, message, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "--dim", "16", "--json", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
