"""Named cache settings: the KV-cache configurations serving stacks ship, by name.

A preset is a ``kv_caches`` entry of the sweep config (and a ``--cache-preset`` of ``tq bench``)
written out in tq's own fields, so that ``{preset: vllm-4bit_nc}`` and the same fields spelt
by hand compute the same thing (the sweep check refuses listing both).

vLLM's four TurboQuant settings (``--kv-cache-dtype turboquant_*``), as its documentation
describes what each stores:

- keys: Lloyd-Max codes after a Hadamard rotation with a float16 vector norm and norm
  correction (the reconstruction rescaled to the stored norm: ``renormalize``), or FP8 E4M3
  without rotation (``k8v4``; vLLM scales by one factor per layer, here one per head fixed
  from the prefill, ``fp8_scale: head``);
- values: uniform codes with a float16 scale and zero point per vector (``group_size`` 256:
  one group per vector for every head size up to 256);
- the first and last two layers kept unquantized (vLLM's boundary protection for dense models).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# One group of scale and zero point per vector for any head_dim up to this many channels.
PER_VECTOR_GROUP = 256

_VLLM_COMMON: dict[str, Any] = {
    "value_strategy": "uniform",
    "group_size": PER_VECTOR_GROUP,
    "exact_first_layers": 2,
    "exact_last_layers": 2,
}
_VLLM_MSE_KEYS: dict[str, Any] = {
    "key_strategy": "mse",
    "rotation": "hadamard",
    "renormalize": True,
    "norm_dtype": "float16",
}

CACHE_PRESETS: dict[str, dict[str, Any]] = {
    "vllm-k8v4": {
        "key_bits": 8, "key_strategy": "fp8", "fp8_scale": "head", "value_bits": 4, **_VLLM_COMMON,
    },
    "vllm-4bit_nc": {"key_bits": 4, **_VLLM_MSE_KEYS, "value_bits": 4, **_VLLM_COMMON},
    "vllm-k3v4_nc": {"key_bits": 3, **_VLLM_MSE_KEYS, "value_bits": 4, **_VLLM_COMMON},
    "vllm-3bit_nc": {"key_bits": 3, **_VLLM_MSE_KEYS, "value_bits": 3, **_VLLM_COMMON},
}  # fmt: skip


class CachePresetError(ValueError):
    """An unknown preset name."""


def expand_preset(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A ``kv_caches`` entry with its ``preset`` (if any) written out: the preset's fields, then
    the entry's own fields over them (``{preset: vllm-k8v4, center_keys: true}``).

    Raises:
        CachePresetError: the preset is not one of :data:`CACHE_PRESETS` (the message lists them).
    """
    if "preset" not in entry:
        return dict(entry)
    name = entry["preset"]
    if name not in CACHE_PRESETS:
        raise CachePresetError(f"unknown cache preset {name!r} (known: {', '.join(CACHE_PRESETS)})")
    own = {key: value for key, value in entry.items() if key != "preset"}
    return {**CACHE_PRESETS[name], **own}
