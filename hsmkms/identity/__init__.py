"""Identities: access keys (id -> principal ARN and secret), their secrets sealed by the token."""

from __future__ import annotations

from hsmkms.identity.store import (
    ROOT_NAME,
    CredentialInfo,
    CredentialStore,
    DuplicateCredential,
    IssuedCredential,
    UnknownCredential,
    generate_access_key_id,
    generate_secret,
)

__all__ = [
    "ROOT_NAME",
    "CredentialInfo",
    "CredentialStore",
    "DuplicateCredential",
    "IssuedCredential",
    "UnknownCredential",
    "generate_access_key_id",
    "generate_secret",
]
