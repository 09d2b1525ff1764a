"""The KMS actions a key policy decides (IAM action names, ``kms:`` prefix).

A key policy governs only actions on a key resource. Account-level actions (CreateKey,
ListKeys, ListAliases, GenerateRandom, ListRetirableGrants, custom key store operations) are
decided by identity policies alone. ReEncrypt is two actions: ReEncryptFrom on the source key
and ReEncryptTo on the destination key.
"""

from __future__ import annotations

KEY_RESOURCE_ACTIONS: tuple[str, ...] = tuple(
    f"kms:{name}"
    for name in (
        "CancelKeyDeletion",
        "CreateAlias",
        "CreateGrant",
        "Decrypt",
        "DeleteAlias",
        "DeleteImportedKeyMaterial",
        "DeriveSharedSecret",
        "DescribeKey",
        "DisableKey",
        "DisableKeyRotation",
        "EnableKey",
        "EnableKeyRotation",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "GetKeyLastUsage",
        "GetKeyPolicy",
        "GetKeyRotationStatus",
        "GetParametersForImport",
        "GetPublicKey",
        "ImportKeyMaterial",
        "ListGrants",
        "ListKeyPolicies",
        "ListKeyRotations",
        "ListResourceTags",
        "PutKeyPolicy",
        "ReEncryptFrom",
        "ReEncryptTo",
        "ReplicateKey",
        "RetireGrant",
        "RevokeGrant",
        "RotateKeyOnDemand",
        "ScheduleKeyDeletion",
        "Sign",
        "SynchronizeMultiRegionKey",
        "TagResource",
        "UntagResource",
        "UpdateAlias",
        "UpdateKeyDescription",
        "UpdatePrimaryRegion",
        "Verify",
        "VerifyMac",
    )
)
"""Every KMS action authorized against a particular key (and so by its key policy)."""

ACCOUNT_ACTIONS: tuple[str, ...] = tuple(
    f"kms:{name}"
    for name in (
        "ConnectCustomKeyStore",
        "CreateCustomKeyStore",
        "CreateKey",
        "DeleteCustomKeyStore",
        "DescribeCustomKeyStores",
        "DisconnectCustomKeyStore",
        "GenerateRandom",
        "ListAliases",
        "ListKeys",
        "ListRetirableGrants",
        "UpdateCustomKeyStore",
    )
)
"""KMS actions not tied to one key: identity policies alone decide them."""
