"""Every python-pkcs11 exception maps to a keystore error, in one place."""

from __future__ import annotations

import inspect

import pkcs11.exceptions as p11e
import pytest

from hsmkms.errors import KMSError
from hsmkms.keystore.errors import DecryptionFailed, DeviceFailure, KeystoreError, TokenUnavailable
from hsmkms.keystore.pkcs11_errors import PKCS11_ERROR_MAP, ckr_name, map_pkcs11_error


def _pkcs11_exception_classes() -> list[type[Exception]]:
    return [
        cls
        for _, cls in inspect.getmembers(p11e, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == p11e.__name__
    ]


def test_every_pkcs11_exception_class_is_mapped() -> None:
    """Fails when python-pkcs11 grows an exception class that nobody decided about."""
    unmapped = [c.__name__ for c in _pkcs11_exception_classes() if c not in PKCS11_ERROR_MAP]
    assert unmapped == []


def test_mapped_errors_are_kms_errors_without_internal_detail() -> None:
    for cls in _pkcs11_exception_classes():
        mapped = map_pkcs11_error(cls(), "doing something")
        assert isinstance(mapped, KeystoreError)
        assert isinstance(mapped, KMSError)
        assert mapped.status >= 500
        if isinstance(mapped, TokenUnavailable):
            # Shown to the caller (503): the PKCS#11 reason and the action, nothing else.
            assert mapped.shows_cause
            assert mapped.status == 503
            assert mapped.detail == f"{ckr_name(cls())} while doing something"
        else:
            assert not mapped.shows_cause
            assert mapped.message == f"doing something: {cls.__name__}"


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (p11e.DeviceRemoved, "CKR_DEVICE_REMOVED"),
        (p11e.TokenNotPresent, "CKR_TOKEN_NOT_PRESENT"),
        (p11e.GeneralError, "CKR_GENERAL_ERROR"),
        (p11e.SessionHandleInvalid, "CKR_SESSION_HANDLE_INVALID"),
        (p11e.NoSuchToken, "NoSuchToken"),
        (p11e.PKCS11Error, "PKCS11Error"),
    ],
)
def test_pkcs11_reasons_are_named_as_the_standard_names_them(
    cls: type[Exception], name: str
) -> None:
    assert ckr_name(cls()) == name


def test_general_error_is_a_device_fault_except_while_decrypting() -> None:
    """SoftHSM 2.6.1 answers a failed GCM tag check with CKR_GENERAL_ERROR."""
    assert type(map_pkcs11_error(p11e.GeneralError(), "x")) is DeviceFailure
    assert type(map_pkcs11_error(p11e.GeneralError(), "x", decrypting=True)) is DecryptionFailed


@pytest.mark.parametrize(
    "cls", [p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange, p11e.SignatureInvalid]
)
def test_authentication_failures_map_to_decryption_failed(cls: type[Exception]) -> None:
    assert type(map_pkcs11_error(cls(), "x")) is DecryptionFailed
    assert map_pkcs11_error(cls(), "x", decrypting=True).message == "decryption failed"


def test_arguments_bad_is_a_failed_check_only_while_verifying() -> None:
    """NSS softokn answers a failed HMAC comparison with its thread's stale error, e.g.
    CKR_ARGUMENTS_BAD (seen in tests/test_nss_authorization.py: doctor on a tampered row)."""
    assert type(map_pkcs11_error(p11e.ArgumentsBad(), "x", decrypting=True)) is DecryptionFailed
    assert type(map_pkcs11_error(p11e.ArgumentsBad(), "x")) is not DecryptionFailed
    # CKR_BUFFER_TOO_SMALL (tests/test_service_crypto.py on NSS: another encryption context).
    unmapped = p11e.PKCS11Error("Buffer was too small. Should never see this.")
    assert type(map_pkcs11_error(unmapped, "x", decrypting=True)) is DecryptionFailed
    assert type(map_pkcs11_error(unmapped, "x")) is DeviceFailure
