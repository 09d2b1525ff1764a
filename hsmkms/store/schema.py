"""The metadata schema, as SQLAlchemy Core tables. Dialect-neutral (column types that differ
between dialects come from :mod:`hsmkms.db.types`).

The store never holds a secret: key versions are named by their token object ids
(:meth:`hsmkms.keystore.base.KeyMaterialRef.to_str`), never by their bytes.

Tables::

    keys             one row per KMS key (metadata, state, rotation and deletion schedule, policy)
    key_versions     one row per key version: (key_id, version) -> token object ids + profile
    aliases          alias name -> key id
    tags             (key_id, tag_key) -> tag_value
    grants           one row per grant: key, grantee, retiring principal, operations, constraints
    import_tokens    one row per GetParametersForImport answer: the key, wrapping algorithm and
                     wrapping key pair (token object id) an import token is bound to, its expiry
    imported_key_material
                     one row per imported key material of a key (Origin EXTERNAL): its version,
                     KeyMaterialId, expiration, import state (the material's token objects are
                     the key_versions row of that version, present while it is imported)
    store_settings   name -> value (``integrity_key``: the token MAC key's reference;
                     ``sealed_tables``: the tables whose rows the store has adopted)

The versions applied (:mod:`hsmkms.store.migrations`) are in the database's ``schema_migrations``
table (:mod:`hsmkms.db.migrations`), as component ``metadata``.

``keys``, ``key_versions``, ``grants``, ``aliases``, ``tags``, ``import_tokens`` and
``imported_key_material`` rows carry ``mac``, a token HMAC over the row
(:mod:`hsmkms.store.integrity`).
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from hsmkms.db.types import UTCDateTime

__all__ = [
    "APPLICATION_TABLES",
    "UTCDateTime",
    "aliases",
    "grants",
    "import_tokens",
    "imported_key_material",
    "key_versions",
    "keys",
    "metadata",
    "store_settings",
    "tags",
]


metadata = MetaData()

keys = Table(
    "keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("arn", String(256), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    Column("key_usage", String(32), nullable=False),
    Column("key_spec", String(32), nullable=False),
    Column("origin", String(32), nullable=False),
    Column("state", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("deletion_date", UTCDateTime, nullable=True),
    Column("pending_window_days", Integer, nullable=True),
    Column("policy", Text, nullable=False),
    Column("rotation_enabled", Boolean, nullable=False, default=False),
    Column("rotation_period_days", Integer, nullable=True),
    Column("next_rotation_date", UTCDateTime, nullable=True),
    Column("current_version", Integer, nullable=False),
    Column("on_demand_rotations", Integer, nullable=False, default=0),
    Column("mac", LargeBinary, nullable=True),  # see hsmkms.store.integrity
)
Index("ix_keys_state_deletion", keys.c.state, keys.c.deletion_date)
Index("ix_keys_rotation", keys.c.rotation_enabled, keys.c.next_rotation_date)

key_versions = Table(
    "key_versions",
    metadata,
    Column("key_id", String(36), ForeignKey("keys.id"), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("material_ref", Text, nullable=False),
    Column("profile", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("rotation_type", String(16), nullable=True),
    Column("mac", LargeBinary, nullable=True),
)

aliases = Table(
    "aliases",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("key_id", String(36), ForeignKey("keys.id"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("mac", LargeBinary, nullable=True),  # see hsmkms.store.integrity
)
Index("ix_aliases_key_id", aliases.c.key_id)

tags = Table(
    "tags",
    metadata,
    Column("key_id", String(36), ForeignKey("keys.id"), primary_key=True),
    Column("tag_key", String(128), primary_key=True),
    Column("tag_value", String(256), nullable=False),
    Column("mac", LargeBinary, nullable=True),  # see hsmkms.store.integrity
)

grants = Table(
    "grants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(36), ForeignKey("keys.id"), nullable=False),
    Column("name", String(256), nullable=True),
    Column("grantee_principal", String(256), nullable=False),
    Column("retiring_principal", String(256), nullable=True),
    Column("operations", Text, nullable=False),  # sorted names joined by ","
    Column("constraints", Text, nullable=True),  # canonical JSON written by the service
    Column("issuing_account", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("mac", LargeBinary, nullable=True),  # see hsmkms.store.integrity
)
# (key_id, grantee_principal) serves both the authorization hot path and a key's listing.
Index("ix_grants_key_grantee", grants.c.key_id, grants.c.grantee_principal)
Index("ix_grants_grantee", grants.c.grantee_principal)
Index("ix_grants_retiring", grants.c.retiring_principal)

import_tokens = Table(
    "import_tokens",
    metadata,
    Column("id", String(32), primary_key=True),  # hex of the token's 16 random bytes
    Column("key_id", String(36), ForeignKey("keys.id"), nullable=False),
    Column("wrapping_algorithm", String(32), nullable=False),
    Column("wrapping_key_spec", String(16), nullable=False),
    Column("wrapping_key", String(256), nullable=False),  # WrappingKeyRef text: object ids only
    Column("created_at", UTCDateTime, nullable=False),
    Column("valid_to", UTCDateTime, nullable=False),
    Column("mac", LargeBinary, nullable=True),  # see hsmkms.store.integrity
)
Index("ix_import_tokens_key_id", import_tokens.c.key_id)
Index("ix_import_tokens_valid_to", import_tokens.c.valid_to)

imported_key_material = Table(
    "imported_key_material",
    metadata,
    Column("key_id", String(36), ForeignKey("keys.id"), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("key_material_id", String(64), nullable=False),
    Column("expiration_model", String(32), nullable=False),
    Column("valid_to", UTCDateTime, nullable=True),
    Column("description", String(256), nullable=True),
    Column("import_state", String(16), nullable=False),  # IMPORTED | PENDING_IMPORT
    Column("imported_at", UTCDateTime, nullable=False),  # the latest import
    Column("rotation_date", UTCDateTime, nullable=True),  # made current by RotateKeyOnDemand
    Column("mac", LargeBinary, nullable=True),  # see hsmkms.store.integrity
)
Index(
    "ix_imported_key_material_expiry",
    imported_key_material.c.import_state,
    imported_key_material.c.valid_to,
)

store_settings = Table(
    "store_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

APPLICATION_TABLES = (keys, key_versions, aliases, tags)
"""The tables migration 1 creates, in dependency order."""
