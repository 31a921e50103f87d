"""KvTrace: validation, slicing and safetensors files (docs/design.md section 4)."""

from __future__ import annotations

import numpy as np
import pytest

from tq.core.fileio import save_tensors
from tq.data.trace import FORMAT, KvTrace, TraceFormatError

SAMPLES, SEQ, DIM, QUERIES = 3, 10, 8, 4


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Valid trace arrays: random keys, values and queries; queries at the last positions."""
    rng = np.random.default_rng(seed)
    return {
        "keys": rng.standard_normal((SAMPLES, SEQ, DIM)).astype(np.float32),
        "values": rng.standard_normal((SAMPLES, SEQ, DIM)).astype(np.float32),
        "queries": rng.standard_normal((SAMPLES, QUERIES, DIM)).astype(np.float32),
        "query_positions": np.tile(np.arange(SEQ - QUERIES, SEQ, dtype=np.int64), (SAMPLES, 1)),
    }


META = {"model": "tiny", "layer": 3, "head": 1, "rope": "post", "note": "made in a test"}


def make_trace(**changes) -> KvTrace:
    return KvTrace(**{**arrays(), **META, **changes})


def assert_same_trace(actual: KvTrace, expected: KvTrace) -> None:
    for name in ("keys", "values", "queries", "query_positions"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes(), name
    for name in META:
        assert getattr(actual, name) == getattr(expected, name)


def write_raw(path, metadata_changes=None, **tensor_changes) -> None:
    """Write a trace file with a valid checksum but arbitrary content (a buggy writer)."""
    metadata = {"format": FORMAT, **{name: str(value) for name, value in META.items()}}
    tensors = {**arrays(), **tensor_changes}
    save_tensors(
        path, {k: v for k, v in tensors.items() if v is not None}, {**metadata, **(metadata_changes or {})}
    )


def test_properties() -> None:
    trace = make_trace()
    assert (len(trace), trace.samples, trace.seq_len, trace.head_dim, trace.n_queries) == (
        SAMPLES,
        SAMPLES,
        SEQ,
        DIM,
        QUERIES,
    )


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    trace = make_trace()
    path = tmp_path / "sub" / "trace.safetensors"
    trace.save(path)
    assert_same_trace(KvTrace.load(path), trace)
    assert [p.name for p in path.parent.iterdir()] == ["trace.safetensors"]  # no temp files left


def test_indexing_slicing_and_select_keep_metadata() -> None:
    trace = make_trace()
    full = arrays()
    cases = {
        "one": (trace[1], [1]),
        "negative": (trace[-1], [SAMPLES - 1]),
        "slice": (trace[1:3], [1, 2]),
        "empty slice": (trace[2:2], []),
        "select": (trace.select([2, 0, 2]), [2, 0, 2]),
        "select numpy": (trace.select(np.array([1])), [1]),
    }
    for label, (part, indices) in cases.items():
        assert len(part) == len(indices), label
        for name, array in full.items():
            np.testing.assert_array_equal(getattr(part, name), array[indices], err_msg=label)
        for name, value in META.items():
            assert getattr(part, name) == value, label


@pytest.mark.parametrize("index", [SAMPLES, -SAMPLES - 1])
def test_index_out_of_range(index) -> None:
    with pytest.raises(IndexError, match=f"sample {index} out of range for a trace of {SAMPLES} samples"):
        make_trace()[index]
    with pytest.raises(IndexError, match=f"sample {index} out of range"):
        make_trace().select([0, index])


def test_bad_index_types() -> None:
    with pytest.raises(TypeError, match="integer or a slice"):
        make_trace()[1.0]
    with pytest.raises(TypeError, match="1-D sequence of integers"):
        make_trace().select([0.5])


def _with_value(name: str, index: tuple, value) -> np.ndarray:
    array = arrays()[name].copy()
    array[index] = value
    return array


REJECTIONS = [
    ({"keys": arrays()["keys"].astype(np.float64)}, "keys must be a float32 array, got float64"),
    ({"values": arrays()["values"].astype(np.float16)}, "values must be a float32 array, got float16"),
    (
        {"query_positions": arrays()["query_positions"].astype(np.int32)},
        "query_positions must be a int64 array",
    ),
    ({"queries": arrays()["queries"].tolist()}, "queries must be a float32 array, got list"),
    ({"keys": arrays()["keys"][0]}, r"keys must have 3 dimensions, got shape \[10, 8\]"),
    ({"keys": arrays()["keys"][:, :0]}, r"keys must have seq >= 1 and head_dim >= 1"),
    (
        {"values": arrays()["values"][:, :5]},
        r"values must have the shape of keys \[3, 10, 8\], got \[3, 5, 8\]",
    ),
    (
        {"queries": arrays()["queries"][:2]},
        r"queries must have shape \[3, n_queries >= 1, 8\], got \[2, 4, 8\]",
    ),
    ({"queries": arrays()["queries"][..., :4]}, r"queries must have shape .*, got \[3, 4, 4\]"),
    ({"query_positions": arrays()["query_positions"][:, :2]}, r"query_positions must have shape \[3, 4\]"),
    ({"keys": _with_value("keys", (0, 4, 2), np.inf)}, r"keys\[0, 4, 2\] is not finite \(inf\)"),
    ({"values": _with_value("values", (1, 2, 3), np.nan)}, r"values\[1, 2, 3\] is not finite \(nan\)"),
    ({"queries": _with_value("queries", (2, 0, 7), -np.inf)}, r"queries\[2, 0, 7\] is not finite"),
    (
        {"query_positions": _with_value("query_positions", (1, 2), -1)},
        r"query_positions\[1, 2\] = -1 is negative",
    ),
    (
        {"query_positions": _with_value("query_positions", (2, 3), SEQ)},
        r"query_positions\[2, 3\] = 10 is >= seq \(10\)",
    ),
    ({"rope": "pre"}, r"rope must be one of \('post', 'none'\), got 'pre'"),
    ({"layer": -1}, "layer must be a non-negative integer, got -1"),
    ({"head": True}, "head must be a non-negative integer, got True"),
    ({"model": None}, "model must be a string, got None"),
]


@pytest.mark.parametrize(("changes", "message"), REJECTIONS)
def test_construction_rejects(changes, message) -> None:
    with pytest.raises(TraceFormatError, match=message):
        make_trace(**changes)


FILE_REJECTIONS = [
    ({"keys": arrays()["keys"].astype(np.float64)}, None, "keys must be a float32 array"),
    ({"values": arrays()["values"][:, 1:]}, None, "values must have the shape of keys"),
    ({"values": _with_value("values", (0, 0, 0), np.nan)}, None, r"values\[0, 0, 0\] is not finite"),
    (
        {"query_positions": _with_value("query_positions", (0, 1), -5)},
        None,
        r"query_positions\[0, 1\] = -5 is negative",
    ),
    (
        {"query_positions": _with_value("query_positions", (1, 0), 99)},
        None,
        r"query_positions\[1, 0\] = 99 is >= seq",
    ),
    ({"queries": None}, None, "no 'queries' tensor"),
    ({"extra": np.zeros(1, np.float32)}, None, r"unexpected tensors \['extra'\]"),
    ({}, {"format": "tq.batch/1"}, "format is 'tq.batch/1', expected 'tq.trace/1'"),
    ({}, {"layer": "three"}, "missing or malformed metadata"),
    ({}, {"rope": "pre"}, "rope must be one of"),
]


@pytest.mark.parametrize(("tensors", "metadata", "message"), FILE_REJECTIONS)
def test_load_rejects_bad_content_and_names_the_file(tmp_path, tensors, metadata, message) -> None:
    path = tmp_path / "bad.safetensors"
    write_raw(path, metadata, **tensors)
    with pytest.raises(TraceFormatError, match=message) as error:
        KvTrace.load(path)
    assert str(path) in str(error.value)


def test_load_rejects_a_truncated_file(tmp_path) -> None:
    path = tmp_path / "trace.safetensors"
    make_trace().save(path)
    data = path.read_bytes()
    for size in (4, 100, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(TraceFormatError, match="truncated"):
            KvTrace.load(path)


def test_load_rejects_an_altered_byte(tmp_path) -> None:
    path = tmp_path / "trace.safetensors"
    make_trace().save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="does not match its checksum"):
        KvTrace.load(path)


def test_load_rejects_a_missing_file(tmp_path) -> None:
    with pytest.raises(TraceFormatError, match="cannot read"):
        KvTrace.load(tmp_path / "absent.safetensors")


def write_foreign(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A trace as another tool (the reference crate's exporter) writes it: plain safetensors,
    no checksum, no format key."""
    import safetensors.numpy

    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


