"""Keystore errors. (python-pkcs11's exceptions are mapped to them in one place,
:mod:`hsmkms.keystore.pkcs11_errors`, which only the PKCS#11 backend imports: this module does
not load ``pkcs11``.)

::

    KeystoreError (hsmkms.errors.ServerError)
    ├── ModuleLoadError          the PKCS#11 module is missing or not loadable
    ├── TokenConfigError         the module cannot read its configuration (softhsm2.conf)
    ├── TokenNotFound            no token matches the label / serial / slot
    ├── MultipleTokens           several tokens match; say which one
    ├── LoginFailed              login failed for another reason
    │   ├── PinIncorrect         wrong PIN
    │   └── PinLocked            the PIN is locked (too many wrong attempts)
    ├── TokenUnavailable         the device, token or session went away (reconnect is attempted
    │                            first): 503 with the PKCS#11 reason (``shows_cause``)
    ├── KeyMaterialMissing       the token object of a key version is not on the token
    │   └── WrappedMaterialInvalid  wrapped key material does not unwrap under its KEK
    ├── UnknownKeyStore          a key material reference names a key store not registered
    ├── IncompatibleMaterial     the operation does not apply to the referenced material
    ├── DecryptionFailed         authentication failed: wrong key, AAD, IV or ciphertext
    ├── TokenRejected            the token refused the input or the template
    │   └── MaterialRejected     unwrapped key material does not fit its key spec
    ├── UnsupportedByToken       the mechanism or function is not offered by this token
    └── DeviceFailure            any other device or module fault
"""

from __future__ import annotations

from hsmkms.errors import KeyUnavailableException, ServerError


class KeystoreError(ServerError):
    """A failure in the PKCS#11 layer. The caller of the KMS API sees no detail."""


class ModuleLoadError(KeystoreError):
    """The PKCS#11 module file is missing or is not a loadable PKCS#11 library."""


class TokenConfigError(KeystoreError):
    """The module cannot read its own configuration (for SoftHSM2: softhsm2.conf)."""


class TokenNotFound(KeystoreError):
    """No token matches the configured label, serial or slot."""


class MultipleTokens(KeystoreError):
    """Several tokens match; configure a serial or slot id."""


class LoginFailed(KeystoreError):
    """Login to the token failed."""


class PinIncorrect(LoginFailed):
    """The PIN is wrong."""


class PinLocked(LoginFailed):
    """The PIN is locked after too many wrong attempts."""


class TokenUnavailable(KeystoreError):
    """The device, token or session went away; retryable. ``detail`` names the PKCS#11 reason
    (``CKR_DEVICE_REMOVED while encrypting``, ``no token matches label=hsmkms``) and is shown
    to the caller: answered 503 ``KeyUnavailableException`` within the reconnect window,
    never after waiting for the token (``docs/operations-faults.md``)."""

    code = KeyUnavailableException.code
    status = 503
    shows_cause = True

    def __init__(self, detail: str) -> None:
        super().__init__(f"The HSM token is unavailable ({detail}). Retry later.")
        self.detail = detail

    def __reduce__(self) -> tuple[type[TokenUnavailable], tuple[str]]:
        return (type(self), (self.detail,))


class KeyMaterialMissing(KeystoreError):
    """A key version's token object is not on the token."""

    code = KeyUnavailableException.code


class WrappedMaterialInvalid(KeyMaterialMissing):
    """Wrapped key material (``HSMKMS_KEY_PLACEMENT=wrapped``) does not unwrap under the KEK
    its reference names: the wrapped bytes were changed, or name another KEK."""


class UnknownKeyStore(KeystoreError):
    """A key material reference names a key store that is not registered in this process."""

    code = KeyUnavailableException.code


class IncompatibleMaterial(KeystoreError):
    """The operation does not apply to the referenced material (encrypting with an HMAC key,
    signing with an AES key): a programming error above the keystore, never a token fault."""


class DecryptionFailed(KeystoreError):
    """Authentication of a ciphertext failed. Deliberately says nothing more."""


class TokenRejected(KeystoreError):
    """The token rejected the input, parameters or template."""


class MaterialRejected(TokenRejected):
    """Key material unwrapped for import does not fit the key spec (length, key type, curve,
    a private key that does not match its public key). Says nothing about the material."""


class UnsupportedByToken(KeystoreError):
    """The token does not offer the mechanism or function."""


class DeviceFailure(KeystoreError):
    """Any other fault of the device or module."""
