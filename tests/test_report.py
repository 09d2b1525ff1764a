"""The signed key-custody report (``hsmkms report``): built from a real data directory (its
SoftHSM2 token and SQLite database), written as JSON, HTML and Markdown, validated against its
JSON Schema, verified, and refused after any edit; the custody verdict's rules; the access
summary decided by the policy engine."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cli_process
import jsonschema
import pytest
from clusters import XKS_ENV, KeyStoreSet, make_key_stores
from hypothesis import given, settings
from hypothesis import strategies as st
from local_system import open_system, settings_for
from policy_docs import separation_of_duties
from server import RunningServer, database_env, running_server

from conftest import ARTIFACTS
from hsmkms import models as m
from hsmkms.keystore.base import TokenIdentity
from hsmkms.report import ReportFormat, UnsignedDocument, schema, verify_document
from hsmkms.report.access import ActionGroup, Principal, group_actions, summarize_access
from hsmkms.report.custody import (
    CUSTODY_ATTRIBUTES,
    ObjectReading,
    Verdict,
    judge,
)
from hsmkms.report.signing import InvalidReportSignature
from hsmkms.service.testing import ManualClock
from hsmkms.store import GrantRecord
from hsmkms.store.key_stores import token_identity_of, trust_anchor_of
from hsmkms.system import OperatorService

pytestmark = [pytest.mark.hsm, pytest.mark.database]
# (the custom key store tests below also start servers: marked ``server`` one by one)

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
GOOD = {
    "TOKEN": True,
    "PRIVATE": True,
    "SENSITIVE": True,
    "ALWAYS_SENSITIVE": True,
    "EXTRACTABLE": False,
    "NEVER_EXTRACTABLE": True,
    "LOCAL": True,
    "MODIFIABLE": False,
    "COPYABLE": True,
    "DESTROYABLE": True,
    "ENCRYPT": True,
    "DECRYPT": True,
}


def hsmkms(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if "--data-dir" in args:  # on a PostgreSQL test run, the data directory's database
        env.update(database_env(Path(args[args.index("--data-dir") + 1]), None))
    return cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with keys: one rotated, one pending deletion, one disabled with an
    overdue rotation, one deleted (purged, with its records); and the root credentials."""
    from hsmkms.system import initialize

    path = tmp_path_factory.mktemp("report") / "data"
    initialize(settings_for(path))
    clock = ManualClock(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    with open_system(path, clock=clock, identity=True) as system:
        service = system.service
        operator = OperatorService(system, command="test")
        system.credentials.create("auditor", None)
        payments = service.create_key(m.CreateKeyRequest(Description="payments"), None)
        key_id = payments.KeyMetadata.KeyId
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/payments", TargetKeyId=key_id), None
        )
        service.enable_key_rotation(
            m.EnableKeyRotationRequest(KeyId=key_id, RotationPeriodInDays=90), None
        )
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id), None)
        operator.invoke(
            "GenerateDataKey", m.GenerateDataKeyRequest(KeyId=key_id, KeySpec="AES_256")
        )
        late = service.create_key(m.CreateKeyRequest(Description="late"), None).KeyMetadata.KeyId
        service.enable_key_rotation(
            m.EnableKeyRotationRequest(KeyId=late, RotationPeriodInDays=90), None
        )
        gone = service.create_key(m.CreateKeyRequest(Description="gone"), None).KeyMetadata.KeyId
        operator.invoke(
            "ScheduleKeyDeletion", m.ScheduleKeyDeletionRequest(KeyId=gone, PendingWindowInDays=7)
        )
    # Time passes: the rotation of "late" falls due while nobody runs the server; "gone" is
    # purged by a later run.
    clock.advance(days=120)
    with open_system(path, clock=clock) as system:
        system.service.purge_due()
    return path


