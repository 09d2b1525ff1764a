"""Grants, the pure part: whether a grant allows a request.

Which operations a grant may carry for which key types is a fact of the operations
(:mod:`hsmkms.service.operations`). A grant allows its grantee the listed operations on one
key (reference §4.4). Constraints narrow the EC-bearing operations: ``EncryptionContextEquals``
(the request's encryption context must be exactly the constraint) and
``EncryptionContextSubset`` (the request's context must contain every constraint pair). Keys
are compared case-insensitively, values exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


def _folded(context: Mapping[str, str]) -> dict[str, str] | None:
    """Keys folded to lower case; None when two keys collide (never equal to anything)."""
    folded: dict[str, str] = {}
    for key, value in context.items():
        lowered = key.lower()
        if lowered in folded:
            return None
        folded[lowered] = value
    return folded


@dataclass(frozen=True)
class GrantConstraints:
    """A grant's Constraints. Either, both or neither may be set."""

    encryption_context_equals: Mapping[str, str] | None = field(default=None)
    encryption_context_subset: Mapping[str, str] | None = field(default=None)

    @property
    def empty(self) -> bool:
        """True when the grant carries no constraint."""
        return self.encryption_context_equals is None and self.encryption_context_subset is None

    def allow(self, encryption_context: Mapping[str, str]) -> bool:
        """True when a request with this encryption context satisfies every constraint."""
        request = _folded(encryption_context)
        if request is None:
            return self.empty
        equals = self.encryption_context_equals
        if equals is not None and _folded(equals) != request:
            return False
        if self.encryption_context_subset is not None:
            subset = _folded(self.encryption_context_subset)
            if subset is None or any(request.get(k) != v for k, v in subset.items()):
                return False
        return True

    def at_least_as_strict(self, child: GrantConstraints) -> bool:
        """True when every encryption context ``child`` allows is one this grant allows.

        spec: a constrained grant that allows CreateGrant only permits child grants with
        equally or more strict constraints (reference §4.4).
        """
        if self.empty:
            return True
        if child.encryption_context_equals is not None:
            # The child admits exactly one context (if any): check that one.
            return child.allow(child.encryption_context_equals) is False or self.allow(
                child.encryption_context_equals
            )
        if child.encryption_context_subset is None or self.encryption_context_equals is not None:
            return False
        parent = _folded(self.encryption_context_subset or {})
        mine = _folded(child.encryption_context_subset)
        if parent is None or mine is None:
            return False
        return all(mine.get(k) == v for k, v in parent.items())


def _operation(action: str) -> str:
    return action[len("kms:") :] if action.lower().startswith("kms:") else action


def grant_allows(
    grant_operations: Collection[str],
    constraints: GrantConstraints | None,
    action: str,
    encryption_context: Mapping[str, str] | None,
    *,
    bound_to_context: bool,
    child_constraints: GrantConstraints | None = None,
) -> bool:
    """True when a grant with these operations and constraints allows ``action``.

    ``action`` is ``kms:Decrypt`` or ``Decrypt``; for ReEncrypt pass ``ReEncryptFrom`` (on the
    source key) and ``ReEncryptTo`` (on the destination key). Constraints restrict only the
    operations that take an encryption context (``bound_to_context``: the service's operation
    descriptors say which); for CreateGrant a constrained grant further requires
    ``child_constraints`` to be at least as strict.
    """
    operation = _operation(action)
    if operation not in grant_operations:
        return False
    if constraints is None or constraints.empty:
        return True
    if bound_to_context:
        return constraints.allow(encryption_context or {})
    if operation == "CreateGrant":
        return child_constraints is not None and constraints.at_least_as_strict(child_constraints)
    return True
