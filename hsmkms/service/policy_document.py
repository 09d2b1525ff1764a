"""Key policy documents: the default policy and the checks PutKeyPolicy/CreateKey make.

Evaluation (who may do what) is the authorization layer's business; this module only keeps
documents well-formed (reference §4.1).
"""

from __future__ import annotations

import json
from typing import Any

from hsmkms.errors import LimitExceededException, MalformedPolicyDocumentException

MAX_POLICY_BYTES = 32768
"""spec: a key policy is at most 32 KB (32,768 bytes), not adjustable (§4.1)."""

_TOP_LEVEL = {"Version", "Id", "Statement"}
_STATEMENT = {
    "Sid",
    "Effect",
    "Principal",
    "NotPrincipal",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
}
_VERSIONS = {"2012-10-17", "2008-10-17"}


def default_policy(account_id: str) -> str:
    """The default key policy of an API-created key, exactly as AWS's (§4.1)."""
    document = {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    return json.dumps(document, separators=(",", ":"))


def _malformed(reason: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(reason)


def _check_statement(statement: Any, index: int, sids: set[str]) -> None:
    if not isinstance(statement, dict):
        raise _malformed(f"Statement {index} is not a JSON object.")
    unknown = set(statement) - _STATEMENT
    if unknown:
        raise _malformed(f"Statement {index} has unsupported element(s): {sorted(unknown)}.")
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise _malformed(f"Statement {index} must have an Effect of Allow or Deny.")
    if "Principal" not in statement and "NotPrincipal" not in statement:
        raise _malformed(f"Statement {index} has no Principal.")
    sid = statement.get("Sid")
    if sid is not None:
        if not isinstance(sid, str):
            raise _malformed(f"Statement {index} has a Sid that is not a string.")
        if sid in sids:
            raise _malformed(f"Statement ids must be unique: {sid!r} appears twice.")
        sids.add(sid)
    for element in ("Action", "NotAction", "Resource", "NotResource"):
        value = statement.get(element)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise _malformed(f"Statement {index} has an invalid {element}.")
    condition = statement.get("Condition")
    if condition is not None and not isinstance(condition, dict):
        raise _malformed(f"Statement {index} has a Condition that is not a JSON object.")


def check_policy(text: str) -> None:
    """Raise LimitExceededException (over 32 KB) or MalformedPolicyDocumentException (not a
    JSON policy with at least one well-formed statement)."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise LimitExceededException(
            f"Key policy exceeds the maximum size of {MAX_POLICY_BYTES} bytes."
        )
    try:
        document = json.loads(text)
    except ValueError:
        raise _malformed("The policy is not valid JSON.") from None
    if not isinstance(document, dict):
        raise _malformed("The policy must be a JSON object.")
    unknown = set(document) - _TOP_LEVEL
    if unknown:
        raise _malformed(f"The policy has unsupported element(s): {sorted(unknown)}.")
    version = document.get("Version")
    if version is not None and version not in _VERSIONS:
        raise _malformed(f"The policy Version {version!r} is not supported.")
    statements = document.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise _malformed("The policy must have at least one Statement.")
    sids: set[str] = set()
    for index, statement in enumerate(statements, start=1):
        _check_statement(statement, index, sids)
