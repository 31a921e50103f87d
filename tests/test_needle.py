"""Needle in a haystack: the prompt builder, the scoring, the workload on a tiny model and one short
check on the real SmolLM2-135M-Instruct bundle (about 40 s for the whole file on 2 cores)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.models_fixtures import tiny_bundle
from tq.cache.config import CacheConfig
from tq.cli import main
from tq.models.bundle import ModelBundle
from tq.models.chat import render_chat
from tq.tasks.needle import (
    NEEDLE,
    PLAIN_ANSWER,
    NeedleError,
    NeedlePromptBuilder,
    max_positions,
    retrieved,
    run_needle,
    run_needle_sweep,
)

EXACT = CacheConfig(key_strategy="exact", value_strategy="exact")
# Filler for the tiny model: paragraphs of short sentences (no corpus download needed).
FILLER = "\n\n".join(
    " ".join(f"Sentence {p}.{s} of the filler talks about keys, values and caches." for s in range(6))
    for p in range(200)
)
TINY_LENGTHS = (192, 320)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny-llama bundle (no chat template, 2048 positions)."""
    return tiny_bundle(tmp_path_factory.getbasetemp(), "tiny-llama")


@pytest.fixture(scope="module")
def smollm2(smollm2_bundle, persistent_cache_dir):
    """(bundle, prompt builder over the Wikipedia corpus) of SmolLM2-135M-Instruct."""
    bundle = ModelBundle.load(smollm2_bundle)
    return bundle, NeedlePromptBuilder(bundle, cache=persistent_cache_dir)


# --- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "found"),
    [
        ("The secret number of Lisbon mentioned in the text is 48213.<|im_end|>", True),
        ("48213", True),
        ("It is 48,213.", True),
        ("It is 48 213", True),
        ("Number 2: 48213", True),
        ("It is 48,2130.", False),
        ("It is 148213.", False),
        ("It is 482130.", False),
        ("It is 4821.", False),
        ("The secret number is 2011.", False),
        ("", False),
    ],
)
def test_retrieval_is_the_whole_number_in_the_answer(answer, found):
    assert retrieved(answer, "48213") is found


# --- prompt builder ---------------------------------------------------------------------------


def _filler_without_needle(prompt) -> list[int]:
    start, end = prompt.needle_start, prompt.needle_start + prompt.needle_tokens
    return prompt.context_ids[prompt.haystack_start : start] + prompt.context_ids[end:]


def test_smollm2_prompt_uses_the_chat_format(smollm2):
    bundle, builder = smollm2
    head, tail = render_chat(bundle)
    assert head.startswith("<|im_start|>system\n") and head.endswith("<|im_start|>user\n")
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    prompt = builder.build(1024, 0.5, trial=0)
    assert builder.chat
    assert bundle.decode(prompt.context_ids).startswith(head)
    assert bundle.decode(prompt.query_ids).endswith(tail)
    assert f"secret number of {prompt.name}" in bundle.decode(prompt.query_ids)
    assert max_positions(bundle) == 8192


@pytest.mark.parametrize("length", [1024, 4096])
def test_needle_sits_at_the_requested_depth_in_tokens(smollm2, length):
    bundle, builder = smollm2
    for trial in range(3):
        prompts = [builder.build(length, depth, trial) for depth in (0.1, 0.5, 0.9)]
        for prompt in prompts:
            # the prompt fills the context: it ends at a sentence boundary at most 96 tokens short
            assert length - 96 <= prompt.length <= length
            needle = bundle.decode(
                prompt.context_ids[prompt.needle_start : prompt.needle_start + prompt.needle_tokens]
            )
            assert needle.strip() == NEEDLE.format(name=prompt.name, number=prompt.number)
            before = bundle.decode(prompt.context_ids[prompt.haystack_start : prompt.needle_start])
            assert re.search(r"[.!?]['\")\]]?\s*$|\n\s*$", before), before[-80:]
            # a sentence boundary near the requested fraction of the filler tokens
            assert abs(prompt.actual_depth - prompt.depth) < 0.1
            assert abs(prompt.actual_depth - prompt.depth) * prompt.filler_tokens < 128
        # one trial is one haystack and one needle: only the depth changes
        assert len({tuple(_filler_without_needle(p)) for p in prompts}) == 1
        assert len({(p.name, p.number, p.text_offset) for p in prompts}) == 1


