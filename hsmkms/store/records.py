"""Typed records the metadata store reads and writes. Plain values: no secrets, no policy."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Generic, TypeVar

T = TypeVar("T")

DELETING = "Deleting"
"""Internal key state (never shown to callers): the purge has started destroying token objects.

A key in this state is gone for every caller; the purge finishes it on its next run."""


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """One KMS key's metadata. ``state`` is an AWS key state name or :data:`DELETING`."""

    key_id: str
    arn: str
    description: str
    key_usage: str
    key_spec: str
    origin: str
    state: str
    created_at: dt.datetime
    policy: str
    current_version: int
    deletion_date: dt.datetime | None = None
    pending_window_days: int | None = None
    rotation_enabled: bool = False
    rotation_period_days: int | None = None
    next_rotation_date: dt.datetime | None = None
    on_demand_rotations: int = 0


@dataclasses.dataclass(frozen=True)
class KeyVersionRecord:
    """One version of a key: where its material lives on the token, and how it came to be.

    ``material_ref`` is :meth:`hsmkms.keystore.base.KeyMaterialRef.to_str` output (object ids,
    never key bytes). ``rotation_type`` is ``None`` for version 1, else AUTOMATIC or ON_DEMAND.
    """

    key_id: str
    version: int
    material_ref: str
    profile: str
    created_at: dt.datetime
    rotation_type: str | None = None


@dataclasses.dataclass(frozen=True)
class AliasRecord:
    """An alias name (``alias/...``) pointing at a key id."""

    name: str
    key_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class GrantRecord:
    """One grant on a key: who may use it for which operations, under which constraints.

    ``grant_id`` is 64 lowercase hex characters (made by the service). ``operations`` is sorted
    (``("Decrypt", "Encrypt")``). ``constraints`` is the canonical JSON text the service wrote
    (``{"EncryptionContextEquals":{"a":"b"}}``), or ``None``.
    """

    grant_id: str
    key_id: str
    name: str | None
    grantee_principal: str
    retiring_principal: str | None
    operations: tuple[str, ...]
    constraints: str | None
    issuing_account: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing. ``next_marker`` is opaque and set only when more items follow."""

    items: list[T]
    next_marker: str | None = None

    @property
    def truncated(self) -> bool:
        """Whether another page follows."""
        return self.next_marker is not None


IMPORTED = "IMPORTED"
"""An imported key material's ``import_state`` while its token objects exist."""

PENDING_IMPORT = "PENDING_IMPORT"
"""An imported key material's ``import_state`` after it was deleted or expired: the same
material must be imported again (AWS ``ImportState``)."""


@dataclasses.dataclass(frozen=True)
class ImportTokenRecord:
    """What a GetParametersForImport answer bound its import token to: the key, the wrapping
    algorithm and the wrapping key pair (``wrapping_key``: its reference text, an object id,
    never a secret), valid until ``valid_to``."""

    token_id: str
    key_id: str
    wrapping_algorithm: str
    wrapping_key_spec: str
    wrapping_key: str
    created_at: dt.datetime
    valid_to: dt.datetime


@dataclasses.dataclass(frozen=True)
class ImportedMaterialRecord:
    """One imported key material of a key (Origin EXTERNAL), as version ``version``.

    ``key_material_id`` is derived from the key id and the material's check value (computed in
    the token): the same material always gets the same id. While ``import_state`` is
    :data:`IMPORTED` the version's row in ``key_versions`` names its token objects; after a
    deletion or expiry it is :data:`PENDING_IMPORT` and that row is gone.
    """

    key_id: str
    version: int
    key_material_id: str
    expiration_model: str
    valid_to: dt.datetime | None
    description: str | None
    import_state: str
    imported_at: dt.datetime
    rotation_date: dt.datetime | None = None
