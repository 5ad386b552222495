"""Typed errors of quantsr.

Every error a user can cause derives from :class:`QuantSRError`; the command line turns it into a
one-line message on stderr and exit code 1 (``QUANTSR_DEBUG=1`` adds the traceback). Messages name
the file (or option) and what is wrong, e.g. ``"weights.pth: missing keys body.0.conv1.weight"``.
"""

from __future__ import annotations

from pathlib import Path


class QuantSRError(Exception):
    """Base class of all user-facing errors (exit code 1)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(QuantSRError):
    """A bad option value, preset or config file (unknown key, wrong type, out of range)."""


class CheckpointError(QuantSRError):
    """A model file that cannot be read or does not fit: corrupt, truncated, wrong arch/scale/keys."""


class FormatVersionError(CheckpointError):
    """A safetensors file written by a newer (unknown) format version."""


class ImageError(QuantSRError):
    """An image that cannot be read or written (empty, truncated, unsupported, too large)."""


class DatasetError(QuantSRError):
    """A dataset folder that is missing or inconsistent (HR/LR count or size mismatch)."""


class BackendUnavailableError(QuantSRError):
    """A requested compute backend cannot run here (e.g. ``cupy`` without CUDA or cupy)."""


class NumericError(QuantSRError):
    """NaN or Inf where numbers are needed: in a model's tensors or output, or in an option."""
