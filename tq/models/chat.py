"""A model's chat format: one user message wrapped in the model's own chat template.

Instruct models are trained on their chat format; fed raw text, SmolLM2-135M-Instruct mostly
answers ``<|im_end|>`` at once. The template comes from the model directory (an ONNX bundle or
a Hugging Face checkpoint, both :class:`~tq.models.bundle.TokenizerFiles`):
``chat_template.jinja``, or else the ``chat_template`` of ``tokenizer_config.json`` (older
checkpoints). It is rendered as Hugging Face tokenizers do (jinja2's sandbox, ``messages``,
``add_generation_prompt=True``, ``bos_token`` / ``eos_token`` from ``tokenizer_config.json``),
around one user message, and the text is encoded without the tokenizer's special tokens, except
the ones it puts in front of every text (a BOS) that the template does not write itself.

Prompt formats (:data:`PROMPT_FORMATS`): ``chat`` (the default; a model without a chat template
gets raw text, and :attr:`PromptFormat.format` says so) and ``raw`` (the text as it is, encoded
with the tokenizer's special tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

PROMPT_FORMATS = ("chat", "raw")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
_MARKER = "\x00TQ-USER-MESSAGE\x00"


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered around one user message, or a bad prompt format."""


def _tokenizer_config(files: Any) -> dict:
    path = files.path / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else {}


def chat_template(files: Any) -> str | None:
    """The chat template of a model directory (``files.path``): ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or the one named "default" of a
    list of named templates); None if it has none."""
    path = files.path / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = _tokenizer_config(files).get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def render_chat(files: Any) -> tuple[str, str] | None:
    """The model's chat format around one user message: (text before the message, text after
    it, ending with the assistant turn's header), or None for a model without a chat template.

    Raises:
        ChatTemplateError: the template raises, or does not place the user message exactly once.
    """
    template = chat_template(files)
    if template is None:
        return None
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    special: dict[str, str] = {}
    config = _tokenizer_config(files)
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        special[key] = value if isinstance(value, str) else ""

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"{files.path}: the chat template says: {message}")

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    text = environment.from_string(template).render(
        messages=[{"role": "user", "content": _MARKER}],
        add_generation_prompt=True,
        raise_exception=raise_exception,
        **special,
    )
    if text.count(_MARKER) != 1:
        raise ChatTemplateError(f"{files.path}: the chat template does not place the user message once")
    head, tail = text.split(_MARKER)
    return head, tail


class PromptFormat:
    """How prompts are given to one model: as one user turn of its chat format, or raw.

    Args:
        files: the model's files (:class:`~tq.models.bundle.ModelBundle` or
            :class:`~tq.models.checkpoint.Checkpoint`).
        prompt_format: ``"chat"`` (raw text for a model without a chat template) or ``"raw"``.

    Attributes:
        requested: the format asked for.
        format: the format used: ``"chat"`` only for a model with a chat template.
        head, tail: the chat text before and after the user message ("" when raw).
        lead_ids: the tokens the tokenizer puts in front of every text (a BOS), unless the
            template writes them.
        head_ids: the token ids before the message: ``lead_ids``, then the encoded ``head``.
    """

    def __init__(self, files: Any, prompt_format: str = "chat") -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise ChatTemplateError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.files = files
        self.requested = prompt_format
        chat = render_chat(files) if prompt_format == "chat" else None
        self.format = "raw" if chat is None else "chat"
        self.head, self.tail = chat if chat is not None else ("", "")
        # Tokens the tokenizer puts in front of every text (a BOS), unless the template writes them.
        prefix = list(files.encode(""))
        head_ids = self.encode_plain(self.head)
        if prefix and head_ids[: len(prefix)] == prefix:
            prefix = []
        self.lead_ids = prefix
        self.head_ids = prefix + head_ids

    @property
    def chat(self) -> bool:
        """Whether prompts are wrapped in the chat format."""
        return self.format == "chat"

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token added by the tokenizer."""
        return self.files.tokenizer().encode(text, add_special_tokens=False).ids if text else []

    def encode(self, message: str) -> list[int]:
        """Token ids of a prompt: chat: the tokens before the chat text (:attr:`head_ids`), then
        ``head + message + tail`` encoded as one text, ending with the assistant turn's header;
        raw: the tokenizer's encoding of ``message`` (with its special tokens)."""
        if not self.chat:
            return list(self.files.encode(message))
        return self.lead_ids + self.encode_plain(self.head + message + self.tail)

    def encode_all(self, messages: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each message."""
        return [self.encode(message) for message in messages]
