"""Identities: access keys (id -> principal ARN, secret and identity policy), their secrets
sealed by the token."""

from __future__ import annotations

from hsmkms.identity.store import (
    ROOT_NAME,
    CredentialInfo,
    CredentialIntegrityError,
    CredentialStore,
    DuplicateCredential,
    IssuedCredential,
    UnknownCredential,
    check_credential,
    generate_access_key_id,
    generate_secret,
    validate_identity_policy,
)

__all__ = [
    "ROOT_NAME",
    "CredentialInfo",
    "CredentialIntegrityError",
    "CredentialStore",
    "DuplicateCredential",
    "IssuedCredential",
    "UnknownCredential",
    "check_credential",
    "generate_access_key_id",
    "generate_secret",
    "validate_identity_policy",
]
