"""Grant operations: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant
(reference §1.5, §4.4).

A grant lets its grantee principal do some operations on one key, optionally only with certain
encryption contexts; it takes part in every authorization decision
(:mod:`hsmkms.service.authorize`). Grants here are strongly consistent: a grant is usable as
soon as CreateGrant returns, with or without its grant token.

Grant tokens: :func:`hsmkms.service.identifiers.grant_token`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping

from hsmkms.errors import (
    AccessDeniedException,
    InvalidGrantIdException,
    LimitExceededException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.models import (
    CreateGrantRequest,
    CreateGrantResponse,
    EmptyResponse,
    GrantConstraints,
    GrantListEntry,
    GrantOperation,
    ListGrantsRequest,
    ListGrantsResponse,
    ListRetirableGrantsRequest,
    RetireGrantRequest,
    RevokeGrantRequest,
)
from hsmkms.policy import ContextInput, grant_allows, root_arn
from hsmkms.policy import GrantConstraints as PolicyGrantConstraints
from hsmkms.service.authorize import constraints_from_text, constraints_to_text
from hsmkms.service.core import Call, Prepared, ServiceCore, operation, page_limit
from hsmkms.service.identifiers import grant_token, parse_grant_token
from hsmkms.service.operations import valid_grant_operations
from hsmkms.service.states import Access
from hsmkms.store import GrantRecord, KeyMissing, LimitReached
from hsmkms.types import Caller

MAX_GRANTS_PER_KEY = 50_000
MAX_CONSTRAINT_PAIRS = 8
MAX_CONSTRAINT_VALUE = 384
_GRANT_ID = re.compile(r"[0-9a-f]{64}")


def _check_grant_id(grant_id: str) -> None:
    if not _GRANT_ID.fullmatch(grant_id):
        raise InvalidGrantIdException("The grant ID is not valid.")


def _check_context_constraint(name: str, context: Mapping[str, str] | None) -> None:
    if context is None:
        return
    # spec: §4.4 — each constraint holds at most 8 pairs, values at most 384 characters.
    if len(context) > MAX_CONSTRAINT_PAIRS:
        raise ValidationException(
            f"Constraints.{name} has {len(context)} pairs; at most {MAX_CONSTRAINT_PAIRS}."
        )
    for value in context.values():
        if len(value) > MAX_CONSTRAINT_VALUE:
            raise ValidationException(
                f"Constraints.{name} values must be at most {MAX_CONSTRAINT_VALUE} characters."
            )


def _operations(request: CreateGrantRequest) -> tuple[str, ...]:
    return tuple(sorted({op.value for op in request.Operations}))


def _constraints(
    request: CreateGrantRequest,
) -> tuple[Mapping[str, str] | None, Mapping[str, str] | None]:
    if request.Constraints is None:
        return None, None
    return request.Constraints.EncryptionContextEquals, request.Constraints.EncryptionContextSubset


def _prepare_create_grant(request: CreateGrantRequest) -> Prepared:
    """The request's own checks, its condition keys (``kms:GrantOperations``, ...), and the
    rule for a caller allowed only by a grant: spec: §4.4 — a grant allowing CreateGrant
    permits only child grants with no more operations and equally or more strict
    constraints."""
    if request.GranteeServicePrincipal is not None or request.RetiringServicePrincipal:
        raise UnsupportedOperationException("Service principals are not supported.")
    if request.GranteePrincipal is None:
        raise ValidationException("GranteePrincipal is required.")
    if not request.Operations:
        raise ValidationException(
            "1 validation error detected: Value '[]' at 'operations' failed to satisfy "
            "constraint: Member must have length greater than or equal to 1"
        )
    operations = _operations(request)
    equals, subset = _constraints(request)
    _check_context_constraint("EncryptionContextEquals", equals)
    _check_context_constraint("EncryptionContextSubset", subset)
    child = PolicyGrantConstraints(
        encryption_context_equals=equals, encryption_context_subset=subset
    )
    conditions: dict[str, ContextInput] = {
        "kms:GrantOperations": list(operations),
        "kms:GranteePrincipal": request.GranteePrincipal,
        "kms:GrantIsForAWSResource": False,
    }
    if request.RetiringPrincipal is not None:
        conditions["kms:RetiringPrincipal"] = request.RetiringPrincipal
    constraint_context = equals if equals is not None else subset
    if constraint_context is not None:
        conditions["kms:GrantConstraintType"] = (
            "EncryptionContextEquals" if equals is not None else "EncryptionContextSubset"
        )
        conditions["kms:EncryptionContextKeys"] = list(constraint_context)
        for name, value in constraint_context.items():
            conditions[f"kms:EncryptionContext:{name}"] = value

    def no_broader(parent: GrantRecord) -> bool:
        return set(operations) <= set(parent.operations) and grant_allows(
            parent.operations,
            constraints_from_text(parent.constraints),
            "CreateGrant",
            None,
            bound_to_context=False,
            child_constraints=child,
        )

    return Prepared(conditions, no_broader)


def _prepare_revoke_grant(request: RevokeGrantRequest) -> None:
    _check_grant_id(request.GrantId)


class GrantOperations(ServiceCore):
    """The grant operations of :class:`~hsmkms.service.KmsService`."""

    def _entry(self, grant: GrantRecord) -> GrantListEntry:
        # The stored constraints are the wire shape's JSON (constraints_to_text).
        constraints = (
            GrantConstraints.model_validate_json(grant.constraints)
            if grant.constraints is not None
            else None
        )
        return GrantListEntry(
            KeyId=self.arns.key(grant.key_id),
            GrantId=grant.grant_id,
            Name=grant.name,
            CreationDate=grant.created_at,
            GranteePrincipal=grant.grantee_principal,
            RetiringPrincipal=grant.retiring_principal,
            IssuingAccount=root_arn(grant.issuing_account),
            Operations=[GrantOperation(op) for op in grant.operations],
            Constraints=constraints,
        )

    def _grant_page(self, grants: list[GrantRecord], next_marker: str | None, truncated: bool
                    ) -> ListGrantsResponse:  # fmt: skip
        return ListGrantsResponse(
            Grants=[self._entry(g) for g in grants], NextMarker=next_marker, Truncated=truncated
        )

    @operation("CreateGrant", prepare=_prepare_create_grant)
    def create_grant(self, call: Call[CreateGrantRequest]) -> CreateGrantResponse:
        """CreateGrant: allow ``GranteePrincipal`` the listed operations on one key, optionally
        only under encryption-context constraints. Idempotent with ``Name``: the same request
        again returns the same GrantId (and a new token).

        Security contract: a caller allowed only by a grant carrying CreateGrant may create
        grants with at most that grant's operations and constraints at least as strict.
        """
        request, caller, key = call.request, call.caller, call.key
        operations = _operations(request)
        invalid = sorted(set(operations) - valid_grant_operations(key.key_spec, key.key_usage))
        if invalid:
            raise ValidationException(
                f"Grant operations {invalid} are not valid for a {key.key_spec} key with key "
                f"usage {key.key_usage}."
            )
        self._dry_run(request.DryRun)
        assert request.GranteePrincipal is not None  # checked by the prepare hook
        record = GrantRecord(
            grant_id=secrets.token_hex(32),
            key_id=key.key_id,
            name=request.Name,
            grantee_principal=request.GranteePrincipal,
            retiring_principal=request.RetiringPrincipal,
            operations=operations,
            constraints=constraints_to_text(*_constraints(request)),
            issuing_account=caller.account_id if caller is not None else self.account_id,
            created_at=self._clock(),
        )
        try:
            stored = self._store.create_grant(record, max_per_key=MAX_GRANTS_PER_KEY)
        except KeyMissing:
            raise self._not_found(key.key_id) from None
        except LimitReached:
            raise LimitExceededException(
                f"Too many grants for {key.arn}: at most {MAX_GRANTS_PER_KEY} per key."
            ) from None
        return CreateGrantResponse(
            GrantToken=grant_token(key.key_id, stored.grant_id), GrantId=stored.grant_id
        )

    @operation("ListGrants")
    def list_grants(self, call: Call[ListGrantsRequest]) -> ListGrantsResponse:
        """ListGrants: the grants of one key (Limit 1-100, default 50), optionally one GrantId
        or one GranteePrincipal; in every key state."""
        request = call.request
        page = self._store.list_grants(
            call.key.key_id,
            page_limit(request.Limit, 50),
            request.Marker,
            grant_id=request.GrantId,
            grantee_principal=request.GranteePrincipal,
        )
        return self._grant_page(page.items, page.next_marker, page.truncated)

    @operation("ListRetirableGrants")
    def list_retirable_grants(self, call: Call[ListRetirableGrantsRequest]) -> ListGrantsResponse:
        """ListRetirableGrants: grants (on any key of the account) naming this retiring
        principal. An account-level action, decided by identity policies."""
        request = call.request
        page = self._store.list_retirable_grants(
            request.RetiringPrincipal, page_limit(request.Limit, 50), request.Marker
        )
        return self._grant_page(page.items, page.next_marker, page.truncated)

    @operation("RetireGrant")
    def retire_grant(self, call: Call[RetireGrantRequest]) -> EmptyResponse:
        """RetireGrant: by GrantToken, or by KeyId + GrantId. Allowed to the grant's retiring
        principal, to its grantee when the grant includes RetireGrant, and to the root of the
        account that created it (spec: §4.4); key policies do not give this permission."""
        request, caller = call.request, call.caller
        if request.GrantToken is not None:
            key_id, grant_id = parse_grant_token(request.GrantToken)
        elif request.KeyId is not None and request.GrantId is not None:
            key_id = self._resolve_id(request.KeyId, aliases=False)
            grant_id = request.GrantId
            _check_grant_id(grant_id)
        else:
            raise ValidationException("Specify either GrantToken or both KeyId and GrantId.")
        key = self._resolve(key_id, aliases=False, access=Access.READ)
        grant = self._store.get_grant(key.key_id, grant_id)
        if grant is None:
            raise NotFoundException(f"Grant {grant_id} on {key.arn} does not exist.")
        if caller is not None:
            self._check_retiring(caller, grant, key.arn)
        self._dry_run(request.DryRun)
        if not self._store.delete_grant(key.key_id, grant_id):
            raise NotFoundException(f"Grant {grant_id} on {key.arn} does not exist.")
        return EmptyResponse()

    @staticmethod
    def _check_retiring(caller: Caller, grant: GrantRecord, key_arn: str) -> None:
        caller.note_key(key_arn)
        who = caller.principal_arn
        allowed = (
            who == grant.retiring_principal
            or (who == grant.grantee_principal and "RetireGrant" in grant.operations)
            or who == root_arn(grant.issuing_account)
        )
        if not allowed:
            raise AccessDeniedException(
                f"User: {who} is not authorized to perform: kms:RetireGrant on resource: "
                f"{key_arn} because the grant does not name it as retiring principal or "
                "as grantee allowed to retire it"
            )

    @operation("RevokeGrant", prepare=_prepare_revoke_grant)
    def revoke_grant(self, call: Call[RevokeGrantRequest]) -> EmptyResponse:
        """RevokeGrant: delete a grant (kms:RevokeGrant in the key policy: an administrator's
        action); in every key state."""
        request, key = call.request, call.key
        self._dry_run(request.DryRun)
        if not self._store.delete_grant(key.key_id, request.GrantId):
            raise NotFoundException(f"Grant {request.GrantId} on {key.arn} does not exist.")
        return EmptyResponse()