@pytest.fixture(scope="module")
def reports(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    files = {}
    for fmt in ReportFormat.ALL:
        path = out / f"report.{fmt}"
        result = hsmkms("report", "--data-dir", str(data_dir), "--format", fmt, "--out", str(path))
        assert result.returncode == 0, result.stderr
        assert "signed by sha256:" in result.stderr
        files[fmt] = path
    return files


def _report(reports: dict[str, Path]) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(reports["json"].read_bytes())["report"]
    return value


def test_the_json_report_validates_against_its_schema(reports: dict[str, Path]) -> None:
    document = json.loads(reports["json"].read_bytes())
    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(document), key=lambda e: e.json_path)
    assert [f"{e.json_path}: {e.message}" for e in errors] == []


def test_the_schema_refuses_what_a_report_never_holds(reports: dict[str, Path]) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    document = json.loads(reports["json"].read_bytes())
    document["report"]["keys"][0]["custody"]["verdict"] = "PROBABLY_FINE"
    assert not validator.is_valid(document)
    document = json.loads(reports["json"].read_bytes())
    document["report"]["surprise"] = 1
    assert not validator.is_valid(document)


def test_every_key_version_reads_generated_in_the_hsm_never_extractable(
    reports: dict[str, Path],
) -> None:
    report = _report(reports)
    keys = {k["description"]: k for k in report["keys"]}
    assert set(keys) == {"payments", "late"}  # "gone" was purged
    payments = keys["payments"]
    assert payments["aliases"] == ["alias/payments"]
    assert [v["version"] for v in payments["versions"]] == [1, 2]
    assert payments["versions"][1]["rotationType"] == "ON_DEMAND"
    for key in keys.values():
        for version in key["versions"]:
            custody = version["custody"]
            assert custody["verdict"] == "GENERATED_IN_HSM_NEVER_EXTRACTABLE"
            assert custody["text"] == "generated in the HSM, never extractable"
            (obj,) = version["objects"]
            for name, value in GOOD.items():
                assert obj["attributes"][name] is value, name
            assert obj["permittedOperations"] == ["ENCRYPT", "DECRYPT"]
    assert report["summary"]["byVerdict"] == {"GENERATED_IN_HSM_NEVER_EXTRACTABLE": 2}


def test_rotation_on_time_and_overdue(reports: dict[str, Path]) -> None:
    keys = {k["description"]: k for k in _report(reports)["keys"]}
    assert keys["late"]["rotation"]["status"] == "OVERDUE"
    assert "days ago" in keys["late"]["rotation"]["detail"]
    # payments: its first automatic rotation was due after 90 days too (nobody ran the server)
    assert keys["payments"]["rotation"]["status"] == "OVERDUE"
    assert _report(reports)["summary"]["rotationOverdue"] == 2


def test_last_used_and_deleted_keys_come_from_the_audit_trail(reports: dict[str, Path]) -> None:
    report = _report(reports)
    keys = {k["description"]: k for k in report["keys"]}
    assert keys["payments"]["lastUsed"]["eventName"] == "GenerateDataKey"
    assert keys["late"]["lastUsed"] is None
    (deleted,) = report["deletedKeys"]
    assert deleted["purgeRecord"]["eventName"] == "DeleteKey"
    assert deleted["pendingWindowInDays"] == 7
    assert deleted["scheduledAt"] is not None
    assert report["auditTrail"]["status"] == "ok"
    assert report["auditTrail"]["records"] >= 3


def test_the_deployment_names_the_token(reports: dict[str, Path]) -> None:
    report = _report(reports)
    (store,) = report["deployment"]["keyStores"]
    token = store["token"]
    assert token["manufacturer"] == "SoftHSM project"
    assert token["firmwareVersion"]
    assert token["serial"]
    assert "AES_GCM" in token["mechanisms"]
    assert report["integrity"]["ok"] is True
    names = {p["name"] for p in report["principals"]}
    assert {"root", "auditor"} <= names


