"""Errors of model preparation (``tq model prepare``)."""

from __future__ import annotations


class PrepareError(ValueError):
    """A bundle cannot be prepared from these inputs: unknown preset, missing or unusable model
    directory, a weights file whose checksum does not match, an output directory that is not a
    bundle."""


class DownloadError(PrepareError):
    """A wheel could not be downloaded (PyPI unreachable, or the package or version is gone)."""
