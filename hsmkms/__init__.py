"""hsmkms: a key management service whose root keys live in a PKCS#11 token."""

from __future__ import annotations

from hsmkms.errors import KMSError
from hsmkms.profiles import MechanismProfile

__all__ = ["KMSError", "MechanismProfile"]
__version__ = "0.1.0"
