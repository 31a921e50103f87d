"""Tiny random Hugging Face models with a tokenizer trained in code, saved to a directory.

No weights are downloaded: each builder seeds torch, builds a model from a small config, trains a
word-level tokenizer on a few sentences and saves both with ``save_pretrained``, in well under a
second.
Weights are drawn with a large standard deviation (``INIT_STD``), so that attention logits are
O(1) to O(10) and attention is peaked, not uniform: a test that reconstructs attention outputs
can then tell one query head or position from another.
"""

from __future__ import annotations

from pathlib import Path

INIT_STD = 0.5

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a cache holds the keys and the values of every token",
    "queries attend to keys and read the values",
    "rotary embeddings turn keys by an angle that grows with the position",
    "small random models are enough to test the plumbing",
]


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (whitespace split, unknown words -> ``<unk>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with grouped-query attention: 4 query heads, 2 KV heads, head_dim 16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=256,
        initializer_range=INIT_STD,
    )
    return _save(LlamaForCausalLM(config), tokenizer, path)


def tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (no RoPE, fused c_attn): 4 heads, head_dim 16, 64 positions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64,
        n_head=4,
        n_layer=2,
        n_positions=64,
        vocab_size=tokenizer.vocab_size,
        initializer_range=INIT_STD,
    )
    return _save(GPT2LMHeadModel(config), tokenizer, path)


def tiny_gemma3(path: Path, seed: int = 0, sliding_window: int = 8) -> Path:
    """A 2-layer Gemma 3 (layer 0 sliding-window, layer 1 global): 4 query heads, 1 KV head,
    head_dim 16, query/key norms, attention scale query_pre_attn_scalar**-0.5 = 1/8, not 1/4."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=256,
        query_pre_attn_scalar=64,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        initializer_range=INIT_STD,
    )
    return _save(Gemma3ForCausalLM(config), tokenizer, path)


def tiny_bundle(base: Path, preset: str) -> Path:
    """The bundle of the tiny preset ``preset`` (``tiny-llama``, ``tiny-gpt2``) under
    ``base/tiny-bundles``: prepared on first use, reused after (``prepare_bundle`` is idempotent).
    Shared by tests: copy it before changing it."""
    from tq.models.prepare import prepare_bundle

    return prepare_bundle(preset, out=base / "tiny-bundles" / preset)
