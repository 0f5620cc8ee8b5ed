"""Typed errors raised by hss-ee-hf.

Every error says what was wrong and what to do about it. They all derive from
[`HSSEEError`] so callers can catch the whole family at once.
"""

from __future__ import annotations


class HSSEEError(Exception):
    """Base class of every error raised by hss-ee-hf."""


class RingOverflowError(HSSEEError, ValueError):
    """A value is outside the fixed-point range the ring can carry exactly.

    Raised when encoding an activation whose magnitude exceeds the overflow budget, and when
    decoding a reconstructed value outside it (which is also what a garbage share looks like).
    """


class InvalidConfigError(HSSEEError, ValueError):
    """A parameter is outside what hss-ee-hf supports (the message says the allowed range)."""


class InvalidInputError(HSSEEError, ValueError):
    """An input the model cannot run on: an empty prompt, a zero-size batch, or a prompt past a context that cannot
    grow (learned position embeddings). The message says what was given and what to pass instead."""


class UnknownOptionError(HSSEEError, TypeError):
    """A keyword argument is neither an option of hss-ee-hf nor a field of the model's config (a misspelling, or an
    option of another version); the message lists the valid ones."""


class PartyOverlapError(HSSEEError, ValueError):
    """Party A and party B are one server (same address, same instance id, or an address in both pools)."""


class KeyMismatchError(HSSEEError, ValueError):
    """The EE key belongs to another checkpoint (their fingerprints differ)."""


class KeyFileError(HSSEEError, OSError):
    """The key file is missing, unreadable, malformed, or would be written somewhere unsafe."""


class InputFileError(HSSEEError, FileNotFoundError):
    """An input file the user named (an image, a prompt file) does not exist or cannot be read."""


class UnsupportedArchitectureError(HSSEEError, ValueError):
    """The model's architecture has no EE specification."""


class ConversionError(HSSEEError, RuntimeError):
    """Conversion failed (bad source, refused overwrite, or failed equivariance check)."""


class CheckpointError(HSSEEError, ValueError):
    """A checkpoint is not an EE checkpoint, or its `hss_ee` block is malformed or unsupported."""


class StageError(HSSEEError, ValueError):
    """A stage request is invalid: unknown stage, wrong shape, wrong byte length or fingerprint."""


class TransportError(HSSEEError, ConnectionError):
    """A share server could not be reached or answered with an error.

    Args:
        endpoint (`str`): the server that failed, e.g. `"127.0.0.1:50051"`.
        message (`str`): what went wrong and what to do.
    """

    def __init__(self, endpoint: str, message: str):
        self.endpoint = endpoint
        super().__init__(f"share server {endpoint}: {message}")


class StageRequestError(StageError):
    """A share server refused a request; `code` is the gRPC status name it maps to.

    Args:
        message (`str`): what was wrong.
        code (`str`, *optional*): `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `RESOURCE_EXHAUSTED` or
            `UNAUTHENTICATED`.
    """

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        self.code = code
        super().__init__(message)


class NativeKernelError(HSSEEError, RuntimeError):
    """The native ring kernel was asked for by name (`--kernel native`, `HSS_EE_KERNEL=native`) but could
    not be built or loaded; install a C compiler (gcc or clang) or use `--kernel auto`."""


class PushRefusedError(HSSEEError, ValueError):
    """A push was refused before anything was uploaded.

    Raised when the folder holds a secret key or something that looks like one, or a file that is not part of an
    EE checkpoint, or when the model card cannot be rendered from the given arguments.
    """


class HubUploadError(HSSEEError, OSError):
    """The Hub refused or could not receive the upload (network, permissions, offline mode)."""


class DevicePlacementError(HSSEEError, RuntimeError):
    """A server's stage weights do not fit the devices it was given (`hss-ee serve --device cuda`); the message says
    how many bytes were needed and available: add GPUs, free GPU memory, or serve on `--device cpu`."""


class ScheduleUnavailableError(HSSEEError, ValueError):
    """The client asked for a stages-per-layer schedule that a share server (or the model's family) does not offer."""
