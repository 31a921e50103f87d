"""Trace extraction from tiny random Hugging Face models, the prompt reader and ``tq trace export``.

The references come from an independent run of the same model with transformers' own eager
attention: its KV cache (``past_key_values``) and the input of the output projection (the
per-head attention outputs before o_proj / c_proj). Tolerance: everything is float32 with O(1)
values and a few dozen terms per dot product, so 1e-4 absolute and relative is ample, while a
wrong query head, position or scale misses by orders of magnitude (checked below).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import transformers

from tests.models_fixtures import tiny_gemma3, tiny_gpt2, tiny_llama
from tq.cli import main
from tq.data.trace import KvTrace
from tq.tasks.trace_export import TraceExportError, export_traces, read_prompts, trace_filename

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}

# Ragged: 17, 12 and 18 words (one token each for the word-level tokenizer).
PROMPTS = [
    "the quick brown fox jumps over the lazy dog and a cache holds the keys of every",
    "queries attend to keys and read the values of every token here",
    "small random models are enough to test the plumbing and rotary embeddings turn keys by an angle that",
]
SEQ = 12
QUERIES = 5

# Where each family's per-head attention outputs enter the output projection.
OUTPUT_PROJECTION = {
    "llama": "model.layers.{}.self_attn.o_proj",
    "gemma3_text": "model.layers.{}.self_attn.o_proj",
    "gpt2": "transformer.h.{}.attn.c_proj",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": tiny_llama(root / "tiny-llama"),
        "gpt2": tiny_gpt2(root / "tiny-gpt2"),
        "gemma3": tiny_gemma3(root / "tiny-gemma3", sliding_window=8),
    }


def reference_run(model_dir, prompts, seq, layers):
    """Run each prompt (cut to ``seq`` tokens) with eager attention; return per prompt the
    cache's keys and values [layer][kv_heads, seq, head_dim] and the output projection's input
    [layer][seq, query_heads * head_dim]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    runs = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"][:seq]
        projected = {}
        hooks = [
            model.get_submodule(
                OUTPUT_PROJECTION[model.config.model_type].format(layer)
            ).register_forward_pre_hook(
                lambda module, args, layer=layer, store=projected: store.__setitem__(
                    layer, args[0][0].numpy().copy()
                )
            )
            for layer in layers
        ]
        with torch.inference_mode():
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
        for hook in hooks:
            hook.remove()
        runs.append(
            {
                "keys": {layer: cache.layers[layer].keys[0].numpy() for layer in layers},
                "values": {layer: cache.layers[layer].values[0].numpy() for layer in layers},
                "attention": projected,
            }
        )
    return runs


