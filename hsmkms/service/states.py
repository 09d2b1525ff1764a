"""The operation x key state matrix (reference §3.5, AWS Developer Guide "Key states").

Each operation belongs to one :class:`Access` class; :func:`check_state` raises the exact AWS
error for a refusal.
"""

from __future__ import annotations

import enum

from hsmkms.errors import DisabledException, KMSInvalidStateException
from hsmkms.store import KeyRecord


class Access(enum.Enum):
    """How an operation depends on the key state."""

    USE = "use"
    """Crypto ops, and Enable/DisableKeyRotation, RotateKeyOnDemand: Enabled only."""
    MANAGE = "manage"
    """CreateAlias, UpdateAlias (target), TagResource, UntagResource, UpdateKeyDescription,
    ScheduleKeyDeletion, GetParametersForImport, ImportKeyMaterial: any state but
    PendingDeletion (PendingImport included)."""
    MANAGE_MATERIAL = "manage-material"
    """EnableKey, DisableKey, CreateGrant: as MANAGE, and not PendingImport either (they need
    the key's material: "<arn> is pending import.")."""
    DELETE_MATERIAL = "delete-material"
    """DeleteImportedKeyMaterial: every state, PendingDeletion included (the key stays pending
    deletion), but Unavailable, Creating and Updating."""
    READ = "read"
    """DescribeKey, Get/PutKeyPolicy, List*, GetKeyRotationStatus, DeleteAlias: every state."""
    CANCEL_DELETION = "cancel-deletion"
    """CancelKeyDeletion: PendingDeletion only."""


_UNSETTLED = frozenset({"Unavailable", "Creating", "Updating"})


def check_state(access: Access, key: KeyRecord) -> None:
    """Raise the AWS error when ``key``'s state refuses an operation of class ``access``."""
    state = key.state
    if access is Access.READ:
        return
    if access is Access.CANCEL_DELETION:
        if state != "PendingDeletion":
            # spec: KMSInvalidStateException "<arn> is not pending deletion." (§3.5)
            raise KMSInvalidStateException(f"{key.arn} is not pending deletion.")
        return
    if access is Access.DELETE_MATERIAL:
        if state in _UNSETTLED:
            raise KMSInvalidStateException(f"{key.arn} is {_describe(state)}.")
        return
    if state == "PendingDeletion":
        # spec: KMSInvalidStateException "<arn> is pending deletion." (§3.5)
        raise KMSInvalidStateException(f"{key.arn} is pending deletion.")
    if access is Access.USE and state == "Disabled":
        # spec: DisabledException "<arn> is disabled." (§3.5)
        raise DisabledException(f"{key.arn} is disabled.")
    if state == "PendingImport" and access is Access.MANAGE:
        return
    if state not in ("Enabled", "Disabled"):
        # spec: KMSInvalidStateException "<arn> is pending import." (§3.5, note 5)
        raise KMSInvalidStateException(f"{key.arn} is {_describe(state)}.")


def _describe(state: str) -> str:
    return {
        "PendingImport": "pending import",
        "Unavailable": "unavailable",
        "Creating": "creating",
        "Updating": "updating",
    }.get(state, state)
