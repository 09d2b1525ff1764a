"""Client-side envelope encryption of files and streams.

A file is encrypted under a fresh data key from GenerateDataKey (KMS never sees the data),
as segmented AES-256-GCM in constant memory; the header carries the KMS-encrypted data key.
The format is specified in :mod:`hsmkms.envelope.format` and ``docs/envelope-format.md``.

::

    client = EnvelopeClient(ServiceProvider(service))        # or Boto3Provider(boto3 client)
    client.encrypt_file("report.pdf", "report.pdf.hkms", "alias/reports", {"dept": "x"})
    client.decrypt_file("report.pdf.hkms", "report.pdf", {"dept": "x"})
    client.rewrap_file("report.pdf.hkms", "alias/reports-2027")
"""

from __future__ import annotations

from hsmkms.envelope.cache import CacheStats, DataKeyCache
from hsmkms.envelope.client import EnvelopeClient, EnvelopeInfo
from hsmkms.envelope.errors import DecryptionFailed
from hsmkms.envelope.files import atomic_output
from hsmkms.envelope.format import DEFAULT_SEGMENT_SIZE, EnvelopeHeader
from hsmkms.envelope.providers import (
    Boto3Provider,
    DataKey,
    DataKeyProvider,
    ServiceProvider,
    WrappedKey,
)
from hsmkms.envelope.stream import decrypt_stream, encrypt_stream

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "Boto3Provider",
    "CacheStats",
    "DataKey",
    "DataKeyCache",
    "DataKeyProvider",
    "DecryptionFailed",
    "EnvelopeClient",
    "EnvelopeHeader",
    "EnvelopeInfo",
    "ServiceProvider",
    "WrappedKey",
    "atomic_output",
    "decrypt_stream",
    "encrypt_stream",
]
