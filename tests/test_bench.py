"""The synthetic benchmark and the ``tq bench`` command."""

from __future__ import annotations

import json

import pytest

from tq.cli import main
from tq.tasks.records import SCHEMA
from tq.tasks.synthetic import run_synthetic


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


def _json_path_cases(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-directory").mkdir()
    return {
        "empty": ("", "an empty path"),
        "directory": (str(tmp_path / "a-directory"), "is a directory"),
        "under-a-file": (str(tmp_path / "a-file" / "r.json"), "is not a directory"),
    }


@pytest.mark.parametrize("case", ["empty", "directory", "under-a-file"])
def test_an_unwritable_json_path_fails_before_any_work(case, tmp_path, capsys, monkeypatch) -> None:
    path, message = _json_path_cases(tmp_path)[case]
    monkeypatch.setattr("tq.cli.bench.run_synthetic", lambda **_: pytest.fail("the workload ran"))
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--dim", "16", "--n", "64", "--json", path])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "argument --json: " in error and message in error


def test_a_record_that_cannot_be_written_at_the_end_is_printed(tmp_path, capsys, monkeypatch) -> None:
    def refuse(path, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tq.cli.bench.write_record", refuse)
    out = tmp_path / "r.json"
    assert main(["bench", "--dim", "16", "--n", "64", "--quick", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "M vectors/s" in captured.out  # the summary comes first
    record = json.loads(captured.out[captured.out.index("{") :])
    assert record["config"]["dim"] == 16
    assert f"cannot write {out}" in captured.err and "No space left" in captured.err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_top_k_below_one_is_refused(value, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--workload", "trace", "--trace", "t.safetensors", "--top-k", value])
    assert f"--top-k: must be at least 1, got {value}" in capsys.readouterr().err
