"""The report's signing key, inside the token, and the signature every report format carries.

The key: an ECC_NIST_P256 key pair for signing, made on first use in the default key store with
the same hardened template as every key (sensitive, never extractable, private key SIGN only),
labelled ``hsmkms:report`` (:data:`REPORT_KEY_NAME`). It is found on the token by that label,
never through the database: the database is not trusted, the token is. Should two first reports
race and make two such keys, both are report keys of the token and either verifies.

The signature (``docs/report.md``, "Signature"): ECDSA with SHA-256 (DER) over the file's bytes
up to the signature value, which comes last:

- JSON: the file is the canonical JSON of ``{"report": ..., "signature": {...}}`` and a newline;
  ``signature`` sorts after ``report`` and ``value`` last inside it, so the file ends with
  ``"value":"<base64>"}}`` + newline. Signed: every byte before ``<base64>``.
- HTML and Markdown: the last line is
  ``<!-- hsmkms-report-signature v1 ECDSA_SHA_256 <public key> <base64> -->``. Signed: every
  byte before ``<base64>`` (the public key included).

So any edit — a byte of the text, the public key, whitespace, a line added after the signature —
fails verification. :func:`verify_document` checks the signature with the public key in the
file (no token needed); :func:`trusted` says whether that key is one to trust.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections.abc import Collection
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsmkms.keystore.base import DEFAULT_STORE, KeyMaterialRef, Keystore, MaterialName
from hsmkms.keystore.specs import KeyMaterialSpec, MaterialUsage, SigningAlgorithm
from hsmkms.profiles import ObjectRole

__all__ = [
    "ALGORITHM",
    "REPORT_KEY_NAME",
    "DocumentSignature",
    "InvalidReportSignature",
    "ReportFormat",
    "SigningKey",
    "UnsignedDocument",
    "find_signing_keys",
    "fingerprint",
    "html_trailer_prefix",
    "public_key_pem",
    "signing_key",
    "verify_document",
]

REPORT_KEY_NAME: Final = "report"
ALGORITHM: Final = SigningAlgorithm.ECDSA_SHA_256
_SPEC: Final = KeyMaterialSpec.ECC_NIST_P256
_TRAILER: Final = re.compile(
    rb"<!-- hsmkms-report-signature v1 (?P<alg>[A-Z0-9_]+) (?P<key>[A-Za-z0-9+/=]+) "
    rb"(?P<sig>[A-Za-z0-9+/=]*) -->\n\Z"
)
_JSON_VALUE: Final = b'"value":"'
_JSON_END: Final = b'"}}\n'
_MAX_SIGNATURE: Final = 1024


class ReportFormat:
    """The formats a report is written in."""

    JSON = "json"
    HTML = "html"
    MARKDOWN = "md"
    ALL = (JSON, HTML, MARKDOWN)


class UnsignedDocument(ValueError):
    """The file is not a signed report, or its signature block is malformed."""


def fingerprint(public_key_der: bytes) -> str:
    """``sha256:<hex>`` of a DER SubjectPublicKeyInfo: how the report names its signing key."""
    return "sha256:" + hashlib.sha256(public_key_der).hexdigest()


def public_key_pem(public_key_der: bytes) -> str:
    """The PEM text of a DER SubjectPublicKeyInfo."""
    key = serialization.load_der_public_key(public_key_der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """The token's report signing key: its reference, public key and fingerprint."""

    ref: KeyMaterialRef
    public_key: bytes
    """DER SubjectPublicKeyInfo."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, keystore: Keystore, data: bytes) -> bytes:
        """ECDSA-SHA-256 over ``data``, computed inside the token (DER)."""
        return keystore.sign(self.ref, hashlib.sha256(data).digest(), ALGORITHM)


def find_signing_keys(keystore: Keystore) -> list[SigningKey]:
    """Every report signing key on the token (by label), oldest object id first."""
    label = MaterialName.service_key(REPORT_KEY_NAME).label(ObjectRole.KEY_PAIR)
    ids = sorted(
        {
            o.object_id
            for o in keystore.list_objects()
            if o.label == label and o.object_class == "PRIVATE_KEY"
        }
    )
    keys = []
    for object_id in ids:
        ref = KeyMaterialRef(_SPEC, None, (object_id,), DEFAULT_STORE)
        keys.append(SigningKey(ref, keystore.public_key(ref)))
    return keys


def signing_key(keystore: Keystore, *, create: bool = True) -> SigningKey | None:
    """The token's report signing key; made on first use when ``create`` (else None)."""
    found = find_signing_keys(keystore)
    if found:
        return found[0]
    if not create:
        return None
    ref = keystore.create(
        _SPEC, MaterialName.service_key(REPORT_KEY_NAME), usage=MaterialUsage.SIGN_VERIFY
    )
    return SigningKey(ref, keystore.public_key(ref))


