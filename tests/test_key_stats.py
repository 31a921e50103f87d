"""Key statistics (tq.tasks.key_stats): the per-head offset share, channel RMS ratio and mean norm
against a direct NumPy oracle on constructed keys, bad input, and the per-layer record of the tiny
random Llama on windows of a stand-in corpus.

Tolerances: the oracle computes the same float64 sums in another order (loops per head, per
token), so results agree to 1e-12 relative; the constructed cases (offset + noise, exact zero
mean, one channel scaled by 50) are checked against their analytic values with margins far wider
than their sampling error (1000 tokens: the RMS of a standard normal channel is within about 5% of
1, so a ratio of 50 is within 10%). The model check compares with transformers' own eager run of
the same checkpoint: float32 caches, 1e-5 relative.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tq.data import corpus
from tq.tasks.key_stats import KeyStatsError, cached_keys_values, key_statistics, model_key_statistics

RTOL = 1e-12


def oracle(keys: np.ndarray) -> dict:
    """The statistics of [heads, tokens, dim] keys, head by head and token by token."""
    keys = np.asarray(keys, dtype=np.float64)
    heads, tokens, dim = keys.shape
    per_head, numerators, denominators, all_rms, all_norms = [], 0.0, 0.0, [], []
    for h in range(heads):
        mean = sum(keys[h, t] for t in range(tokens)) / tokens
        numerator = tokens * float(mean @ mean)
        denominator = sum(float(keys[h, t] @ keys[h, t]) for t in range(tokens))
        rms = np.array([np.sqrt(sum(keys[h, t, c] ** 2 for t in range(tokens)) / tokens) for c in range(dim)])
        norms = [float(np.sqrt(keys[h, t] @ keys[h, t])) for t in range(tokens)]
        per_head.append(
            {
                "share": numerator / denominator,
                "ratio": rms.max() / np.median(rms),
                "norm": sum(norms) / tokens,
                "max_channel": int(np.argmax(rms)),
            }
        )
        numerators += numerator
        denominators += denominator
        all_rms += list(rms)
        all_norms += norms
    pooled = {
        "share": numerators / denominators,
        "ratio": max(all_rms) / np.median(all_rms),
        "norm": sum(all_norms) / len(all_norms),
    }
    return {"pooled": pooled, "per_head": per_head}


def assert_matches_oracle(stats: dict, keys: np.ndarray) -> None:
    expected = oracle(keys)
    heads, tokens, dim = keys.shape
    assert (stats["heads"], stats["tokens"], stats["head_dim"]) == (heads, tokens, dim)
    assert stats["mean_energy_share"] == pytest.approx(expected["pooled"]["share"], rel=RTOL, abs=1e-15)
    assert stats["channel_rms_ratio"] == pytest.approx(expected["pooled"]["ratio"], rel=RTOL)
    assert stats["mean_norm"] == pytest.approx(expected["pooled"]["norm"], rel=RTOL)
    assert [head["head"] for head in stats["per_head"]] == list(range(heads))
    for head, want in zip(stats["per_head"], expected["per_head"], strict=True):
        assert head["mean_energy_share"] == pytest.approx(want["share"], rel=RTOL, abs=1e-15)
        assert head["channel_rms_ratio"] == pytest.approx(want["ratio"], rel=RTOL)
        assert head["mean_norm"] == pytest.approx(want["norm"], rel=RTOL)
        assert head["max_channel"] == want["max_channel"]


# --- key_statistics on constructed keys -------------------------------------------------------


def test_random_keys_match_the_oracle():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 50, 8)) * rng.uniform(0.5, 3.0, 8) + rng.standard_normal((3, 1, 8))
    stats = key_statistics(keys.astype(np.float32))
    assert_matches_oracle(stats, keys.astype(np.float32))
    json.dumps(stats, allow_nan=False)  # plain JSON: Python floats and ints, no NaN


def test_a_shared_offset_plus_small_noise_has_share_near_one():
    rng = np.random.default_rng(1)
    offset = rng.standard_normal((2, 1, 16)) * 10.0
    keys = offset + 0.01 * rng.standard_normal((2, 1000, 16))
    stats = key_statistics(keys)
    assert_matches_oracle(stats, keys)
    # Noise energy per token: 16 * 1e-4; offset energy: about 16 * 100.
    assert stats["mean_energy_share"] > 0.9999
    assert all(head["mean_energy_share"] > 0.9999 for head in stats["per_head"])
    assert stats["mean_norm"] == pytest.approx(np.linalg.norm(offset, axis=2).mean(), rel=1e-3)


def test_zero_mean_keys_have_share_near_zero():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2, 1000, 16))
    keys -= keys.mean(axis=1, keepdims=True)  # exactly centered per head
    stats = key_statistics(keys)
    assert_matches_oracle(stats, keys)
    assert stats["mean_energy_share"] < 1e-12
    assert all(head["mean_energy_share"] < 1e-12 for head in stats["per_head"])


def test_a_channel_scaled_by_50_gives_an_rms_ratio_near_50():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2, 1000, 16))
    keys[:, :, 5] *= 50.0
    stats = key_statistics(keys)
    assert_matches_oracle(stats, keys)
    for head in stats["per_head"]:
        assert head["channel_rms_ratio"] == pytest.approx(50.0, rel=0.1)
        assert head["max_channel"] == 5
    assert stats["channel_rms_ratio"] == pytest.approx(50.0, rel=0.1)
    # Unscaled channels: ratio near 1; the offset share of zero-mean noise stays small.
    plain = key_statistics(rng.standard_normal((1, 1000, 16)))
    assert plain["channel_rms_ratio"] == pytest.approx(1.0, abs=0.15)
    assert plain["mean_energy_share"] < 0.01


def test_pooling_weights_heads_by_their_energy():
    # Head 0: pure offset (share 1, energy 4 * 100 per token); head 1: centered (share 0, energy 4).
    offset = np.full((1, 100, 4), 10.0)
    centered = np.tile([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]], (50, 1))[None]
    stats = key_statistics(np.concatenate([offset, centered]))
    assert [head["mean_energy_share"] for head in stats["per_head"]] == pytest.approx([1.0, 0.0])
    assert stats["mean_energy_share"] == pytest.approx(400 / 404)
    assert stats["mean_norm"] == pytest.approx((20.0 + 2.0) / 2)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (np.zeros((4, 8)), "kv_heads, tokens, head_dim"),
        (np.zeros((1, 2, 4, 8)), "kv_heads, tokens, head_dim"),
        (np.zeros((2, 0, 8)), "empty"),
        (np.full((1, 2, 3), np.nan), "NaN"),
        (np.full((1, 2, 3), np.inf), "NaN or infinity"),
        (np.zeros((1, 2, 3), dtype=complex), "real numbers"),
        (np.zeros((1, 2, 3), dtype=bool), "real numbers"),
    ],
)
def test_bad_keys_are_refused(keys, message):
    with pytest.raises(KeyStatsError, match=message):
        key_statistics(keys)


def test_all_zero_keys_have_no_share_and_no_ratio():
    stats = key_statistics(np.zeros((1, 3, 4), dtype=np.float32))
    assert stats["mean_energy_share"] is None and stats["channel_rms_ratio"] is None
    assert stats["mean_norm"] == 0.0
    assert stats["per_head"][0]["mean_energy_share"] is None


# --- model_key_statistics on the tiny random Llama ---------------------------------------------

# Stand-in articles: long enough for a few 32-token windows each with the tiny byte-level BPE.
FAKE_ARTICLES = [
    (
        f"Article {n}",
        " ".join(f"Sentence {i} of article {n} says something about keys and values." for i in range(20)),
    )
    for n in range(3)
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tq.models.tiny import build_tiny

    return build_tiny("tiny-llama", tmp_path_factory.mktemp("key-stats") / "tiny-llama")


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """A corpus cache under tmp_path holding FAKE_ARTICLES (no wheel download)."""
    monkeypatch.setattr(corpus, "wikipedia_articles", lambda cache=None: list(FAKE_ARTICLES))
    return tmp_path


def eager_cache(model_dir, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, keys and values [kv_heads, windows * tokens, head_dim] from transformers' own
    eager run (eager attention, not the default SDPA)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    runs = []
    for row in ids:
        with torch.inference_mode():
            cache = model(torch.tensor(row[None]), use_cache=True).past_key_values
        runs.append([(layer.keys[0].numpy(), layer.values[0].numpy()) for layer in cache.layers])
    return [
        tuple(np.concatenate([run[layer][part] for run in runs], axis=1) for part in (0, 1))
        for layer in range(len(runs[0]))
    ]


def test_the_record_has_one_entry_per_layer_from_corpus_windows(tiny_llama, fake_corpus):
    from tq.models.checkpoint import Checkpoint

    record = model_key_statistics(tiny_llama, windows=3, window=32, sample_seed=5, cache=fake_corpus)
    json.dumps(record, allow_nan=False)
    assert record["schema"] == "tq.key_stats/1" and record["model"] == "tiny-llama"
    assert (record["windows"], record["window"], record["sample_seed"]) == (3, 32, 5)
    # The windows are the corpus helpers' windows with the checkpoint's tokenizer.
    ids, drawn = corpus.draw_windows(Checkpoint.load(tiny_llama).encode, 3, 32, 5, fake_corpus)
    assert record["text_windows"] == [
        {"article": w.article, "title": w.title, "offset": w.offset} for w in drawn
    ]
    assert record["num_layers"] == 2 and [entry["layer"] for entry in record["layers"]] == [0, 1]
    expected = eager_cache(tiny_llama, ids)
    for entry, (keys, values) in zip(record["layers"], expected, strict=True):
        for part, array in (("key", keys), ("value", values)):
            stats = entry[part]
            assert (stats["heads"], stats["tokens"], stats["head_dim"]) == (2, 96, 16)
            assert 0.0 <= stats["mean_energy_share"] <= 1.0 and stats["channel_rms_ratio"] >= 1.0
            assert len(stats["per_head"]) == 2
            for head in stats["per_head"]:
                assert 0.0 <= head["mean_energy_share"] <= 1.0 and head["channel_rms_ratio"] >= 1.0
            reference = key_statistics(array)
            for name in ("mean_energy_share", "channel_rms_ratio", "mean_norm"):
                assert stats[name] == pytest.approx(reference[name], rel=1e-5)


def test_given_token_ids_run_without_the_corpus(tiny_llama):
    ids = np.arange(40, dtype=np.int64).reshape(2, 20) + 3
    record = model_key_statistics(tiny_llama, token_ids=ids, model_name="tiny")
    assert record["model"] == "tiny" and record["text_windows"] is None and record["sample_seed"] is None
    assert (record["windows"], record["window"]) == (2, 20)
    layers = cached_keys_values(tiny_llama, ids)
    assert [k.shape for k, _ in layers] == [(2, 40, 16)] * 2
    # Window 1's tokens follow window 0's: the first 20 are window 0 run alone.
    (alone, _), _ = cached_keys_values(tiny_llama, ids[:1])
    np.testing.assert_array_equal(layers[0][0][:, :20], alone)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.arange(5), "int \\[windows, tokens\\]"),
        (np.zeros((1, 0), dtype=np.int64), "int \\[windows, tokens\\]"),
        (np.zeros((1, 4)), "int \\[windows, tokens\\]"),
        (np.full((1, 4), 10**6), "token ids must be in"),
        (np.full((1, 4), -1), "token ids must be in"),
        (np.zeros((1, 4096), dtype=np.int64), "exceed the model's 2048 positions"),
    ],
)
def test_bad_token_ids_are_refused(tiny_llama, ids, message):
    with pytest.raises(KeyStatsError, match=message):
        model_key_statistics(tiny_llama, token_ids=ids)
