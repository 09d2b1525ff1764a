"""The one place where python-pkcs11 exceptions are mapped to keystore errors, and the lists of
python-pkcs11 exceptions the PKCS#11 backend retries on. Imported only by the PKCS#11 backend
(:mod:`hsmkms.keystore.pkcs11`): everything else sees :mod:`hsmkms.keystore.errors`.
"""

from __future__ import annotations

import re

import pkcs11.exceptions as p11e

from hsmkms.keystore.errors import (
    DecryptionFailed,
    DeviceFailure,
    KeyMaterialMissing,
    KeystoreError,
    LoginFailed,
    MultipleTokens,
    PinIncorrect,
    PinLocked,
    TokenNotFound,
    TokenRejected,
    TokenUnavailable,
    UnsupportedByToken,
)

__all__ = [
    "PKCS11_ERROR_MAP",
    "RECONNECT_ERRORS",
    "STALE_HANDLE_ERRORS",
    "TRANSIENT_CREATE_ERRORS",
    "ckr_name",
    "map_pkcs11_error",
]

# Every exception class of pkcs11.exceptions, mapped. tests/test_keystore_errors.py fails when
# python-pkcs11 grows a class that is missing here.
PKCS11_ERROR_MAP: dict[type[Exception], type[KeystoreError]] = {
    p11e.AnotherUserAlreadyLoggedIn: LoginFailed,
    p11e.ArgumentsBad: TokenRejected,
    p11e.AttributeReadOnly: TokenRejected,
    p11e.AttributeSensitive: TokenRejected,
    p11e.AttributeTypeInvalid: TokenRejected,
    p11e.AttributeValueInvalid: TokenRejected,
    p11e.DataInvalid: TokenRejected,
    p11e.DataLenRange: TokenRejected,
    p11e.DeviceError: TokenUnavailable,
    p11e.DeviceMemory: DeviceFailure,
    p11e.DeviceRemoved: TokenUnavailable,
    p11e.DomainParamsInvalid: TokenRejected,
    p11e.EncryptedDataInvalid: DecryptionFailed,
    p11e.EncryptedDataLenRange: DecryptionFailed,
    p11e.ExceededMaxIterations: DeviceFailure,
    p11e.FunctionCancelled: DeviceFailure,
    p11e.FunctionFailed: DeviceFailure,
    p11e.FunctionNotSupported: UnsupportedByToken,
    p11e.FunctionRejected: TokenRejected,
    p11e.GeneralError: DeviceFailure,
    p11e.HostMemory: DeviceFailure,
    p11e.KeyHandleInvalid: KeyMaterialMissing,
    p11e.KeyIndigestible: TokenRejected,
    p11e.KeyNeeded: TokenRejected,
    p11e.KeyNotNeeded: TokenRejected,
    p11e.KeyNotWrappable: TokenRejected,
    p11e.KeySizeRange: TokenRejected,
    p11e.KeyTypeInconsistent: TokenRejected,
    p11e.KeyUnextractable: TokenRejected,
    p11e.MechanismInvalid: UnsupportedByToken,
    p11e.MechanismParamInvalid: TokenRejected,
    p11e.MultipleObjectsReturned: DeviceFailure,
    p11e.MultipleTokensReturned: MultipleTokens,
    p11e.NoEvent: DeviceFailure,
    p11e.NoSuchKey: KeyMaterialMissing,
    p11e.NoSuchToken: TokenNotFound,
    p11e.ObjectHandleInvalid: KeyMaterialMissing,
    p11e.OperationActive: DeviceFailure,
    p11e.OperationNotInitialized: DeviceFailure,
    p11e.PKCS11Error: DeviceFailure,
    p11e.PinExpired: LoginFailed,
    p11e.PinIncorrect: PinIncorrect,
    p11e.PinInvalid: LoginFailed,
    p11e.PinLenRange: PinIncorrect,
    p11e.PinLocked: PinLocked,
    p11e.PinTooWeak: LoginFailed,
    p11e.PublicKeyInvalid: TokenRejected,
    p11e.RandomNoRNG: UnsupportedByToken,
    p11e.RandomSeedNotSupported: UnsupportedByToken,
    p11e.SessionClosed: TokenUnavailable,
    p11e.SessionCount: TokenUnavailable,
    p11e.SessionExists: DeviceFailure,
    p11e.SessionHandleInvalid: TokenUnavailable,
    p11e.SessionReadOnly: TokenRejected,
    p11e.SessionReadOnlyExists: LoginFailed,
    p11e.SessionReadWriteSOExists: LoginFailed,
    p11e.SignatureInvalid: DecryptionFailed,
    p11e.SignatureLenRange: DecryptionFailed,
    p11e.SlotIDInvalid: TokenNotFound,
    p11e.TemplateIncomplete: TokenRejected,
    p11e.TemplateInconsistent: TokenRejected,
    p11e.TokenNotPresent: TokenUnavailable,
    p11e.TokenNotRecognised: TokenUnavailable,
    p11e.TokenWriteProtected: TokenRejected,
    p11e.UnwrappingKeyHandleInvalid: KeyMaterialMissing,
    p11e.UnwrappingKeySizeRange: TokenRejected,
    p11e.UnwrappingKeyTypeInconsistent: TokenRejected,
    p11e.UserAlreadyLoggedIn: LoginFailed,
    p11e.UserNotLoggedIn: TokenUnavailable,
    p11e.UserPinNotInitialized: LoginFailed,
    p11e.UserTooManyTypes: LoginFailed,
    p11e.WrappedKeyInvalid: TokenRejected,
    p11e.WrappedKeyLenRange: TokenRejected,
    p11e.WrappingKeyHandleInvalid: KeyMaterialMissing,
    p11e.WrappingKeySizeRange: TokenRejected,
    p11e.WrappingKeyTypeInconsistent: TokenRejected,
}