def html_trailer_prefix(key: SigningKey) -> bytes:
    """The signed start of the last line of an HTML or Markdown report."""
    public = base64.b64encode(key.public_key).decode("ascii")
    return f"<!-- hsmkms-report-signature v1 {ALGORITHM.value} {public} ".encode("ascii")


@dataclasses.dataclass(frozen=True)
class DocumentSignature:
    """What :func:`verify_document` found in a file (the signature checked out)."""

    format: str
    algorithm: str
    public_key: bytes
    report: dict[str, Any] | None = None
    """The report object (JSON files only)."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def trusted(self, keys: Collection[bytes]) -> bool:
        """Whether the signing key is one of ``keys`` (DER SubjectPublicKeyInfo)."""
        return self.public_key in keys


def _b64(value: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UnsignedDocument(f"the {what} is not base64") from None


def _check(public_der: bytes, algorithm: str, signed: bytes, signature: bytes) -> None:
    if algorithm != ALGORITHM.value:
        raise UnsignedDocument(f"unknown signature algorithm {algorithm!r}")
    try:
        key = serialization.load_der_public_key(public_der)
    except ValueError:
        raise UnsignedDocument("the public key is not a DER SubjectPublicKeyInfo") from None
    except UnsupportedAlgorithm:  # well-formed DER naming a curve or algorithm nobody knows
        raise UnsignedDocument("the public key is not a P-256 key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise UnsignedDocument("the public key is not a P-256 key")
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise InvalidReportSignature("the signature does not match the document") from None


class InvalidReportSignature(ValueError):
    """The signature block is well formed but does not verify: the file was changed."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise UnsignedDocument(f"the JSON repeats the member {key!r}")
        result[key] = value
    return result


def verify_document(data: bytes) -> DocumentSignature:
    """Check the signature of a report file (any format) against the public key it carries.

    Raises :class:`UnsignedDocument` (not a signed report) or :class:`InvalidReportSignature`
    (the file was changed). Whether the key is to be trusted is the caller's question
    (:meth:`DocumentSignature.trusted`).
    """
    if data.startswith(b"{"):
        return _verify_json(data)
    found = _TRAILER.search(data)
    if found is None:
        raise UnsignedDocument("no hsmkms report signature at the end of the file")
    signature = _b64(found.group("sig"), "signature")
    public = _b64(found.group("key"), "public key")
    _check(public, found.group("alg").decode(), data[: found.start("sig")], signature)
    kind = ReportFormat.HTML if data.lstrip().startswith(b"<!DOCTYPE html") else "md"
    return DocumentSignature(kind, found.group("alg").decode(), public)


def _verify_json(data: bytes) -> DocumentSignature:
    if not data.endswith(_JSON_END):
        raise UnsignedDocument("a JSON report ends with its signature value")
    start = data.rfind(_JSON_VALUE)
    if start < 0:
        raise UnsignedDocument("no signature value in the JSON report")
    start += len(_JSON_VALUE)
    raw_signature = data[start : -len(_JSON_END)]
    if len(raw_signature) > _MAX_SIGNATURE:
        raise UnsignedDocument("the signature value is too long")
    try:
        document = json.loads(data, object_pairs_hook=_reject_duplicates)
    except ValueError as exc:
        if isinstance(exc, UnsignedDocument):
            raise
        raise UnsignedDocument("the file is not valid JSON") from None
    signature = document.get("signature") if isinstance(document, dict) else None
    report = document.get("report") if isinstance(document, dict) else None
    if (
        not isinstance(signature, dict)
        or not isinstance(report, dict)
        or set(document)
        != {
            "report",
            "signature",
        }
    ):
        raise UnsignedDocument("a JSON report holds exactly 'report' and 'signature'")
    if signature.get("value") != raw_signature.decode("ascii", "replace"):
        raise UnsignedDocument("the signature value is not the last member of the file")
    public_text = signature.get("publicKey")
    algorithm = signature.get("algorithm")
    if not isinstance(public_text, str) or not isinstance(algorithm, str):
        raise UnsignedDocument("the signature names no public key or algorithm")
    public = _b64(public_text.encode("ascii", "replace"), "public key")
    _check(public, algorithm, data[:start], _b64(raw_signature, "signature"))
    return DocumentSignature(ReportFormat.JSON, algorithm, public, report)
