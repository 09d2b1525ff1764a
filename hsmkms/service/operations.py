"""The operation registry: AWS operation name -> request model, response model, service method.

The protocol layer dispatches every operation generically with it: parse the JSON body into
``request_model`` (base64-decoding the members :func:`blob_members` names), call
``getattr(service, method)(request, caller=...)``, serialize the response model.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from pydantic import BaseModel

from hsmkms import models as m


@dataclasses.dataclass(frozen=True)
class Operation:
    """One AWS KMS operation as this service implements it."""

    name: str
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    method: str


def _op(name: str, request: type[BaseModel], response: type[BaseModel], method: str) -> Operation:
    return Operation(name, request, response, method)


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        _op("CreateKey", m.CreateKeyRequest, m.CreateKeyResponse, "create_key"),
        _op("DescribeKey", m.DescribeKeyRequest, m.DescribeKeyResponse, "describe_key"),
        _op("ListKeys", m.ListKeysRequest, m.ListKeysResponse, "list_keys"),
        _op(
            "UpdateKeyDescription",
            m.UpdateKeyDescriptionRequest,
            m.EmptyResponse,
            "update_key_description",
        ),
        _op("EnableKey", m.EnableKeyRequest, m.EmptyResponse, "enable_key"),
        _op("DisableKey", m.DisableKeyRequest, m.EmptyResponse, "disable_key"),
        _op(
            "ScheduleKeyDeletion",
            m.ScheduleKeyDeletionRequest,
            m.ScheduleKeyDeletionResponse,
            "schedule_key_deletion",
        ),
        _op(
            "CancelKeyDeletion",
            m.CancelKeyDeletionRequest,
            m.CancelKeyDeletionResponse,
            "cancel_key_deletion",
        ),
        _op("CreateAlias", m.CreateAliasRequest, m.EmptyResponse, "create_alias"),
        _op("UpdateAlias", m.UpdateAliasRequest, m.EmptyResponse, "update_alias"),
        _op("DeleteAlias", m.DeleteAliasRequest, m.EmptyResponse, "delete_alias"),
        _op("ListAliases", m.ListAliasesRequest, m.ListAliasesResponse, "list_aliases"),
        _op("TagResource", m.TagResourceRequest, m.EmptyResponse, "tag_resource"),
        _op("UntagResource", m.UntagResourceRequest, m.EmptyResponse, "untag_resource"),
        _op(
            "ListResourceTags",
            m.ListResourceTagsRequest,
            m.ListResourceTagsResponse,
            "list_resource_tags",
        ),
        _op("Encrypt", m.EncryptRequest, m.EncryptResponse, "encrypt"),
        _op("Decrypt", m.DecryptRequest, m.DecryptResponse, "decrypt"),
        _op("ReEncrypt", m.ReEncryptRequest, m.ReEncryptResponse, "re_encrypt"),
        _op(
            "GenerateDataKey",
            m.GenerateDataKeyRequest,
            m.GenerateDataKeyResponse,
            "generate_data_key",
        ),
        _op(
            "GenerateDataKeyWithoutPlaintext",
            m.GenerateDataKeyWithoutPlaintextRequest,
            m.GenerateDataKeyWithoutPlaintextResponse,
            "generate_data_key_without_plaintext",
        ),
        _op("GenerateRandom", m.GenerateRandomRequest, m.GenerateRandomResponse, "generate_random"),
        _op(
            "EnableKeyRotation", m.EnableKeyRotationRequest, m.EmptyResponse, "enable_key_rotation"
        ),
        _op(
            "DisableKeyRotation",
            m.DisableKeyRotationRequest,
            m.EmptyResponse,
            "disable_key_rotation",
        ),
        _op(
            "GetKeyRotationStatus",
            m.GetKeyRotationStatusRequest,
            m.GetKeyRotationStatusResponse,
            "get_key_rotation_status",
        ),
        _op(
            "RotateKeyOnDemand",
            m.RotateKeyOnDemandRequest,
            m.RotateKeyOnDemandResponse,
            "rotate_key_on_demand",
        ),
        _op(
            "ListKeyRotations",
            m.ListKeyRotationsRequest,
            m.ListKeyRotationsResponse,
            "list_key_rotations",
        ),
        _op("GetKeyPolicy", m.GetKeyPolicyRequest, m.GetKeyPolicyResponse, "get_key_policy"),
        _op("PutKeyPolicy", m.PutKeyPolicyRequest, m.EmptyResponse, "put_key_policy"),
        _op(
            "ListKeyPolicies",
            m.ListKeyPoliciesRequest,
            m.ListKeyPoliciesResponse,
            "list_key_policies",
        ),
        _op("CreateGrant", m.CreateGrantRequest, m.CreateGrantResponse, "create_grant"),
        _op("ListGrants", m.ListGrantsRequest, m.ListGrantsResponse, "list_grants"),
        _op(
            "ListRetirableGrants",
            m.ListRetirableGrantsRequest,
            m.ListGrantsResponse,
            "list_retirable_grants",
        ),
        _op("RetireGrant", m.RetireGrantRequest, m.EmptyResponse, "retire_grant"),
        _op("RevokeGrant", m.RevokeGrantRequest, m.EmptyResponse, "revoke_grant"),
    )
}


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from a field type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = typing.get_args(annotation)
        if args and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1:
                annotation = rest[0]
                continue
        return annotation


@functools.cache
def blob_members(model: type[BaseModel]) -> frozenset[str]:
    """Names of the ``bytes`` members of ``model`` (base64 strings on the wire)."""
    return frozenset(
        name for name, field in model.model_fields.items() if _unwrap(field.annotation) is bytes
    )