@pytest.mark.parametrize("fmt", ReportFormat.ALL)
def test_report_verify_accepts_the_file_as_written(
    data_dir: Path, reports: dict[str, Path], fmt: str
) -> None:
    result = hsmkms("report", "verify", str(reports[fmt]), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("report intact:")


def _edits(data: bytes) -> Iterator[tuple[str, bytes]]:
    """A handful of edits anywhere in a file: a changed word, a flipped byte at several
    places, a line added at the end, whitespace added, the signature removed."""
    yield "verdict", data.replace(b"never extractable", b"never extractible", 1)
    for at in (0.1, 0.5, 0.9):
        i = int(len(data) * at)
        yield f"byte {i}", data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
    yield "appended", data + b"\n"
    yield "space", data.replace(b",", b", ", 1)
    yield "truncated", data[: len(data) // 2]


@pytest.mark.parametrize("fmt", ReportFormat.ALL)
def test_any_edit_fails_verification(reports: dict[str, Path], fmt: str) -> None:
    data = reports[fmt].read_bytes()
    verify_document(data)
    for _what, edited in _edits(data):
        assert edited != data
        with pytest.raises((InvalidReportSignature, UnsignedDocument)):
            verify_document(edited)


@pytest.mark.parametrize("fmt", ReportFormat.ALL)
def test_report_verify_exits_non_zero_on_an_edit(
    data_dir: Path, reports: dict[str, Path], fmt: str, tmp_path: Path
) -> None:
    edited = tmp_path / f"edited.{fmt}"
    edited.write_bytes(reports[fmt].read_bytes().replace(b"payments", b"paymentz", 1))
    result = hsmkms("report", "verify", str(edited), "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "edited after signing" in result.stderr
    assert "Traceback" not in result.stderr


@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_a_single_bit_anywhere_is_caught(
    reports: dict[str, Path], position: float, bit: int
) -> None:
    data = reports["json"].read_bytes()
    i = int(len(data) * position)
    edited = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
    with pytest.raises((InvalidReportSignature, UnsignedDocument)):
        verify_document(edited)


def test_a_public_key_on_a_curve_nobody_knows_is_refused(reports: dict[str, Path]) -> None:
    """Found by the bit-flip test above (one bit of the public key's base64): the key's DER
    still parses but names the curve 0.38.840.10045.3.1.7, which cryptography refuses with
    UnsupportedAlgorithm. That escaped verify_document instead of refusing the document."""
    data = reports["json"].read_bytes()
    public_text = json.loads(data)["signature"]["publicKey"]
    der = base64.b64decode(public_text)
    p256 = bytes.fromhex("2a8648ce3d030107")  # the OID 1.2.840.10045.3.1.7 (P-256)
    assert p256 in der
    forged = base64.b64encode(der.replace(p256, bytes.fromhex("268648ce3d030107"))).decode()
    edited = data.replace(public_text.encode(), forged.encode())
    with pytest.raises(UnsignedDocument, match="not a P-256 key"):
        verify_document(edited)


def test_a_report_re_signed_by_another_key_is_refused(
    data_dir: Path, reports: dict[str, Path], tmp_path: Path
) -> None:
    """A forger edits the report and signs it with a key of their own (its public key in the
    file): the signature is valid, but it is not the token's report key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    forger = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        forger.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    data = reports["md"].read_bytes()
    body = data[: data.rindex(b"<!-- hsmkms-report-signature")].replace(b"payments", b"paymentz")
    signed = body + f"<!-- hsmkms-report-signature v1 ECDSA_SHA_256 {public} ".encode()
    signature = base64.b64encode(forger.sign(signed, ec.ECDSA(hashes.SHA256()))).decode()
    forged = tmp_path / "forged.md"
    forged.write_bytes(signed + signature.encode() + b" -->\n")
    assert verify_document(forged.read_bytes()).public_key != b""
    result = hsmkms("report", "verify", str(forged), "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "not a report signing key of token" in result.stderr


def test_verify_with_a_pinned_public_key_needs_no_token(
    data_dir: Path, reports: dict[str, Path], tmp_path: Path
) -> None:
    key = hsmkms("report", "key", "--data-dir", str(data_dir))
    assert key.returncode == 0, key.stderr
    assert key.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    pem = tmp_path / "report-key.pem"
    pem.write_text(key.stdout)
    result = hsmkms(
        "report",
        "verify",
        str(reports["html"]),
        "--public-key",
        str(pem),
        "--data-dir",
        str(tmp_path / "no-such-dir"),
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "no-such-dir").exists()


def test_verify_refuses_what_is_not_a_report(tmp_path: Path, data_dir: Path) -> None:
    for name, content in (
        ("empty", b""),
        ("text", b"hello\n"),
        ("json", b'{"report": {}}\n'),
        ("html", b"<!DOCTYPE html><html></html>\n"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        result = hsmkms("report", "verify", str(path), "--data-dir", str(data_dir))
        assert result.returncode == 1, name
        assert "not a signed report" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_report_of_named_keys_and_an_unknown_key(
    data_dir: Path, reports: dict[str, Path]
) -> None:
    out = hsmkms(
        "report", "--data-dir", str(data_dir), "--format", "json", "--key-id", "alias/payments"
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["report"]
    assert [k["description"] for k in report["keys"]] == ["payments"]
    assert report["scope"]["keyIds"] == [report["keys"][0]["keyId"]]
    missing = hsmkms("report", "--data-dir", str(data_dir), "--key-id", "alias/nothing")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "hsmkms report: no key alias/nothing"


def test_a_missing_token_object_is_reported_as_missing(tmp_path: Path) -> None:
    with open_system(tmp_path / "data") as system:
        key_id = system.service.create_key(m.CreateKeyRequest(), None).KeyMetadata.KeyId
        version = system.store.get_version(key_id, 1)
        assert version is not None
        from hsmkms.keystore.base import KeyMaterialRef

        system.keystore.destroy(KeyMaterialRef.from_str(version.material_ref))
    out = hsmkms("report", "--data-dir", str(tmp_path / "data"), "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["report"]
    (key,) = report["keys"]
    assert key["custody"]["verdict"] == "MISSING"
    assert "is not on the token" in key["versions"][0]["custody"]["reasons"][0]
    assert report["integrity"]["missingObjects"] == [{"keyId": key_id, "version": 1}]


# -- the verdict's rules (pure) --------------------------------------------------------------


def _reading(**changes: bool | None) -> ObjectReading:
    return ObjectReading("a", "ab" * 16, "SECRET_KEY", {**GOOD, **changes})


def test_verdict_of_hardened_material() -> None:
    custody = judge([_reading()], origin="AWS_KMS")
    assert custody.verdict is Verdict.GENERATED_NEVER_EXTRACTABLE
    assert custody.reasons == ()


def test_verdict_of_imported_material_says_local_false() -> None:
    custody = judge(
        [_reading(LOCAL=False, NEVER_EXTRACTABLE=False, ALWAYS_SENSITIVE=False)], origin="EXTERNAL"
    )
    assert custody.verdict is Verdict.NOT_EXTRACTABLE
    assert custody.text == "imported into the HSM; not extractable now"
    assert any("CKA_LOCAL false" in r and "Origin EXTERNAL" in r for r in custody.reasons)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"EXTRACTABLE": True}, "CKA_EXTRACTABLE true"),
        ({"SENSITIVE": False}, "CKA_SENSITIVE false"),
        ({"TOKEN": False}, "CKA_TOKEN false"),
    ],
)
def test_verdict_of_material_that_can_leave(change: dict[str, bool], reason: str) -> None:
    custody = judge([_reading(**change)], origin="AWS_KMS")
    assert custody.verdict is Verdict.EXTRACTABLE
    assert any(reason in r for r in custody.reasons)


def test_verdict_when_the_token_does_not_report_an_attribute() -> None:
    custody = judge([_reading(NEVER_EXTRACTABLE=None)], origin="AWS_KMS")
    assert custody.verdict is Verdict.UNVERIFIED
    assert "the token does not report CKA_NEVER_EXTRACTABLE" in custody.reasons


def test_verdict_of_an_unconnected_store_and_of_external_material() -> None:
    assert (
        judge([], origin="AWS_KMS", unavailable="key store 'x' is not connected").verdict
        is Verdict.UNVERIFIED
    )
    from hsmkms.report.custody import Placement

    external = judge([], origin="EXTERNAL_KEY_STORE", placement=Placement.EXTERNAL)
    assert external.verdict is Verdict.UNVERIFIED
    assert "external key manager" in external.text


@given(
    st.fixed_dictionaries(
        {name: st.sampled_from([True, False, None]) for name in CUSTODY_ATTRIBUTES}
    )
)
def test_the_best_verdict_needs_every_custody_attribute(attributes: dict[str, bool | None]) -> None:
    """GENERATED_IN_HSM_NEVER_EXTRACTABLE exactly when the seven custody attributes hold;
    MODIFIABLE, COPYABLE and DESTROYABLE never make it worse."""
    custody = judge([ObjectReading("a", "00", "SECRET_KEY", attributes)], origin="AWS_KMS")
    required = {k: GOOD[k] for k in CUSTODY_ATTRIBUTES[:7]}
    best = all(attributes[k] is v for k, v in required.items())
    assert (custody.verdict is Verdict.GENERATED_NEVER_EXTRACTABLE) == best
    can_leave = (
        attributes["EXTRACTABLE"] is True
        or attributes["SENSITIVE"] is False
        or attributes["TOKEN"] is False
    )
    assert (custody.verdict is Verdict.EXTRACTABLE) == can_leave


# -- the access summary (the policy engine) -----------------------------------------------------


KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _summary(
    policy: str, principals: list[Principal], grants: list[GrantRecord] | None = None
) -> dict[ActionGroup, dict[str, tuple[str, ...]]]:
    access = summarize_access(
        key_arn=KEY_ARN,
        key_spec="SYMMETRIC_DEFAULT",
        key_usage="ENCRYPT_DECRYPT",
        policy_text=policy,
        principals=principals,
        grants=grants or [],
    )
    return {g.group: {p.arn: p.actions for p in g.principals} for g in access.groups}


def test_separation_of_duties_is_summarized_by_the_engine() -> None:
    policy = separation_of_duties()
    admin, user = f"arn:aws:iam::{ACCOUNT}:user/KeyAdmin", f"arn:aws:iam::{ACCOUNT}:user/KeyUser"
    everything = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
        }
    )
    summary = _summary(
        policy, [Principal(ROOT), Principal(admin, everything), Principal(user, everything)]
    )
    use = group_actions("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")[ActionGroup.USE]
    assert summary[ActionGroup.USE][user] == use
    assert admin not in summary[ActionGroup.USE]  # the Deny holds despite kms:* in IAM
    assert user not in summary[ActionGroup.ADMINISTER]
    assert "kms:ScheduleKeyDeletion" in summary[ActionGroup.ADMINISTER][admin]
    assert "kms:CreateGrant" not in summary[ActionGroup.ADMINISTER][admin]


def test_a_grant_adds_use_and_constraints_make_it_conditional() -> None:
    grantee = f"arn:aws:iam::{ACCOUNT}:user/app"
    grant = GrantRecord(
        "ab" * 32,
        "k",
        None,
        grantee,
        None,
        ("Decrypt",),
        '{"EncryptionContextSubset":{"app":"x"}}',
        ACCOUNT,
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    from hsmkms.policy import default_key_policy

    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "root",
                    "Effect": "Allow",
                    "Principal": {"AWS": ROOT},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
    )
    access = summarize_access(
        key_arn=KEY_ARN,
        key_spec="SYMMETRIC_DEFAULT",
        key_usage="ENCRYPT_DECRYPT",
        policy_text=policy,
        principals=[Principal(ROOT), Principal(grantee)],
        grants=[grant],
    )
    use = next(g for g in access.groups if g.group is ActionGroup.USE)
    app = next(p for p in use.principals if p.arn == grantee)
    assert app.actions == ("kms:Decrypt",)
    assert app.conditional == ("kms:Decrypt",)
    assert any(v.startswith("grant ") for v in app.via)
    assert default_key_policy(ACCOUNT)  # the default policy delegates to identity policies
    assert use.identity_policies_may_grant is True
    assert use.other_accounts is False


def test_a_condition_makes_a_decision_conditional_and_another_account_is_flagged() -> None:
    user = f"arn:aws:iam::{ACCOUNT}:user/ctx"
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "root",
                    "Effect": "Allow",
                    "Principal": {"AWS": ROOT},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Sid": "ctx",
                    "Effect": "Allow",
                    "Principal": {"AWS": user},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": {"StringEquals": {"kms:EncryptionContext:app": "billing"}},
                },
                {
                    "Sid": "partner",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::444455556666:root"},
                    "Action": "kms:Encrypt",
                    "Resource": "*",
                },
            ],
        }
    )
    access = summarize_access(
        key_arn=KEY_ARN,
        key_spec="SYMMETRIC_DEFAULT",
        key_usage="ENCRYPT_DECRYPT",
        policy_text=policy,
        grants=[],
        principals=[Principal(ROOT), Principal(user), Principal("arn:aws:iam::444455556666:root")],
    )
    use = next(g for g in access.groups if g.group is ActionGroup.USE)
    ctx = next(p for p in use.principals if p.arn == user)
    assert ctx.actions == ("kms:Decrypt",)
    assert ctx.conditional == ("kms:Decrypt",)
    assert use.other_accounts is True
    assert any("other accounts" in f for f in access.findings)


# -- custom key stores ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreReports:
    server: RunningServer
    stores: KeyStoreSet
    default_key: str
    files: dict[str, Path]
    disconnected: dict[str, Any]
    """The JSON report once the AWS_CLOUDHSM store was disconnected."""


def _server_report(server: RunningServer, path: Path, fmt: str) -> None:
    result = server.cli("report", "--format", fmt, "--out", str(path))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def store_reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreReports]:
    """A server with a CONNECTED AWS_CLOUDHSM store on a second SoftHSM2 token, a FAILED one
    (wrong password), a CONNECTED EXTERNAL_KEY_STORE (another server its XKS proxy), a key in
    each connected store and one in the default token; its reports in every format, and one
    more after the AWS_CLOUDHSM store was disconnected. The reports are kept in
    ``.artifacts/report/``."""
    base = tmp_path_factory.mktemp("report-stores")
    with (
        running_server(base / "proxy") as proxy,
        running_server(base / "data", env=XKS_ENV) as server,
    ):
        stores = make_key_stores(server, proxy, "audit")
        default_key = server.client().create_key(Description="at home")["KeyMetadata"]["KeyId"]
        files = {}
        for fmt in ReportFormat.ALL:
            files[fmt] = base / f"stores.{fmt}"
            _server_report(server, files[fmt], fmt)
        kept = ARTIFACTS / "report"  # for a person to look at
        kept.mkdir(parents=True, exist_ok=True)
        for fmt, path in files.items():
            shutil.copyfile(path, kept / f"custom-key-stores.{fmt}")
        server.client().disconnect_custom_key_store(CustomKeyStoreId=stores.cloudhsm)
        _server_report(server, base / "disconnected.json", "json")
        disconnected = json.loads((base / "disconnected.json").read_bytes())["report"]
        yield StoreReports(server, stores, default_key, files, disconnected)


def _stores_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in report["deployment"]["keyStores"]}


@pytest.mark.server
def test_the_report_with_custom_key_stores_validates_against_its_schema(
    store_reports: StoreReports,
) -> None:
    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    for path in (store_reports.files["json"],):
        document = json.loads(path.read_bytes())
        assert document["report"]["formatVersion"] == 2
        errors = sorted(validator.iter_errors(document), key=lambda e: e.json_path)
        assert [f"{e.json_path}: {e.message}" for e in errors] == []
    wrapped = {"report": store_reports.disconnected, "signature": document["signature"]}
    assert [e.message for e in validator.iter_errors(wrapped)] == []


@pytest.mark.server
def test_every_key_store_is_listed_with_its_state_token_and_key_count(
    store_reports: StoreReports,
) -> None:
    s = store_reports.stores
    stores = _stores_of(_report(store_reports.files))
    assert set(stores) == {"default", s.cloudhsm, s.failed, s.external}

    default = stores["default"]
    assert (default["default"], default["type"], default["connectionState"]) == (True, None, None)
    assert default["connected"] is True
    assert default["keys"] == 1  # the external store's key is counted there
    assert default["token"]["label"] == "hsmkms"

    vault = stores[s.cloudhsm]
    assert vault["name"] == "audit vault"
    assert vault["type"] == "AWS_CLOUDHSM"
    assert vault["kind"] == "PKCS11_TOKEN"
    assert (vault["connectionState"], vault["connectionErrorCode"]) == ("CONNECTED", None)
    assert vault["connected"] is True
    assert vault["keys"] == 1
    assert vault["createdAt"]
    assert vault["xksProxy"] is None
    cluster = vault["cluster"]
    assert cluster["cloudHsmClusterId"] == s.cluster_id
    assert cluster["registered"] is True
    assert cluster["pkcs11Uri"].startswith(f"pkcs11:token={s.label}?")
    recorded = token_identity_of(s.anchor)
    assert recorded is not None
    assert cluster["trustAnchor"] == dataclasses.asdict(recorded)
    assert cluster["trustAnchor"]["label"] == s.label
    assert cluster["tokenMatchesTrustAnchor"] is True
    # Its own token, read now: another serial than the default token's.
    assert vault["token"]["serial"] == recorded.serial != default["token"]["serial"]
    assert vault["token"]["label"] == s.label

    broken = stores[s.failed]
    assert (broken["connectionState"], broken["connectionErrorCode"]) == (
        "FAILED",
        "INVALID_CREDENTIALS",
    )
    assert broken["connected"] is False
    assert broken["token"] is None
    assert broken["keys"] == 0
    assert broken["cluster"]["cloudHsmClusterId"] == s.failed_cluster_id
    assert broken["cluster"]["tokenMatchesTrustAnchor"] is None

    outside = stores[s.external]
    assert outside["type"] == outside["kind"] == "EXTERNAL_KEY_STORE"
    assert (outside["connectionState"], outside["connected"]) == ("CONNECTED", True)
    assert outside["cluster"] is None
    assert outside["token"] is None
    assert outside["keys"] == 1
    assert outside["xksProxy"] == {
        "uriEndpoint": s.proxy_endpoint,
        "uriPath": s.proxy_path,
        "accessKeyId": s.xks_access_key_id,
        "connectivity": "PUBLIC_ENDPOINT",
    }


@pytest.mark.server
def test_each_key_names_its_store_cluster_or_external_key(store_reports: StoreReports) -> None:
    s = store_reports.stores
    keys = {k["keyId"]: k for k in _report(store_reports.files)["keys"]}
    vault = keys[s.cloudhsm_key]
    assert (vault["customKeyStoreId"], vault["cloudHsmClusterId"], vault["xksKeyId"]) == (
        s.cloudhsm,
        s.cluster_id,
        None,
    )
    assert vault["origin"] == "AWS_CLOUDHSM"
    assert vault["keyStore"] == s.cloudhsm
    # Its attributes were read from the second token.
    assert vault["custody"]["verdict"] == "GENERATED_IN_HSM_NEVER_EXTRACTABLE"
    assert vault["versions"][0]["objects"]
    outside = keys[s.external_key]
    assert (outside["customKeyStoreId"], outside["cloudHsmClusterId"], outside["xksKeyId"]) == (
        s.external,
        None,
        s.xks_key_id,
    )
    assert outside["keyStore"] == "default"  # the inner layer
    home = keys[store_reports.default_key]
    assert (home["customKeyStoreId"], home["cloudHsmClusterId"], home["xksKeyId"]) == (
        None,
        None,
        None,
    )


@pytest.mark.server
def test_the_html_and_markdown_reports_show_the_stores(store_reports: StoreReports) -> None:
    s = store_reports.stores
    for fmt in ("html", "md"):
        text = store_reports.files[fmt].read_text()
        for fact in (
            s.cloudhsm,
            s.failed,
            s.external,
            s.cluster_id,
            s.failed_cluster_id,
            "INVALID_CREDENTIALS",
            s.xks_access_key_id,
            s.xks_key_id,
            "AWS_CLOUDHSM",
            s.proxy_endpoint + s.proxy_path,
        ):
            shown = fact.replace("_", "\\_") if fmt == "md" else fact  # Markdown escapes _
            assert shown in text, (fmt, fact)
        recorded = token_identity_of(s.anchor)
        assert recorded is not None
        assert recorded.serial in text


@pytest.mark.server
def test_no_store_password_or_xks_secret_is_in_any_report(store_reports: StoreReports) -> None:
    assert len(store_reports.stores.secrets) == 3
    for path in (*store_reports.files.values(),):
        data = path.read_bytes()
        for secret in store_reports.stores.secrets:
            assert secret.encode() not in data, path.name
            assert base64.b64encode(secret.encode()) not in data, path.name
    text = json.dumps(store_reports.disconnected)
    assert not any(secret in text for secret in store_reports.stores.secrets)


@pytest.mark.server
def test_a_disconnected_store_reads_as_such_and_its_keys_unverified(
    store_reports: StoreReports,
) -> None:
    s = store_reports.stores
    vault = _stores_of(store_reports.disconnected)[s.cloudhsm]
    assert (vault["connectionState"], vault["connected"], vault["token"]) == (
        "DISCONNECTED",
        False,
        None,
    )
    assert vault["keys"] == 1
    assert vault["cluster"]["trustAnchor"]["label"] == s.label
    key = next(k for k in store_reports.disconnected["keys"] if k["keyId"] == s.cloudhsm_key)
    assert key["customKeyStoreId"] == s.cloudhsm
    assert key["custody"]["verdict"] == "UNVERIFIED"


@pytest.mark.server
@pytest.mark.parametrize("fmt", ReportFormat.ALL)
def test_an_edit_of_a_key_store_fails_verification(
    store_reports: StoreReports, fmt: str, tmp_path: Path
) -> None:
    s = store_reports.stores
    data = store_reports.files[fmt].read_bytes()
    assert (
        store_reports.server.cli("report", "verify", str(store_reports.files[fmt])).returncode == 0
    )
    for before, after in (
        (b"FAILED", b"PASSED"),
        (s.cluster_id.encode(), s.cluster_id[:-1].encode() + b"z"),
        (s.proxy_path.encode(), b"/elsewhere/kms/xks/v1"),
    ):
        assert before in data, before
        edited = tmp_path / f"edited.{fmt}"
        edited.write_bytes(data.replace(before, after, 1))
        result = store_reports.server.cli("report", "verify", str(edited))
        assert result.returncode == 1, before
        assert "edited after signing" in result.stderr


def test_a_trust_anchor_is_read_back_only_when_unaltered() -> None:
    identity = TokenIdentity("SoftHSM project", "SoftHSM v2", "1c0b5e3d9a7f2b44", "store-a")
    anchor = trust_anchor_of(identity)
    assert token_identity_of(anchor) == identity
    lines = anchor.splitlines()
    body = json.loads(base64.b64decode("".join(lines[1:-1])))
    body["serial"] = "0000000000000000"  # the token's facts changed, the digest not
    forged = base64.b64encode(json.dumps(body).encode()).decode()
    assert token_identity_of("\n".join([lines[0], forged, lines[-1]])) is None
    assert token_identity_of("not an anchor") is None
    assert token_identity_of(anchor.replace("TOKEN IDENTITY", "CERTIFICATE")) is None
