"""The XKS proxy's secondary authorization question (:func:`hsmkms.identity.xks.secondary_request`)
for any requestMetadata a client can send: never an error, and decided as written."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from hsmkms.identity.xks import secondary_request
from hsmkms.policy.document import parse_policy
from hsmkms.policy.evaluate import Outcome, evaluate

ROLE = "arn:aws:iam::111122223333:role/app"
KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
POLICY = parse_policy(
    json.dumps(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ROLE},
                    "Action": "kms:Encrypt",
                    "Resource": KEY,
                    "Condition": {
                        "StringEquals": {"kms:ViaService": "ebs", "xks:Operation": "Encrypt"}
                    },
                }
            ]
        }
    )
)
MEMBERS = ("awsPrincipalArn", "kmsOperation", "kmsKeyArn", "kmsViaService", "awsSourceVpc")


@given(st.dictionaries(st.sampled_from(MEMBERS), st.text(max_size=80)), st.text(max_size=20))
def test_any_metadata_is_a_question_the_policy_answers(
    metadata: dict[str, str], operation: str
) -> None:
    decision = evaluate(POLICY, secondary_request(operation, metadata))
    expected = (
        metadata.get("awsPrincipalArn") == ROLE
        and metadata.get("kmsOperation", "").lower() == "encrypt"
        and metadata.get("kmsKeyArn") == KEY
        and metadata.get("kmsViaService") == "ebs"
        and operation == "Encrypt"
    )
    assert (decision.outcome is Outcome.ALLOW) is expected


def test_the_allowed_request() -> None:
    metadata = {"awsPrincipalArn": ROLE, "kmsOperation": "Encrypt", "kmsKeyArn": KEY,
                "kmsViaService": "ebs"}  # fmt: skip
    assert evaluate(POLICY, secondary_request("Encrypt", metadata)).outcome is Outcome.ALLOW
    assert evaluate(POLICY, secondary_request("Decrypt", metadata)).outcome is not Outcome.ALLOW
