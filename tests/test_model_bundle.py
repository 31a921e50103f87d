"""ModelBundle: loading validates bundle.json, the files and the ONNX graph, and names what is
wrong. Each broken bundle is a copy of a tiny bundle with one thing changed, then sealed again
(bundle.json's manifest and checksum rewritten, as a faulty prepare would leave it), so that the
check under test, not the integrity check (tests/test_cache_verification.py), catches it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tq.models.bundle import (
    BUNDLE_JSON,
    MODEL_ONNX,
    MODEL_ONNX_DATA,
    BundleError,
    ModelBundle,
    write_bundle_info,
)


def _reseal(path: Path) -> None:
    """Rewrite bundle.json's file manifest and checksum for the files as they are now."""
    write_bundle_info(path, json.loads((path / BUNDLE_JSON).read_text()))


def _sealed(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    def sealed(path: Path) -> None:
        edit(path)
        _reseal(path)

    return sealed


def _edit_graph(path: Path, edit: Callable) -> None:
    """Apply ``edit`` to model.onnx's graph (weights stay in model.onnx_data, untouched)."""
    import onnx

    model = onnx.load(str(path / MODEL_ONNX), load_external_data=False)
    edit(model.graph)
    onnx.save(model, str(path / MODEL_ONNX))
    _reseal(path)


def _remove(items, name: str) -> None:
    (index,) = [i for i, item in enumerate(items) if item.name == name]
    del items[index]


def _drop_input(name: str) -> Callable[[Path], None]:
    return lambda path: _edit_graph(path, lambda graph: _remove(graph.input, name))


def _drop_output(name: str) -> Callable[[Path], None]:
    return lambda path: _edit_graph(path, lambda graph: _remove(graph.output, name))


def _add_input(name: str) -> Callable[[Path], None]:
    import onnx

    value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, ["batch", "sequence"])
    return lambda path: _edit_graph(path, lambda graph: graph.input.append(value))


def _set_field(key: str, value) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        info = json.loads((path / BUNDLE_JSON).read_text())
        if value is _DELETE:
            del info[key]
        else:
            info[key] = value
        write_bundle_info(path, info)

    return edit


_DELETE = object()


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(data)


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).unlink()


def _truncate(name: str, size: int) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        with open(path / name, "r+b") as f:
            f.truncate(size)

    return edit


BROKEN = {
    "graph lacks a past input": (
        _drop_input("past_key_values.1.value"),
        "model.onnx has no input past_key_values.1.value$",
    ),
    "graph lacks input_ids": (_drop_input("input_ids"), "model.onnx has no input input_ids$"),
    "graph lacks a present output": (
        _drop_output("present.0.key"),
        "model.onnx has no output present.0.key$",
    ),
    "graph lacks logits": (_drop_output("logits"), "model.onnx has no output logits$"),
    "graph has an input nobody feeds": (_add_input("token_type_ids"), "cannot feed: token_type_ids"),
    "bundle.json missing": (_unlink(BUNDLE_JSON), "no bundle.json"),
    "bundle.json corrupt": (_write(BUNDLE_JSON, b'{"schema": "tq.bundle/1", "num_'), "bundle.json: corrupt"),
    "bundle.json not an object": (_write(BUNDLE_JSON, b"[1, 2]"), "expected a JSON object"),
    "bundle.json lacks a field": (_set_field("num_layers", _DELETE), "missing field num_layers$"),
    "bundle.json field of the wrong type": (_set_field("kv_heads", "2"), "field kv_heads has the wrong type"),
    "bundle.json of another schema": (_set_field("schema", "tq.bundle/0"), "schema 'tq.bundle/0'"),
    "bundle.json negative eos": (_set_field("eos_token_ids", [-1]), "eos_token_ids"),
    "more layers than the graph": (
        _set_field("num_layers", 3),
        "model.onnx has no inputs past_key_values.2.key, past_key_values.2.value$",
    ),
    "fewer layers than the graph": (_set_field("num_layers", 1), "cannot feed: past_key_values.1.key"),
    "wrong kv_heads": (_set_field("kv_heads", 3), "axis 1, bundle.json says kv_heads 3"),
    "wrong head_dim": (_set_field("head_dim", 8), "axis 3, bundle.json says head_dim 8"),
    "wrong vocab_size": (_set_field("vocab_size", 100), "bundle.json says 100"),
    "stale input names": (_set_field("input_names", ["input_ids"]), "stale or edited bundle"),
    "tokenizer missing": (_unlink("tokenizer.json"), "missing tokenizer.json$"),
    "model.onnx missing": (_unlink(MODEL_ONNX), "missing model.onnx$"),
    "model.onnx not ONNX": (_sealed(_write(MODEL_ONNX, b"\xff" * 64)), "not a readable ONNX model"),
    "weights missing": (_sealed(_unlink(MODEL_ONNX_DATA)), "missing external data file 'model.onnx_data'"),
    "weights truncated": (_sealed(_truncate(MODEL_ONNX_DATA, 1000)), "model.onnx_data: truncated"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bundle_is_rejected_by_name(bundle_copy, case):
    ModelBundle.load(bundle_copy)  # intact before the edit
    edit, message = BROKEN[case]
    edit(bundle_copy)
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(bundle_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory"):
        ModelBundle.load(tmp_path / "nothing")


def test_loaded_bundle(tiny_llama_bundle):
    bundle = ModelBundle.load(tiny_llama_bundle)
    assert bundle.path == tiny_llama_bundle.absolute()
    assert bundle.input_names == (
        "input_ids",
        "attention_mask",
        "position_ids",
        *(f"past_key_values.{n}.{kind}" for n in range(2) for kind in ("key", "value")),
    )
    presents = (f"present.{n}.{kind}" for n in range(2) for kind in ("key", "value"))
    assert bundle.output_names == ("logits", *presents)
    assert bundle.has_attention_mask and bundle.has_position_ids
    assert not bundle.has_cache_position and not bundle.has_use_cache_branch
    assert bundle.info["input_names"] == list(bundle.input_names)
    assert bundle.tokenizer() is bundle.tokenizer()
    assert bundle.encode("keys and values") == bundle.tokenizer().encode("keys and values").ids
    assert bundle.decode(np.array(bundle.encode("keys and values"))) == "keys and values"
    assert bundle.decode([2]) == "<|im_end|>"


def test_session(tiny_llama_bundle):
    bundle = ModelBundle.load(tiny_llama_bundle)
    session = bundle.session(threads=1)
    assert [node.name for node in session.get_inputs()] == list(bundle.input_names)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="threads"):
        bundle.session(threads=0)


def test_corrupt_tokenizer_is_a_bundle_error(bundle_copy):
    (bundle_copy / "tokenizer.json").write_text("{not json")
    _reseal(bundle_copy)
    bundle = ModelBundle.load(bundle_copy)
    with pytest.raises(BundleError, match=r"tokenizer\.json: not a readable tokenizer"):
        bundle.encode("hello")
