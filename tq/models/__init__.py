"""Real models: presets, weight provisioning, GGUF to Hugging Face conversion, ONNX export, and
``ModelBundle``, the prepared directory the decode loop runs (docs/design.md sections 4 and 5)."""

from tq.models.bundle import BundleError, ModelBundle
from tq.models.errors import DownloadError, PrepareError
from tq.models.prepare import default_bundle_dir, prepare_bundle
from tq.models.presets import DEFAULT_PRESET, PRESETS

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "BundleError",
    "DownloadError",
    "ModelBundle",
    "PrepareError",
    "default_bundle_dir",
    "prepare_bundle",
]
