"""Key policy operations: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies (the one policy of a key
is named ``default``)."""

from __future__ import annotations

from hsmkms.errors import InvalidMarkerException, NotFoundException
from hsmkms.models import (
    EmptyResponse,
    GetKeyPolicyRequest,
    GetKeyPolicyResponse,
    ListKeyPoliciesRequest,
    ListKeyPoliciesResponse,
    PutKeyPolicyRequest,
)
from hsmkms.policy import parse_policy
from hsmkms.service.core import Call, Prepared, ServiceCore, operation

DEFAULT_POLICY_NAME = "default"


def _check_policy_name(name: str | None) -> None:
    if name is not None and name != DEFAULT_POLICY_NAME:
        raise NotFoundException(f"No such policy exists: {name}. The only policy is default.")


def _prepare_get_key_policy(request: GetKeyPolicyRequest) -> None:
    _check_policy_name(request.PolicyName)


def _prepare_put_key_policy(request: PutKeyPolicyRequest) -> Prepared:
    _check_policy_name(request.PolicyName)
    return Prepared(
        {"kms:BypassPolicyLockoutSafetyCheck": bool(request.BypassPolicyLockoutSafetyCheck)}
    )


def _prepare_list_key_policies(request: ListKeyPoliciesRequest) -> None:
    if request.Marker is not None:
        raise InvalidMarkerException("The marker is not valid.")


class PolicyOperations(ServiceCore):
    """The key policy operations of :class:`~hsmkms.service.KmsService`."""

    @operation("GetKeyPolicy", prepare=_prepare_get_key_policy)
    def get_key_policy(self, call: Call[GetKeyPolicyRequest]) -> GetKeyPolicyResponse:
        """GetKeyPolicy: the key policy document (PolicyName ``default`` only)."""
        return GetKeyPolicyResponse(Policy=call.key.policy, PolicyName=DEFAULT_POLICY_NAME)

    @operation("PutKeyPolicy", prepare=_prepare_put_key_policy)
    def put_key_policy(self, call: Call[PutKeyPolicyRequest]) -> EmptyResponse:
        """PutKeyPolicy: replace the policy (JSON, at most 32 KB), refused when the new policy
        would lock the caller out of PutKeyPolicy unless BypassPolicyLockoutSafetyCheck."""
        request, key = call.request, call.key
        document = parse_policy(request.Policy)  # validates: size, grammar, conditions
        if not request.BypassPolicyLockoutSafetyCheck:
            self._authz.check_lockout(call.caller, document, key.arn, key)
        if not self._store.set_policy(key.key_id, request.Policy):
            raise self._not_found(key.key_id)
        return EmptyResponse()

    @operation("ListKeyPolicies", prepare=_prepare_list_key_policies)
    def list_key_policies(self, call: Call[ListKeyPoliciesRequest]) -> ListKeyPoliciesResponse:
        """ListKeyPolicies: always ``["default"]``."""
        return ListKeyPoliciesResponse(PolicyNames=[DEFAULT_POLICY_NAME], Truncated=False)