def attend(trace: KvTrace) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v over keys 0..position, per query: [samples, n_queries, head_dim]."""
    out = np.empty(trace.queries.shape)
    for sample in range(len(trace)):
        for index, position in enumerate(trace.query_positions[sample]):
            keys = trace.keys[sample, : position + 1].astype(np.float64)
            logits = keys @ trace.queries[sample, index] / math.sqrt(trace.head_dim)
            weights = np.exp(logits - logits.max())
            out[sample, index] = weights / weights.sum() @ trace.values[sample, : position + 1]
    return out


def check_against_reference(paths, model_dir, layers, heads, query_heads_per_kv_head) -> None:
    traces = [KvTrace.load(path) for path in paths]
    assert [(t.layer, t.head) for t in traces] == [(layer, head) for layer in layers for head in heads]
    runs = reference_run(model_dir, PROMPTS, traces[0].seq_len, layers)
    for trace in traces:
        dim, group = trace.head_dim, query_heads_per_kv_head
        for sample, run in enumerate(runs):
            np.testing.assert_allclose(trace.keys[sample], run["keys"][trace.layer][trace.head], **TOLERANCE)
            np.testing.assert_allclose(
                trace.values[sample], run["values"][trace.layer][trace.head], **TOLERANCE
            )
        reconstructed = attend(trace)
        for other_head in range(runs[0]["attention"][trace.layer].shape[1] // dim):
            columns = slice(other_head * dim, (other_head + 1) * dim)
            expected = np.stack(
                [
                    run["attention"][trace.layer][trace.query_positions[s], columns]
                    for s, run in enumerate(runs)
                ]
            )
            if other_head == trace.head * group:  # the first query head of the KV head's group
                np.testing.assert_allclose(reconstructed, expected, **TOLERANCE)
            else:  # the check can tell heads apart
                assert np.abs(reconstructed - expected).max() > 100 * TOLERANCE["atol"]


def test_llama_traces_match_the_cache_and_the_attention(models, tmp_path) -> None:
    out = tmp_path / "traces"
    paths = export_traces(models["llama"], PROMPTS, [1, 0], [1, 0, 1], out, queries_per_sample=QUERIES)
    assert paths == [out / trace_filename(layer, head) for layer in (0, 1) for head in (0, 1)]
    assert sorted(p.name for p in out.iterdir()) == [
        "layer00-head00.safetensors",
        "layer00-head01.safetensors",
        "layer01-head00.safetensors",
        "layer01-head01.safetensors",
    ]
    trace = KvTrace.load(out / "layer01-head01.safetensors")
    assert (trace.samples, trace.seq_len, trace.head_dim, trace.n_queries) == (3, SEQ, 16, QUERIES)
    assert (trace.model, trace.layer, trace.head, trace.rope) == ("tiny-llama", 1, 1, "post")
    np.testing.assert_array_equal(trace.query_positions, np.tile(np.arange(SEQ - QUERIES, SEQ), (3, 1)))
    assert "query head 2 (first of the 2 query heads sharing KV head 1)" in trace.note
    assert "truncated to seq 12 tokens (shortest prompt 12 tokens)" in trace.note
    check_against_reference(paths, models["llama"], [0, 1], [0, 1], query_heads_per_kv_head=2)


def test_gpt2_traces_have_no_rope_and_match(models, tmp_path) -> None:
    paths = export_traces(
        models["gpt2"],
        PROMPTS,
        [0, 1],
        [3],
        tmp_path,
        max_seq=9,
        queries_per_sample=9,
        model_name="gpt2-test",
    )
    trace = KvTrace.load(paths[0])
    assert (trace.model, trace.rope, trace.seq_len, trace.n_queries) == ("gpt2-test", "none", 9, 9)
    assert "max_seq 9" in trace.note and "scaled" not in trace.note
    check_against_reference(paths, models["gpt2"], [0, 1], [3], query_heads_per_kv_head=1)


def test_gemma3_queries_after_norm_with_the_scale_folded_in(models, tmp_path) -> None:
    # Gemma 3 normalizes queries and keys before RoPE and scales logits by 1/8, not 1/sqrt(16).
    paths = export_traces(models["gemma3"], PROMPTS, [0, 1], [0], tmp_path, max_seq=7, queries_per_sample=7)
    assert "queries scaled by 0.5 so that logits are q.k/sqrt(head_dim)" in KvTrace.load(paths[0]).note
    check_against_reference(paths, models["gemma3"], [0, 1], [0], query_heads_per_kv_head=4)


def test_sliding_window_shorter_than_seq_is_refused(models, tmp_path) -> None:
    with pytest.raises(TraceExportError, match=r"layer 0 has a sliding window of 8 tokens.*--max-seq 7"):
        export_traces(models["gemma3"], PROMPTS, [0], [0], tmp_path, max_seq=8, queries_per_sample=1)
    # A global layer of the same model is fine at any length.
    (path,) = export_traces(models["gemma3"], PROMPTS, [1], [0], tmp_path, queries_per_sample=1)
    assert KvTrace.load(path).seq_len == SEQ


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [2]}, r"layer 2 out of range: the model has 2 layers, 0\.\.1"),
        ({"layers": [-1]}, r"layer -1 out of range"),
        ({"layers": []}, "no layers given"),
        ({"heads": [2]}, r"KV head 2 out of range: the model has 2 KV heads, 0\.\.1"),  # 4 query heads
        ({"prompts": []}, "no prompts"),
        ({"queries_per_sample": SEQ + 1}, r"queries_per_sample must be in \[1, seq = 12\], got 13"),
        ({"queries_per_sample": 0}, r"queries_per_sample must be in \[1, seq = 12\], got 0"),
        ({"max_seq": 0}, "max_seq must be >= 1, got 0"),
    ],
)
def test_bad_arguments(models, tmp_path, kwargs, message) -> None:
    arguments = {"prompts": PROMPTS, "layers": [0], "heads": [0], "out_dir": tmp_path / "out", **kwargs}
    with pytest.raises(TraceExportError, match=message):
        export_traces(models["llama"], **arguments)
    assert not (tmp_path / "out").exists()


def test_prompts_longer_than_the_model_positions(models, tmp_path) -> None:
    long = " ".join(["the"] * 70)
    with pytest.raises(TraceExportError, match="seq 70 exceeds the model's 64 positions: use --max-seq 64"):
        export_traces(models["gpt2"], [long], [0], [0], tmp_path)


def test_missing_model_directory(tmp_path) -> None:
    with pytest.raises(TraceExportError, match="model directory not found"):
        export_traces(tmp_path / "absent", PROMPTS, [0], [0], tmp_path)


def test_progress_lines_when_many_prompts(models, tmp_path, capsys) -> None:
    export_traces(models["gpt2"], PROMPTS[:2], [0], [0], tmp_path, queries_per_sample=1)
    assert "prompt 1/" not in capsys.readouterr().err
    export_traces(models["gpt2"], PROMPTS * 4, [0], [0], tmp_path, queries_per_sample=1)
    err = capsys.readouterr().err
    assert "tq trace: 12 prompts x 12 tokens" in err
    assert [line for line in err.splitlines() if "prompt " in line and "/12" in line] == [
        f"tq trace: prompt {n}/12" for n in range(1, 13)
    ]


def test_read_prompts_txt_and_jsonl(tmp_path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n   \n  second prompt  \nthird\n")
    assert read_prompts(txt) == ["first prompt", "second prompt", "third"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "one", "id": 1}) + "\n\n" + json.dumps({"prompt": "two"}) + "\n")
    assert read_prompts(jsonl) == ["one", "two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "no prompts"),
        ("blank.txt", "\n  \n", "no prompts"),
        ("empty.jsonl", "\n", "no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', r"bad\.jsonl:2: no 'prompt' field"),
        ("bad.jsonl", '{"prompt": ""}\n', r"bad\.jsonl:1: no 'prompt' field"),
        ("bad.jsonl", '["prompt"]\n', r"bad\.jsonl:1: no 'prompt' field"),
        ("bad.jsonl", '{"prompt": "ok"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
        ("prompts.csv", "a,b\n", r"unknown prompt file extension '\.csv'"),
    ],
)
def test_read_prompts_rejects(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceExportError, match=message):
        read_prompts(path)


def test_read_prompts_missing_file(tmp_path) -> None:
    with pytest.raises(TraceExportError, match="prompt file not found"):
        read_prompts(tmp_path / "absent.txt")


def test_cli_writes_one_file_per_layer_and_head(models, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "traces"
    arguments = ["--model-dir", str(models["llama"]), "--prompts", str(prompts), "--out", str(out)]
    code = main(
        ["trace", "export", *arguments, "--layers", "0,1", "--heads", "1", "--queries-per-sample", "3"]
    )
    assert code == 0
    names = ["layer00-head01.safetensors", "layer01-head01.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert capsys.readouterr().out.split() == [str(out / name) for name in names]
    assert KvTrace.load(out / names[0]).n_queries == 3


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--layers", "2", "--heads", "0"], r"layer 2 out of range: the model has 2 layers, 0\.\.1"),
        (["--layers", "0", "--heads", "0,5"], r"KV head 5 out of range: the model has 2 KV heads, 0\.\.1"),
        (["--layers", "0", "--heads", "0", "--max-seq", "0"], "max_seq must be >= 1"),
    ],
)
def test_cli_rejects_bad_indices(models, tmp_path, capsys, option, message) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "traces"
    arguments = ["--model-dir", str(models["llama"]), "--prompts", str(prompts), "--out", str(out)]
    assert main(["trace", "export", *arguments, *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tq trace export: error: ")
    assert re.search(message, err)
    assert not out.exists()


def test_cli_rejects_a_missing_prompt_file_and_bad_syntax(models, tmp_path, capsys) -> None:
    arguments = ["--model-dir", str(models["llama"]), "--out", str(tmp_path / "out"), "--heads", "0"]
    assert (
        main(["trace", "export", *arguments, "--prompts", str(tmp_path / "absent.txt"), "--layers", "0"]) == 2
    )
    assert "prompt file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["trace", "export", *arguments, "--prompts", "p.txt", "--layers", "0,x"])
    assert exit_.value.code == 2
    assert "expected comma-separated integers, got '0,x'" in capsys.readouterr().err
