"""``Checkpoint``: a local Hugging Face checkpoint directory, for the transformers engine.

A checkpoint is what ``save_pretrained`` writes: ``config.json``, the weights (``*.safetensors``
or ``pytorch_model*.bin``, possibly sharded) and the tokenizer. tq reads the tokenizer from
``tokenizer.json`` (the fast tokenizer every current checkpoint ships), so that a checkpoint and
an ONNX bundle of the same model encode text identically; the end-of-sequence tokens come from
``generation_config.json`` or ``config.json``. :func:`checkpoint_problem` checks the files
without importing torch (the workflow runs it when it starts); :meth:`Checkpoint.load` also
reads the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tq.models.bundle import CONFIG_JSON, GENERATION_CONFIG_JSON, TOKENIZER_JSON, TokenizerFiles
from tq.models.presets import ModelGeometry

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class CheckpointError(ValueError):
    """A directory is not a usable Hugging Face checkpoint: missing, no config, no weights, no
    ``tokenizer.json``, or an unreadable config."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes ``path`` unusable as a checkpoint (a sentence), or None if its files are there."""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: no such directory"
    missing = [name for name in (CONFIG_JSON, TOKENIZER_JSON) if not (path / name).is_file()]
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (" + " or ".join(WEIGHT_PATTERNS) + ")")
    if missing:
        return f"{path}: not a Hugging Face checkpoint, missing {', '.join(missing)}"
    return None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _eos_token_ids(path: Path, config: dict) -> tuple[int, ...]:
    """``eos_token_id`` (an int or a list) of the generation config, else of the model config
    (or its ``text_config``); empty if none states one."""
    generation = path / GENERATION_CONFIG_JSON
    scopes = [_read_json(generation)] if generation.is_file() else []
    scopes += [config, config.get("text_config") or {}]
    for scope in scopes:
        eos = scope.get("eos_token_id")
        if eos is not None:
            return tuple(int(token) for token in (eos if isinstance(eos, list) else [eos]))
    return ()


@dataclass(frozen=True)
class Checkpoint(TokenizerFiles):
    """A checked Hugging Face checkpoint directory. Build it with :meth:`load`.

    Attributes:
        path: the directory (absolute).
        name: the model's name in records (default: the directory's name).
        config: the parsed ``config.json``.
        eos_token_ids: the tokens that end generation.
    """

    path: Path
    name: str
    config: dict
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> Checkpoint:
        """Check the files of ``path`` (:func:`checkpoint_problem`) and read its config.

        Raises:
            CheckpointError: naming what is missing or unreadable.
        """
        path = Path(path).absolute()
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(problem)
        config = _read_json(path / CONFIG_JSON)
        return cls(
            path=path, name=name or path.name, config=config, eos_token_ids=_eos_token_ids(path, config)
        )

    @property
    def num_layers(self) -> int:
        """The decoder's layers (``num_hidden_layers``, also under ``text_config``)."""
        for scope in (self.config, self.config.get("text_config") or {}):
            layers = scope.get("num_hidden_layers", scope.get("n_layer"))
            if isinstance(layers, int) and layers > 0:
                return layers
        raise CheckpointError(f"{self.path / CONFIG_JSON}: states no num_hidden_layers")

    @property
    def geometry(self) -> ModelGeometry:
        """The cache shape from ``config.json`` (Llama-style names, GPT-2's, or under
        ``text_config``): layers, KV heads (``num_key_value_heads``, else the attention heads)
        and head_dim (``head_dim``, else hidden size / attention heads)."""
        for scope in (self.config, self.config.get("text_config") or {}):
            heads = scope.get("num_attention_heads", scope.get("n_head"))
            hidden = scope.get("hidden_size", scope.get("n_embd"))
            if isinstance(heads, int) and heads > 0:
                kv_heads = scope.get("num_key_value_heads") or heads
                head_dim = scope.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
                if isinstance(head_dim, int):
                    return ModelGeometry(self.num_layers, int(kv_heads), head_dim)
        raise CheckpointError(f"{self.path / CONFIG_JSON}: states no attention heads and head size")
