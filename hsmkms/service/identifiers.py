"""Key identifiers: key ids, key ARNs, alias names and alias ARNs (reference §3.4)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import re
import secrets
import uuid

from hsmkms.errors import InvalidArnException, InvalidGrantTokenException, NotFoundException

ALIAS_PREFIX = "alias/"
RESERVED_ALIAS_PREFIX = "alias/aws/"


@dataclasses.dataclass(frozen=True)
class KeyName:
    """A parsed identifier: a key id, or an alias name (``alias/...``)."""

    key_id: str | None = None
    alias: str | None = None


@dataclasses.dataclass(frozen=True)
class Arns:
    """ARN building and parsing for one region and account."""

    region: str
    account_id: str

    @property
    def prefix(self) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:"

    def key(self, key_id: str) -> str:
        """``arn:aws:kms:<region>:<account>:key/<id>``."""
        return f"{self.prefix}key/{key_id}"

    def alias(self, name: str) -> str:
        """``arn:aws:kms:<region>:<account>:alias/<name>`` (``name`` includes ``alias/``)."""
        return f"{self.prefix}{name}"

    def parse(self, identifier: str, *, aliases: bool) -> KeyName:
        """Parse a KeyId member. ``aliases``: whether the operation accepts alias forms.

        A malformed ARN raises InvalidArnException; an ARN of another region or account, a
        string that is no UUID, or an alias where none is accepted raises NotFoundException.
        """
        return _parse(self, identifier, aliases)

    def _parse(self, identifier: str, aliases: bool) -> KeyName:
        if identifier.startswith("arn:"):
            parts = identifier.split(":", 5)
            if len(parts) != 6 or parts[2] != "kms" or not parts[1] or "/" not in parts[5]:
                raise InvalidArnException(f"Invalid arn {identifier}")
            _, partition, _, region, account, resource = parts
            kind, _, rest = resource.partition("/")
            if kind not in ("key", "alias") or not rest:
                raise InvalidArnException(f"Invalid arn {identifier}")
            if region != self.region:
                # spec: AWS names only the region of an ARN from another region (LocalStack's
                # AWS-validated snapshot test_get_key_in_different_region).
                raise NotFoundException(f"Invalid arn {region}")
            if partition != "aws" or account != self.account_id:
                # Keys of other accounts do not exist here.
                raise NotFoundException(f"Invalid arn {identifier}")
            if kind == "alias":
                if not aliases:
                    raise NotFoundException(f"Invalid keyId '{identifier}'")
                return KeyName(alias=ALIAS_PREFIX + rest)
            return KeyName(key_id=_key_id(rest, identifier))
        if identifier.startswith(ALIAS_PREFIX):
            if not aliases:
                raise NotFoundException(f"Invalid keyId '{identifier}'")
            return KeyName(alias=identifier)
        return KeyName(key_id=_key_id(identifier, identifier))


# A key id: a canonical, lowercase UUID, or a multi-Region key id (``mrk-`` and 32 hex digits;
# hsmkms makes none, but AWS parses them as key ids: an unknown one "does not exist").
_KEY_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}"
)


@functools.lru_cache(maxsize=4096)
def _parse(arns: Arns, identifier: str, aliases: bool) -> KeyName:
    # Cached: the same few identifiers arrive again and again (errors are not cached).
    return arns._parse(identifier, aliases)


def _key_id(candidate: str, identifier: str) -> str:
    """``candidate`` if it is a key id (a UUID, or a multi-Region key id)."""
    if _KEY_ID.fullmatch(candidate) is None:
        raise NotFoundException(f"Invalid keyId '{identifier}'")
    return candidate


@functools.lru_cache(maxsize=4096)
def key_material_id(key_id: str, version: int) -> str:
    """The KeyMaterialId AWS shows for a key version: 64 lowercase hex characters.

    Derived from the key id and version (not from any secret), so it is stable and public.
    """
    return hashlib.sha256(f"hsmkms:key-material:{key_id}:{version}".encode()).hexdigest()


def imported_key_material_id(key_id: str, key_spec: str, check_value: bytes) -> str:
    """The KeyMaterialId of imported key material: 64 lowercase hex characters, derived (as
    AWS derives it) from the key id and the material, through the material's check value
    computed in the token (:mod:`hsmkms.keystore.imports`). The same material imported into
    the same key always gets the same id; this is how a re-import is recognized."""
    head = f"hsmkms:imported-key-material:v1:{key_id}:{key_spec}:".encode()
    return hashlib.sha256(head + check_value).hexdigest()


_TOKEN_VERSION = 1
_TOKEN_LENGTH = 1 + 16 + 32 + 16


def grant_token(key_id: str, grant_id: str) -> str:
    """A fresh token naming ``grant_id`` on ``key_id`` (a new one on every CreateGrant).

    Grant token (opaque to callers; base64url without padding)::

        0   1   version (1)
        1   16  key id (UUID bytes)
        17  32  grant id (the 64 hex digits of GrantId, as bytes)
        49  16  random

    The token names the grant; it is not a secret and grants nothing by itself: RetireGrant by
    token still checks that the caller may retire the grant.
    """
    raw = (
        bytes([_TOKEN_VERSION])
        + uuid.UUID(key_id).bytes
        + bytes.fromhex(grant_id)
        + secrets.token_bytes(16)
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parse_grant_token(token: str) -> tuple[str, str]:
    """(key id, grant id) of a token; InvalidGrantTokenException when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _TOKEN_LENGTH or raw[0] != _TOKEN_VERSION:
        raise InvalidGrantTokenException("The grant token is not valid.")
    return str(uuid.UUID(bytes=raw[1:17])), raw[17:49].hex()
