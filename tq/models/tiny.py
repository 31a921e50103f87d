"""Tiny random models built in code (presets ``tiny-llama`` and ``tiny-gpt2``), for tests and
quick runs: no download, a few seconds to prepare.

Each is a Hugging Face checkpoint directory (config, safetensors weights, tokenizer), the same
kind of input as ``tq model prepare --model-dir``. Everything is deterministic given the seed:
the tokenizer is a byte-level BPE trained on a fixed text (any text encodes, no unknown tokens),
and the weights are drawn after ``torch.manual_seed(seed)``.

Weights are drawn with a large standard deviation (``INIT_STD``), so that attention is peaked,
not uniform, and quantizing the KV cache changes the logits measurably.
"""

from __future__ import annotations

from pathlib import Path

from tq.models.errors import PrepareError

INIT_STD = 0.5
VOCAB_SIZE = 512
HIDDEN = 64
LAYERS = 2
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
LLAMA_KV_HEADS = 2
MAX_POSITIONS = 2048
# Special tokens, with the ids they get (trained first, in this order).
END_OF_TEXT = "<|endoftext|>"  # id 0: GPT-2's BOS/EOS, the unknown token elsewhere
IM_START = "<|im_start|>"  # id 1
IM_END = "<|im_end|>"  # id 2: tiny-llama's EOS, as in SmolLM2
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A cache holds the keys and the values of every token
that came before, so that each new token attends to all of them without recomputing the past.
Queries attend to keys and read the values; the attention weights are a softmax of scaled dot
products. Rotary embeddings turn keys and queries by an angle that grows with the position.
Quantization stores each vector with a few bits per coordinate: a random rotation spreads the
energy evenly, and a scalar codebook, solved for the density of one rotated coordinate, rounds
every coordinate to its nearest centroid. The norm is stored apart. Small random models are
enough to test the plumbing of an export, a decode loop and a benchmark, in seconds, on any
laptop. The capital of France is Paris; the capital of Italy is Rome. In 2024 there were 366
days, 12 months and 52 weeks. Numbers such as 3.14159, 2.71828 and 1.41421 appear in texts too.
"""

TINY_MODELS = ("tiny-llama", "tiny-gpt2")


def tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``VOCAB_SIZE`` tokens, trained on
    ``TRAINING_TEXT``; special tokens as in ``SPECIAL_TOKENS``; no BOS is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=END_OF_TEXT)


def _llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=LLAMA_KV_HEADS,
        num_hidden_layers=LAYERS,
        intermediate_size=2 * HIDDEN,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_STD,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index(IM_END),
        pad_token_id=SPECIAL_TOKENS.index(IM_END),
    )
    return LlamaForCausalLM(config), IM_END


def _gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    end_of_text = SPECIAL_TOKENS.index(END_OF_TEXT)
    config = GPT2Config(
        n_embd=HIDDEN,
        n_head=HEADS,
        n_layer=LAYERS,
        n_positions=MAX_POSITIONS,
        vocab_size=vocab_size,
        initializer_range=INIT_STD,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
    )
    return GPT2LMHeadModel(config), END_OF_TEXT


def build_tiny(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model ``name`` (one of ``TINY_MODELS``) into the directory ``path``.

    tiny-llama: 2 layers, 4 query heads, 2 KV heads (grouped-query attention), head_dim 16, EOS
    ``<|im_end|>`` (id 2). tiny-gpt2: 2 layers, 4 heads, head_dim 16, BOS = EOS =
    ``<|endoftext|>`` (id 0). Both: hidden size 64, vocabulary ``VOCAB_SIZE``, float32.

    Returns:
        ``path``, holding ``config.json``, ``generation_config.json``, ``model.safetensors`` and
        the tokenizer files.
    """
    import torch

    builders = {"tiny-llama": _llama, "tiny-gpt2": _gpt2}
    if name not in builders:
        raise PrepareError(f"unknown tiny model {name!r} (known: {', '.join(TINY_MODELS)})")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model, eos = builders[name](len(tokenizer))
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
