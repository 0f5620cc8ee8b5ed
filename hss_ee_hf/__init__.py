"""hss-ee-hf: private inference for Hugging Face transformers on two untrusted share servers.

Public API (everything else is private by name):

* [`convert`]: turn a checkpoint into an EE checkpoint and a secret key.
* [`EEKey`], [`RingConfig`], [`HSSEECheckpointInfo`]: the artifacts' data types.
* the typed errors in `hss_ee_hf.errors`.
"""

from __future__ import annotations

from .checkpoint import HSSEECheckpointInfo
from .errors import (
    CheckpointError,
    ConversionError,
    HSSEEError,
    KeyFileError,
    KeyMismatchError,
    RingOverflowError,
    StageError,
    TransportError,
    UnsupportedArchitectureError,
)
from .key import EEKey
from .ring import RingConfig

__version__ = "0.1.0"


def convert(*args, **kwargs):
    """Converts a model into an EE checkpoint; see `hss_ee_conversion.convert` for the arguments."""
    from hss_ee_conversion import convert as _convert

    return _convert(*args, **kwargs)


__all__ = [
    "CheckpointError",
    "ConversionError",
    "EEKey",
    "HSSEECheckpointInfo",
    "HSSEEError",
    "KeyFileError",
    "KeyMismatchError",
    "RingConfig",
    "RingOverflowError",
    "StageError",
    "TransportError",
    "UnsupportedArchitectureError",
    "__version__",
    "convert",
]
