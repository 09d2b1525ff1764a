"""Errors of the envelope layer.

::

    InvalidCiphertextException (hsmkms.errors)
    └── DecryptionFailed      every failure to open an envelope: a malformed or modified
                              header or payload, truncation, extension, the wrong data key,
                              the wrong encryption context. One fixed message, no detail.

Usage errors (a bad segment size, an oversize encryption context) are
:class:`~hsmkms.errors.ValidationException`; KMS errors (key not found, disabled, access
denied, unreachable endpoint) keep their own :mod:`hsmkms.errors` class.
"""

from __future__ import annotations

from typing import Final

from hsmkms.errors import InvalidCiphertextException

__all__ = ["DECRYPTION_FAILED_MESSAGE", "DecryptionFailed"]

DECRYPTION_FAILED_MESSAGE: Final = (
    "decryption failed: not an hsmkms envelope, modified or truncated, "
    "or the wrong key or encryption context"
)


class DecryptionFailed(InvalidCiphertextException):
    """The envelope cannot be opened. Every cause looks the same to the caller, on purpose
    (the message is fixed and names all the possible causes)."""

    def __init__(self, message: str = "") -> None:
        super().__init__()
        self.message = DECRYPTION_FAILED_MESSAGE
        self.args = (DECRYPTION_FAILED_MESSAGE,)