def test_loads_a_trace_written_by_another_tool(tmp_path) -> None:
    path = tmp_path / "foreign.safetensors"
    tensors = arrays()
    write_foreign(path, tensors, {"model": "mistral", "layer": "0", "head": "2"})
    trace = KvTrace.load(path)
    assert (trace.model, trace.layer, trace.head, trace.rope, trace.note) == ("mistral", 0, 2, "post", "")
    np.testing.assert_array_equal(trace.keys, tensors["keys"])
    one = {name: array[0] for name, array in tensors.items()}  # one sample, other dtypes
    one["keys"] = one["keys"].astype(np.float16)
    one["query_positions"] = one["query_positions"].astype(np.int32)
    write_foreign(path, one, {"model": "m", "layer": "1", "head": "0"})
    trace = KvTrace.load(path)
    assert trace.samples == 1 and trace.keys.dtype == np.float32 and trace.query_positions.dtype == np.int64


def test_a_foreign_trace_is_still_checked(tmp_path) -> None:
    path = tmp_path / "foreign.safetensors"
    bad = arrays()
    bad["query_positions"][1, 2] = SEQ
    write_foreign(path, bad, {"model": "m", "layer": "0", "head": "0"})
    with pytest.raises(TraceFormatError, match=rf"query_positions\[1, 2\] = {SEQ}"):
        KvTrace.load(path)
    write_foreign(path, arrays(), {"model": "m", "head": "0"})
    with pytest.raises(TraceFormatError, match="missing or malformed metadata"):
        KvTrace.load(path)
    write_foreign(path, arrays(), {"format": "other/1", "model": "m", "layer": "0", "head": "0"})
    with pytest.raises(TraceFormatError, match="format is 'other/1'"):
        KvTrace.load(path)
