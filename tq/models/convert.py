"""Load a model's float32 weights and its (repaired) tokenizer: from a GGUF file (dequantized by
transformers) or from a Hugging Face checkpoint directory; save the Hugging Face files of a
bundle (config, generation config, tokenizer files, chat template).

torch and transformers are imported inside the functions, so ``import tq`` never needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tq.models.errors import PrepareError
from tq.models.tokenizer_repair import gemma3_tokenizer, repair_qwen2, repair_smollm2

TOKENIZER_FIXES = ("smollm2", "gemma3", "qwen2")


def gguf_tokenizer(gguf_path: str | Path, tokenizer_fix: str | None) -> Any:
    """The tokenizer of a GGUF file as transformers converts it, repaired as ``tokenizer_fix``
    says (one of :data:`TOKENIZER_FIXES`, ``tq.models.tokenizer_repair``; None: as converted).

    Returns:
        A ``PreTrainedTokenizerFast``.

    Raises:
        PrepareError: an unknown ``tokenizer_fix``.
    """
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    if tokenizer_fix not in (None, *TOKENIZER_FIXES):
        raise PrepareError(f"unknown tokenizer fix {tokenizer_fix!r} (known: {', '.join(TOKENIZER_FIXES)})")
    if tokenizer_fix == "gemma3":
        return gemma3_tokenizer(gguf_path)
    converted = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    if tokenizer_fix == "smollm2":
        return repair_smollm2(converted)
    if tokenizer_fix == "qwen2":
        return repair_qwen2(converted, gguf_path)
    return converted


def load_gguf(gguf_path: str | Path, tokenizer_fix: str | None) -> tuple[Any, Any]:
    """Dequantize a GGUF file to a float32 ``PreTrainedModel`` (eval mode) and build its
    tokenizer, repaired as ``tokenizer_fix`` says (``tq.models.tokenizer_repair``).

    The model's config and generation config take their EOS and pad ids from the repaired
    tokenizer.

    Returns:
        ``(model, tokenizer)``; the tokenizer is a ``PreTrainedTokenizerFast``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    tokenizer = gguf_tokenizer(gguf_path, tokenizer_fix)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_model_dir(model_dir: str | Path) -> tuple[Any, Any]:
    """Load a Hugging Face checkpoint directory as a float32 causal LM (eval mode) and its fast
    tokenizer, from local files only.

    Raises:
        PrepareError: the directory is missing, has no ``config.json``, or transformers cannot
            load a causal LM or a fast tokenizer from it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PrepareError(f"{model_dir}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise PrepareError(f"{model_dir}: cannot load a causal LM and its tokenizer ({error})") from None
    if not tokenizer.is_fast:
        raise PrepareError(f"{model_dir}: the tokenizer has no fast version (tokenizer.json)")
    return model.eval(), tokenizer


def eos_token_ids(model: Any) -> list[int]:
    """The token ids that end generation: the generation config's ``eos_token_id`` (an int or a
    list), else the model config's; ``[]`` if neither has one."""
    for config in (model.generation_config, model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return [int(token) for token in (eos if isinstance(eos, list | tuple) else [eos])]
    return []


def save_hf_files(model: Any, tokenizer: Any, dest: str | Path) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, and
    ``chat_template.jinja`` if the tokenizer has a chat template) into ``dest``."""
    model.config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