def test_prompts_are_deterministic_per_seed(smollm2):
    _, builder = smollm2
    first = builder.build(1024, 0.5, trial=1, seed=3)
    assert builder.build(1024, 0.5, trial=1, seed=3) == first
    others = [builder.build(1024, 0.5, trial=2, seed=3), builder.build(1024, 0.5, trial=1, seed=4)]
    for other in others:
        assert other.text_offset != first.text_offset
        assert other.context_ids != first.context_ids


def test_plain_prompt_for_a_model_without_chat_template(tiny):
    bundle = ModelBundle.load(tiny)
    assert render_chat(bundle) is None
    builder = NeedlePromptBuilder(bundle, FILLER)
    prompt = builder.build(TINY_LENGTHS[0], 0.5, trial=0)
    assert not builder.chat
    assert bundle.decode(prompt.query_ids).endswith("\n" + PLAIN_ANSWER)
    assert "<|im_start|>" not in bundle.decode(prompt.ids)
    assert TINY_LENGTHS[0] - 96 <= prompt.length <= TINY_LENGTHS[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depths": [0.0]}, "depths must be in (0, 1)"),
        ({"depths": [0.5, 1.0]}, "depths must be in (0, 1)"),
        ({"depths": []}, "no depths given"),
        ({"context_lengths": []}, "no context lengths given"),
        ({"context_lengths": [4096]}, "exceeds the model's 2048 positions"),
        ({"context_lengths": [2040]}, "plus 24 new tokens exceeds the model's 2048 positions"),
        ({"context_lengths": [40]}, "context length 40 is too short"),
        ({"context_lengths": [192, 192]}, "must not repeat"),
        ({"trials": 0}, "trials must be a positive integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ],
)
def test_bad_inputs_are_refused_before_any_model_call(tiny, kwargs, message):
    arguments = {"context_lengths": TINY_LENGTHS, "depths": [0.5], "trials": 1, "text": FILLER} | kwargs
    with pytest.raises(NeedleError, match=re.escape(message)):
        run_needle(tiny, EXACT, **arguments)


def test_depth_outside_the_unit_interval_is_refused_by_the_builder(tiny):
    builder = NeedlePromptBuilder(ModelBundle.load(tiny), FILLER)
    for depth in (-0.1, 0.0, 1.0, 2.0):
        with pytest.raises(NeedleError, match="depth must be in"):
            builder.build(TINY_LENGTHS[0], depth, trial=0)


# --- the workload -----------------------------------------------------------------------------


def test_exact_cache_through_the_quantized_path_gives_the_exact_answers(tiny):
    record = run_needle(tiny, EXACT, TINY_LENGTHS, (0.25, 0.75), trials=2, max_new_tokens=6, text=FILLER)
    assert record["source"] == "real-model" and record["schema"] == "tq.result/1"
    config, metrics = record["config"], record["metrics"]
    assert config["workload"] == "needle" and config["model"] == "tiny-llama"
    assert config["context_lengths"] == list(TINY_LENGTHS) and config["depths"] == [0.25, 0.75]
    assert config["cache"]["key_strategy"] == "exact" and config["chat_format"] is False
    assert len(metrics["trials"]) == 8 and len(metrics["cells"]) == 4
    assert all(row["same_answer"] for row in metrics["trials"])
    assert metrics["answer_agreement"] == 1.0 and metrics["retrieval_agreement"] == 1.0
    assert metrics["exact_retrieval"] == metrics["quantized_retrieval"]
    assert metrics["kv_compression_ratio"] == 1.0
    assert set(metrics["by_length"]) == {str(length) for length in TINY_LENGTHS}
    for cell in metrics["cells"]:
        assert cell["trials"] == 2 and 0.0 <= cell["exact_retrieval"] <= 1.0
    assert record["timing"]["prefill_seconds"] > 0
    assert set(record["timing"]["by_length"]) == {str(length) for length in TINY_LENGTHS}
    json.dumps(record, allow_nan=False)


def test_a_sweep_shares_the_exact_side_and_equals_separate_runs(tiny):
    """One prefill and exact answer per prompt for several caches gives each cache the record a
    run of its own would give."""
    configs = [CacheConfig(key_bits=2, value_bits=2), CacheConfig(key_bits=4, value_bits=3)]
    options = {"context_lengths": TINY_LENGTHS[:1], "depths": (0.5,), "trials": 2, "max_new_tokens": 5}
    sweep = run_needle_sweep(tiny, configs, text=FILLER, **options)
    assert [record["config"]["cache"] for record in sweep] == [config.describe() for config in configs]
    for config, record in zip(configs, sweep, strict=True):
        alone = run_needle(tiny, config, text=FILLER, **options)
        fields = ("exact_answer", "quantized_answer", "same_answer", "prompt_tokens")
        assert [{f: row[f] for f in fields} for row in record["metrics"]["trials"]] == [
            {f: row[f] for f in fields} for row in alone["metrics"]["trials"]
        ]
        assert record["metrics"]["kv_nbytes"] == alone["metrics"]["kv_nbytes"]
        assert record["timing"]["configs_sharing_prefill"] == 2
    with pytest.raises(NeedleError, match="no cache configurations"):
        run_needle_sweep(tiny, [], text=FILLER, **options)


def test_needle_cli_writes_a_record(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tq.data.corpus.corpus_text", lambda cache=None: FILLER)
    out = tmp_path / "needle.json"
    args = ["bench", "--workload", "needle", "--real-model-dir", str(tiny), "--bits", "2"]
    args += ["--value-bits", "3", "--context-lengths", "192,256", "--depths", "0.3,0.6", "--trials", "1"]
    args += ["--max-new-tokens", "4", "--exact-last-layers", "1", "--json", str(out)]
    assert main(args) == 0
    assert "retrieval exact" in capsys.readouterr().out
    record = json.loads(out.read_text())
    config, metrics = record["config"], record["metrics"]
    assert config["workload"] == "needle" and config["trials"] == 1 and config["max_new_tokens"] == 4
    assert config["context_lengths"] == [192, 256] and config["depths"] == [0.3, 0.6]
    assert config["cache"]["key_bits"] == 2 and config["cache"]["value_bits"] == 3
    assert config["exact_layers"] == [1]
    assert len(metrics["trials"]) == 4
    assert all(row["exact_tokens"] <= 4 for row in metrics["trials"])
    assert 1.0 < metrics["kv_compression_ratio"] < 32 / 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--context-lengths", "192", "--depths", "0.5,1.5"], "depths must be in (0, 1)"),
        (["--context-lengths", "192,8192"], "exceeds the model's 2048 positions"),
        (["--context-lengths", "192", "--trials", "0"], "trials must be a positive integer"),
    ],
)
def test_needle_cli_errors(tiny, extra, message, monkeypatch, capsys):
    monkeypatch.setattr("tq.data.corpus.corpus_text", lambda cache=None: FILLER)
    assert main(["bench", "--workload", "needle", "--real-model-dir", str(tiny), *extra]) == 2
    assert message in capsys.readouterr().err


def test_needle_cli_needs_a_bundle(capsys):
    assert main(["bench", "--workload", "needle"]) == 2
    assert "needs --real-model-dir DIR" in capsys.readouterr().err


# --- the real model ---------------------------------------------------------------------------


def test_smollm2_finds_the_needle_and_an_8_bit_cache_answers_the_same(smollm2_bundle, persistent_cache_dir):
    """One 1k-token haystack per trial, needle in the middle: the exact cache retrieves it (the
    full default run measures about 1.0 at 1k tokens), and an 8-bit cache changes no answer."""
    config = CacheConfig(key_bits=8, value_bits=8)
    record = run_needle(
        smollm2_bundle, config, [1024], [0.5], trials=2, threads=2, cache=persistent_cache_dir
    )
    metrics = record["metrics"]
    assert record["config"]["chat_format"] is True
    assert metrics["exact_retrieval"] == 1.0, [row["exact_answer"] for row in metrics["trials"]]
    assert metrics["answer_agreement"] == 1.0, [row["quantized_answer"] for row in metrics["trials"]]
    assert metrics["quantized_retrieval"] == 1.0
    assert np.isclose(metrics["kv_compression_ratio"], 256 / (64 + 4))  # 8-bit codes + fp32 norm
