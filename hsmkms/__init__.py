"""hsmkms: a key management service whose root keys live in a PKCS#11 token."""

from __future__ import annotations

from hsmkms.errors import KMSError
from hsmkms.keystore.config import KeystoreConfig
from hsmkms.profiles import MechanismProfile

__all__ = ["KMSError", "KeystoreConfig", "MechanismProfile", "__version__"]
__version__ = "0.1.0"