# Signals after which every session and cached handle of the process is stale: reopen, log in
# again and retry once (reference/pkcs11-facts.md §5.3).
RECONNECT_ERRORS: tuple[type[Exception], ...] = (
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.TokenNotPresent,
    p11e.UserNotLoggedIn,
)

# Stale object handles: evict from the handle cache and look the object up again.
# MechanismInvalid, KeyTypeInconsistent and FunctionFailed on a key that worked before are
# SoftHSM 2.6.1 reading an object file another process is writing (SoftHSMv2 #576, #578, fixed
# in 2.7.0): measured here at about 1 in 700 operations with three processes creating keys.
# Looking the object up again and retrying once clears them.
STALE_HANDLE_ERRORS: tuple[type[Exception], ...] = (
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.MechanismInvalid,
    p11e.KeyTypeInconsistent,
    p11e.FunctionFailed,
)

# Failures of C_GenerateKey that a retry clears on SoftHSM 2.6.1 when several processes create
# objects at once (SoftHSMv2 #573; measured about 1 in 1,000 creations with three processes).
# ObjectHandleInvalid: the new object's handle went stale before it was read back (seen 1 in
# 30 runs of tests/test_keystore.py::test_processes_creating_and_using_keys_at_once).
TRANSIENT_CREATE_ERRORS: tuple[type[Exception], ...] = (
    p11e.FunctionFailed,
    p11e.GeneralError,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)


def ckr_name(exc: BaseException) -> str:
    """The PKCS#11 return value a python-pkcs11 exception stands for (``DeviceRemoved`` ->
    ``CKR_DEVICE_REMOVED``); python-pkcs11's own conditions (``NoSuchToken``) by class name."""
    name = type(exc).__name__
    if not isinstance(exc, p11e.PKCS11Error) or name in _NOT_RETURN_VALUES:
        return name
    return "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


# python-pkcs11 exceptions that are no CK_RV of their own.
_NOT_RETURN_VALUES = frozenset(
    {"PKCS11Error", "NoSuchKey", "NoSuchToken", "MultipleObjectsReturned", "MultipleTokensReturned"}
)


def map_pkcs11_error(exc: Exception, action: str, *, decrypting: bool = False) -> KeystoreError:
    """The keystore error for a python-pkcs11 exception raised while doing ``action``.

    ``decrypting``: SoftHSM 2.6.1 answers a failed GCM tag check with CKR_GENERAL_ERROR
    (reference/pkcs11-facts.md §2.2), and a CBC padding failure can surface as data errors;
    during a decryption those mean "authentication failed", not a device fault. NSS softokn
    answers a failed HMAC or signature comparison with whatever its thread's last NSS error maps
    to (seen: CKR_DEVICE_ERROR, handled by the caller; CKR_ARGUMENTS_BAD for a row MAC of the
    right length; CKR_BUFFER_TOO_SMALL, which python-pkcs11 raises as a bare PKCS11Error, for a
    ciphertext's HMAC under another encryption context): a failed check too.
    """
    if decrypting and type(exc) is p11e.PKCS11Error:
        return DecryptionFailed("decryption failed")
    if decrypting and isinstance(
        exc,
        p11e.GeneralError
        | p11e.ArgumentsBad
        | p11e.EncryptedDataInvalid
        | p11e.EncryptedDataLenRange
        | p11e.DataInvalid
        | p11e.DataLenRange
        | p11e.SignatureInvalid
        | p11e.SignatureLenRange,
    ):
        return DecryptionFailed("decryption failed")
    target: type[KeystoreError] = DeviceFailure
    for klass in type(exc).__mro__:
        if klass in PKCS11_ERROR_MAP:
            target = PKCS11_ERROR_MAP[klass]
            break
    if target is TokenUnavailable:
        return TokenUnavailable(f"{ckr_name(exc)} while {action}")
    return target(f"{action}: {type(exc).__name__}")
