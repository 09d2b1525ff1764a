"""Key identifiers: key ids, key ARNs, alias names and alias ARNs (reference §3.4)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

from hsmkms.errors import InvalidArnException, NotFoundException

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
            if partition != "aws" or region != self.region or account != self.account_id:
                # Keys of other regions or accounts do not exist here.
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


_KEY_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@functools.lru_cache(maxsize=4096)
def _parse(arns: Arns, identifier: str, aliases: bool) -> KeyName:
    # Cached: the same few identifiers arrive again and again (errors are not cached).
    return arns._parse(identifier, aliases)


def _key_id(candidate: str, identifier: str) -> str:
    """``candidate`` if it is a key id (a canonical, lowercase UUID string)."""
    if _KEY_ID.fullmatch(candidate) is None:
        raise NotFoundException(f"Invalid keyId '{identifier}'")
    return candidate


@functools.lru_cache(maxsize=4096)
def key_material_id(key_id: str, version: int) -> str:
    """The KeyMaterialId AWS shows for a key version: 64 lowercase hex characters.

    Derived from the key id and version (not from any secret), so it is stable and public.
    """
    return hashlib.sha256(f"hsmkms:key-material:{key_id}:{version}".encode()).hexdigest()
