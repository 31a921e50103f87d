"""Repairs of the tokenizers transformers converts from GGUF files (docs/design.md section 5).

- SmolLM2: the converted tokenizer adds ``<|im_start|>`` as a BOS token to every text and names
  it as the EOS token, while the GGUF says ``add_bos_token = false`` and EOS ``<|im_end|>`` (id
  2). The repaired tokenizer adds nothing, has EOS = pad = ``<|im_end|>``, and decodes with the
  plain byte-level decoder the GGUF's ``gpt2`` tokenizer model implies.
- Gemma 3: transformers converts the GGUF's SentencePiece vocabulary to a Unigram model, whose
  segmentation differs from Gemma's byte-fallback BPE ("The capital of France is" ->
  ``[2, 818, 505, 670, ...]`` instead of ``[2, 818, 5279, 529, 7001, 563]``). The tokenizer is
  rebuilt from the GGUF's tokens, scores and token types as byte-fallback BPE, the way
  transformers' ``GemmaConverter`` builds it from the SentencePiece model: merges ranked by the
  score of the merged piece, spaces normalized to ``▁``, control tokens special, user-defined
  tokens matched verbatim, ``<bos>`` added in front.
- Qwen2.5 (Qwen2.5-Coder-0.5B-Instruct): the converted tokenizer names ``<|endoftext|>`` (id
  151643) as EOS and unknown token, while the GGUF says EOS ``<|im_end|>`` (151645), padding
  ``<|endoftext|>`` and no BOS (``add_bos_token = false``); the chat template ends every turn with
  ``<|im_end|>``, so with the converted EOS generation would run past the end of the answer. It
  also registers only 3 of the GGUF's 22 control and user-defined tokens (``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``), so ``<|fim_prefix|>``, ``<tool_call>`` and the others were
  split into ordinary byte-level pieces. The repaired tokenizer keeps the converted vocabulary,
  merges, NFC normalizer, Qwen2 split regex, byte-level pre-tokenizer and chat template;
  registers every control and user-defined token of the GGUF (types 3 and 4; the 271 unused
  ``[PAD...]`` rows are left out), matched verbatim in any text, control tokens as special; adds
  no BOS; has EOS ``<|im_end|>``, pad ``<|endoftext|>`` and no BOS or unknown token; and decodes
  with the plain byte-level decoder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SMOLLM2_BOS = "<|im_start|>"
SMOLLM2_EOS = "<|im_end|>"
SMOLLM2_UNK = "<|endoftext|>"

QWEN2_EOS = "<|im_end|>"
QWEN2_PAD = "<|endoftext|>"

# GGUF token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4


def repair_smollm2(converted: Any) -> Any:
    """The SmolLM2 tokenizer, fixed: no BOS added, EOS and pad ``<|im_end|>``.

    Args:
        converted: the ``PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained(dir,
            gguf_file=...)`` returns for the SmolLM2 GGUF.

    Returns:
        A new ``PreTrainedTokenizerFast`` with the same vocabulary, merges, added tokens and
        chat template.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    backend.post_processor = None
    return _byte_level(backend, converted, SMOLLM2_BOS, SMOLLM2_EOS, SMOLLM2_EOS, SMOLLM2_UNK)


def _byte_level(backend: Any, converted: Any, bos: str | None, eos: str, pad: str, unk: str | None) -> Any:
    """A ``PreTrainedTokenizerFast`` of ``backend`` (a ``tokenizers.Tokenizer``) with the plain
    byte-level decoder, the given special tokens and the converted tokenizer's chat template."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        chat_template=converted.chat_template,
        clean_up_tokenization_spaces=False,
    )


def repair_qwen2(converted: Any, gguf_path: str | os.PathLike) -> Any:
    """The Qwen2.5 tokenizer, fixed: no BOS added, EOS ``<|im_end|>``, pad ``<|endoftext|>``, all
    of the GGUF's control and user-defined tokens registered (module docstring).

    Args:
        converted: the ``PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained(dir,
            gguf_file=...)`` returns for a Qwen2.5 GGUF.
        gguf_path: that GGUF file, for its token types.

    Returns:
        A new ``PreTrainedTokenizerFast`` with the same vocabulary, merges and chat template.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer

    fields = GGUFReader(Path(gguf_path)).fields
    tokens = _gguf_array(fields["tokenizer.ggml.tokens"])
    types = _gguf_array(fields["tokenizer.ggml.token_type"])
    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    backend.add_tokens(
        [
            AddedToken(token, normalized=False, special=kind == _CONTROL)
            for token, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
    )
    return _byte_level(backend, converted, None, QWEN2_EOS, QWEN2_PAD, None)


def _gguf_array(field: Any) -> list:
    """The items of a GGUF array field (strings decoded as UTF-8), without gguf's slow
    per-item ``contents()``."""
    items = [field.parts[index] for index in field.data]
    if field.types[-1].name == "STRING":
        return [bytes(item).decode("utf-8") for item in items]
    return [item.item() for item in items]


def _gguf_token(fields: Any, tokens: list[str], role: str) -> str:
    """The token the GGUF names for ``role`` (``"bos"``, ``"eos"``, ``"unknown"``, ``"padding"``)."""
    field = fields[f"tokenizer.ggml.{role}_token_id"]
    return tokens[int(field.parts[field.data[0]][0])]


def gemma3_tokenizer(gguf_path: str | os.PathLike) -> Any:
    """Gemma 3's tokenizer, rebuilt from a GGUF file as byte-fallback BPE (module docstring).

    Returns:
        A ``PreTrainedTokenizerFast`` that adds the BOS token (``<bos>``, id 2) in front of every
        text, with the BOS, EOS, unknown and padding tokens the GGUF names.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(Path(gguf_path)).fields
    tokens = _gguf_array(fields["tokenizer.ggml.tokens"])
    scores = _gguf_array(fields["tokenizer.ggml.scores"])
    types = _gguf_array(fields["tokenizer.ggml.token_type"])
    vocab = {token: index for index, token in enumerate(tokens)}
    bos, eos, unk, pad = (_gguf_token(fields, tokens, role) for role in ("bos", "eos", "unknown", "padding"))
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)))
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.add_tokens(
        [
            AddedToken(token, normalized=False, special=kind == _CONTROL)
            for token, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos}:1 $B:1",
        special_tokens=[(bos, vocab[bos])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
    )
