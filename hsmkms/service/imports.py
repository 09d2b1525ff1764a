"""Imported key material (Origin EXTERNAL): GetParametersForImport, ImportKeyMaterial,
DeleteImportedKeyMaterial. Expiry is the periodic work's (:mod:`hsmkms.service.maintenance`).

Security contract: the key material is unwrapped inside the token
(:meth:`~hsmkms.keystore.base.KeyBackend.import_material`) and never exists in this process in
plaintext; the wrapped material and the import token are never logged or stored. A re-import
is recognized by the material's KeyMaterialId, derived from a check value the token computes
(:func:`~hsmkms.service.identifiers.imported_key_material_id`), never by comparing bytes here.

The import token (opaque to callers; the state it stands for is a sealed ``import_tokens`` row,
so any server process can complete an import)::

    0   1   version (1)
    1   16  token id (random, from the token's generator): the row's id
    17  16  key id (UUID bytes)
    33  8   ParametersValidTo, milliseconds since the epoch, big-endian

The row binds the token to the key, the wrapping algorithm and the wrapping key pair; the
blob's key id and expiry must equal the row's. A token whose row is gone (purged once expired)
is expired when its own expiry has passed, else invalid.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Final

from hsmkms.errors import (
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidImportTokenException,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.base import Keystore, MaterialName
from hsmkms.keystore.errors import (
    DecryptionFailed,
    KeyMaterialMissing,
    MaterialRejected,
    UnsupportedByToken,
)
from hsmkms.keystore.imports import (
    ImportedMaterial,
    WrappingAlgorithm,
    WrappingKeyRef,
    WrappingKeySpec,
    wrapping_key_name,
)
from hsmkms.keystore.specs import KeyMaterialSpec, MaterialUsage
from hsmkms.models import (
    DeleteImportedKeyMaterialRequest,
    DeleteImportedKeyMaterialResponse,
    GetParametersForImportRequest,
    GetParametersForImportResponse,
    ImportKeyMaterialRequest,
    ImportKeyMaterialResponse,
)
from hsmkms.models.enums import (
    ExpirationModel,
    ImportType,
    KeySpec,
    KeyState,
    OriginType,
    WrappingAlgorithmSpec,
)
from hsmkms.models.enums import WrappingKeySpec as WireWrappingKeySpec
from hsmkms.policy import ContextInput
from hsmkms.profiles import MechanismProfile
from hsmkms.service.core import Call, Prepared, ServiceCore, log, operation
from hsmkms.service.identifiers import imported_key_material_id
from hsmkms.service.states import Access, check_state
from hsmkms.store import (
    IMPORTED,
    ImportConflict,
    ImportedMaterialRecord,
    ImportTokenRecord,
    KeyRecord,
    KeyVersionRecord,
)

__all__ = [
    "IMPORT_TOKEN_LIFETIME",
    "MAX_VALID_TO",
    "ImportOperations",
    "decode_import_token",
    "encode_import_token",
]

IMPORT_TOKEN_LIFETIME: Final = dt.timedelta(hours=24)
"""spec: §3 — a public key and import token are valid for 24 hours."""

MAX_VALID_TO: Final = dt.timedelta(days=365)
"""spec: ImportKeyMaterial ValidTo — at most 365 days from the request."""

_TOKEN_VERSION: Final = 1
_TOKEN_LENGTH: Final = 1 + 16 + 16 + 8
_INVALID_MESSAGE: Final = "The import token is invalid or is associated with a different KMS key."
_EXPIRED_MESSAGE: Final = (
    "The import token has expired. Use GetParametersForImport to get a new import token and "
    "public key."
)
_INCORRECT_MATERIAL: Final = (
    "The key material in the request is, expired, invalid, or is not the same key material "
    "that was previously imported into this KMS key."
)
_ALREADY_ASSOCIATED: Final = (
    "The key material in the request is already associated with this KMS key: import it with "
    "ImportType EXISTING_KEY_MATERIAL."
)
_SYMMETRIC_ONLY: Final = (
    "ImportType, KeyMaterialDescription and KeyMaterialId are valid only for symmetric "
    "encryption KMS keys."
)
# What a token that cannot unwrap an algorithm lacks, for the refusal's message.
_NEEDS: Final = {
    WrappingAlgorithm.RSAES_OAEP_SHA_1: "C_UnwrapKey with CKM_RSA_PKCS_OAEP (SHA-1)",
    WrappingAlgorithm.RSAES_OAEP_SHA_256: (
        "C_UnwrapKey with CKM_RSA_PKCS_OAEP (SHA-256, MGF1-SHA-256)"
    ),
    WrappingAlgorithm.RSA_AES_KEY_WRAP_SHA_1: (
        "C_UnwrapKey with CKM_RSA_PKCS_OAEP (SHA-1) and CKM_AES_KEY_WRAP_PAD"
    ),
    WrappingAlgorithm.RSA_AES_KEY_WRAP_SHA_256: (
        "C_UnwrapKey with CKM_RSA_PKCS_OAEP (SHA-256, MGF1-SHA-256) and CKM_AES_KEY_WRAP_PAD"
    ),
}


def encode_import_token(token_id: bytes, key_id: str, valid_to: dt.datetime) -> bytes:
    """The ImportToken blob (layout in the module docstring)."""
    if len(token_id) != 16:
        raise ValueError("the token id is 16 bytes")
    millis = int(valid_to.timestamp() * 1000)
    return bytes([_TOKEN_VERSION]) + token_id + uuid.UUID(key_id).bytes + millis.to_bytes(8, "big")


def decode_import_token(blob: bytes) -> tuple[str, str, dt.datetime]:
    """(token id as hex, key id, expiry) of an ImportToken; InvalidImportTokenException when it
    is not one of ours."""
    if len(blob) != _TOKEN_LENGTH or blob[0] != _TOKEN_VERSION:
        raise InvalidImportTokenException(_INVALID_MESSAGE)
    millis = int.from_bytes(blob[33:41], "big")
    try:
        valid_to = dt.datetime.fromtimestamp(millis / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidImportTokenException(_INVALID_MESSAGE) from None
    return blob[1:17].hex(), str(uuid.UUID(bytes=blob[17:33])), valid_to


def _to_millis(when: dt.datetime) -> dt.datetime:
    """``when`` truncated to the millisecond (the token's precision)."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _prepare_get_parameters_for_import(request: GetParametersForImportRequest) -> Prepared:
    algorithm, spec = request.WrappingAlgorithm, request.WrappingKeySpec
    if algorithm is WrappingAlgorithmSpec.RSAES_PKCS1_V1_5:
        # spec: AWS KMS refuses RSAES_PKCS1_V1_5 since October 10, 2023.
        raise ValidationException(
            "The RSAES_PKCS1_V1_5 wrapping algorithm is not supported. Use RSAES_OAEP_SHA_256, "
            "RSAES_OAEP_SHA_1, RSA_AES_KEY_WRAP_SHA_256 or RSA_AES_KEY_WRAP_SHA_1."
        )
    if algorithm is WrappingAlgorithmSpec.SM2PKE or spec is WireWrappingKeySpec.SM2:
        raise ValidationException(
            "The SM2PKE wrapping algorithm and SM2 wrapping keys are available only in the "
            "China Regions."
        )
    return Prepared({"kms:WrappingAlgorithm": algorithm.value, "kms:WrappingKeySpec": spec.value})


def _prepare_import_key_material(request: ImportKeyMaterialRequest) -> Prepared:
    model = request.ExpirationModel or ExpirationModel.KEY_MATERIAL_EXPIRES
    if model is ExpirationModel.KEY_MATERIAL_EXPIRES and request.ValidTo is None:
        raise ValidationException(
            "A validTo date must be set if the ExpirationModel is KEY_MATERIAL_EXPIRES"
        )
    if model is ExpirationModel.KEY_MATERIAL_DOES_NOT_EXPIRE and request.ValidTo is not None:
        raise ValidationException(
            "The parameter ValidTo cannot be specified for a key with an expiration model of "
            "KEY_MATERIAL_DOES_NOT_EXPIRE"
        )
    if request.ImportType is ImportType.NEW_KEY_MATERIAL and request.KeyMaterialId is not None:
        raise ValidationException(
            "KeyMaterialId cannot be specified when ImportType is NEW_KEY_MATERIAL."
        )
    # spec: §4.3 — kms:ExpirationModel carries the default when the request leaves it out.
    conditions: dict[str, ContextInput] = {"kms:ExpirationModel": model.value}
    if request.ValidTo is not None:
        conditions["kms:ValidTo"] = _aware(request.ValidTo)
    return Prepared(conditions)


def _require_external(key: KeyRecord) -> None:
    if key.origin != OriginType.EXTERNAL:
        # spec: §3.5 note 9 — a key that cannot have imported material.
        raise UnsupportedOperationException(
            f"{key.arn} origin is {key.origin} which is not valid for this operation."
        )


def _material_spec(key: KeyRecord) -> KeyMaterialSpec:
    try:
        return KeyMaterialSpec(key.key_spec)
    except ValueError:
        raise UnsupportedOperationException(
            f"Key material of key spec {key.key_spec} cannot be imported here."
        ) from None


def _check_combination(key: KeyRecord, algorithm: WrappingAlgorithm, spec: WrappingKeySpec) -> None:
    """spec: GetParametersForImport WrappingAlgorithm — an RSA private key needs an RSA_AES
    algorithm; RSAES-OAEP under an RSA_2048 wrapping key cannot carry an ECC_NIST_P521 key."""
    if algorithm.two_step:
        return
    if key.key_spec.startswith("RSA_"):
        raise ValidationException(
            f"Key material of key spec {key.key_spec} must be wrapped with "
            "RSA_AES_KEY_WRAP_SHA_256 or RSA_AES_KEY_WRAP_SHA_1."
        )
    if key.key_spec == KeySpec.ECC_NIST_P521 and spec is WrappingKeySpec.RSA_2048:
        raise ValidationException(
            f"The {algorithm.value} wrapping algorithm with an RSA_2048 wrapping key cannot "
            "wrap ECC_NIST_P521 key material. Use a longer wrapping key or an RSA_AES "
            "wrapping algorithm."
        )


def _check_wrapped_size(
    wrapped: bytes, algorithm: WrappingAlgorithm, spec: WrappingKeySpec
) -> None:
    """The size of the encrypted key material is public: refuse one the algorithm cannot have
    produced before asking the token."""
    modulus = spec.modulus_length
    if algorithm.two_step:
        body = len(wrapped) - modulus
        ok = body >= 16 and body % 8 == 0
    else:
        ok = len(wrapped) == modulus
    if not ok:
        raise ValidationException("Invalid encrypted key size.")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one ImportKeyMaterial writes."""

    material: ImportedMaterialRecord
    version: KeyVersionRecord | None
    """The version row naming the new token objects; None: the material's objects are there
    already, the new ones are destroyed."""
    current_version: int | None = None
    state: str | None = None


class ImportOperations(ServiceCore):
    """The imported key material operations of :class:`~hsmkms.service.KmsService`."""

    @operation("GetParametersForImport", prepare=_prepare_get_parameters_for_import)
    def get_parameters_for_import(
        self, call: Call[GetParametersForImportRequest]
    ) -> GetParametersForImportResponse:
        """GetParametersForImport: a new RSA wrapping key pair in the token (the private key
        unwraps only and never leaves it) and an import token bound to the key, the wrapping
        algorithm and that key pair, both valid for 24 hours."""
        request, key = call.request, call.key
        _require_external(key)
        _material_spec(key)
        algorithm = WrappingAlgorithm(request.WrappingAlgorithm.value)
        spec = WrappingKeySpec(request.WrappingKeySpec.value)
        _check_combination(key, algorithm, spec)
        backend = self._stores.default
        self._check_token_unwraps(backend, algorithm)
        if key.key_spec == KeySpec.SYMMETRIC_DEFAULT:
            self._check_token_hosts_gcm(backend)
        now = self._clock()
        valid_to = _to_millis(now + IMPORT_TOKEN_LIFETIME)
        # Named with the day after its expiry: leftovers of a crash are recognized by it.
        name = wrapping_key_name(key.key_id, (valid_to + dt.timedelta(days=1)).date())
        wrapping, public_key = backend.create_wrapping_key(spec, name)
        token_id = backend.random(16)
        record = ImportTokenRecord(
            token_id=token_id.hex(),
            key_id=key.key_id,
            wrapping_algorithm=algorithm.value,
            wrapping_key_spec=spec.value,
            wrapping_key=wrapping.to_str(),
            created_at=now,
            valid_to=valid_to,
        )
        try:
            self._store.add_import_token(record)
        except BaseException:
            self._destroy_wrapping_key_quietly(backend, wrapping)
            raise
        log.info(
            "import_parameters_issued",
            key_id=key.key_id,
            wrapping_algorithm=algorithm.value,
            wrapping_key_spec=spec.value,
        )
        return GetParametersForImportResponse(
            KeyId=key.arn,
            ImportToken=encode_import_token(token_id, key.key_id, valid_to),
            PublicKey=public_key,
            ParametersValidTo=valid_to,
        )

    @staticmethod
    def _check_token_unwraps(backend: Keystore, algorithm: WrappingAlgorithm) -> None:
        """UnsupportedOperationException naming what is missing when the token cannot unwrap
        ``algorithm`` inside it (probed: SoftHSM 2.6.1 does OAEP with SHA-1 only)."""
        works = backend.capabilities().wrapping_algorithms
        if algorithm in works:
            return
        offered = ", ".join(sorted(a.value for a in works)) or "none"
        raise UnsupportedOperationException(
            f"The {algorithm.value} wrapping algorithm is not supported by this key store: its "
            f"token cannot unwrap it inside the token ({_NEEDS[algorithm]}). Wrapping "
            f"algorithms it supports: {offered}."
        )

    @staticmethod
    def _check_token_hosts_gcm(backend: Keystore) -> None:
        """Imported symmetric material is one AES key under AES_256_GCM (the portable profile
        needs an independent MAC key, which imported material does not bring): a token without
        GCM cannot use it (UnsupportedOperationException, naming the mechanism)."""
        if MechanismProfile.AES_256_GCM not in backend.capabilities().profiles:
            raise UnsupportedOperationException(
                "Imported symmetric key material is used with CKM_AES_GCM, which this key "
                "store's token does not perform."
            )

    def _destroy_wrapping_key_quietly(self, backend: Keystore, ref: WrappingKeyRef) -> None:
        try:
            backend.destroy_wrapping_key(ref)
        except Exception:  # the periodic work destroys leftovers once they expire
            log.warning("destroy_wrapping_key_failed")

    # -- ImportKeyMaterial ----------------------------------------------------------------------

    def _import_token(self, blob: bytes, key: KeyRecord, now: dt.datetime) -> ImportTokenRecord:
        """The row of a valid import token for ``key``; ExpiredImportTokenException or
        InvalidImportTokenException."""
        token_id, key_id, valid_to = decode_import_token(blob)
        record = self._store.get_import_token(token_id)
        if record is None:
            # Purged once expired (or never ours): an expired token says so.
            if valid_to <= now and key_id == key.key_id:
                raise ExpiredImportTokenException(_EXPIRED_MESSAGE)
            raise InvalidImportTokenException(_INVALID_MESSAGE)
        if record.key_id != key_id or record.valid_to != valid_to:
            raise InvalidImportTokenException(_INVALID_MESSAGE)
        if record.key_id != key.key_id:
            # spec: InvalidImportTokenException — "associated with a different KMS key".
            raise InvalidImportTokenException(_INVALID_MESSAGE)
        if record.valid_to <= now:
            raise ExpiredImportTokenException(_EXPIRED_MESSAGE)
        return record

    @operation("ImportKeyMaterial", prepare=_prepare_import_key_material)
    def import_key_material(
        self, call: Call[ImportKeyMaterialRequest]
    ) -> ImportKeyMaterialResponse:
        """ImportKeyMaterial: unwrap the material inside the token into new token objects and
        make the key usable (PendingImport -> Enabled once all its material is imported).
        Re-importing the same material (recognized by its KeyMaterialId) restores it or changes
        its expiration; other material is IncorrectKeyMaterialException."""
        request, key = call.request, call.key
        _require_external(key)
        spec = _material_spec(key)
        symmetric = key.key_spec == KeySpec.SYMMETRIC_DEFAULT
        if not symmetric and (
            request.ImportType is not None
            or request.KeyMaterialDescription is not None
            or request.KeyMaterialId is not None
        ):
            raise ValidationException(_SYMMETRIC_ONLY)
        now = self._clock()
        token = self._import_token(request.ImportToken, key, now)
        valid_to = _aware(request.ValidTo) if request.ValidTo is not None else None
        if valid_to is not None:
            if valid_to <= now:
                raise ValidationException("ValidTo must be a date and time in the future.")
            if valid_to > now + MAX_VALID_TO:
                raise ValidationException("ValidTo must be at most 365 days from now.")
        algorithm = WrappingAlgorithm(token.wrapping_algorithm)
        wrapping_spec = WrappingKeySpec(token.wrapping_key_spec)
        _check_combination(key, algorithm, wrapping_spec)
        _check_wrapped_size(request.EncryptedKeyMaterial, algorithm, wrapping_spec)
        materials = self._store.imported_materials(key.key_id)
        import_type = request.ImportType or (
            ImportType.NEW_KEY_MATERIAL if not materials else ImportType.EXISTING_KEY_MATERIAL
        )
        wrapping = WrappingKeyRef.from_str(token.wrapping_key)
        version = self._expected_version(key, materials, import_type, request.KeyMaterialId)
        imported = self._unwrap(
            key, spec, version, wrapping, algorithm, request.EncryptedKeyMaterial
        )
        model = request.ExpirationModel or ExpirationModel.KEY_MATERIAL_EXPIRES
        try:
            material_id = imported_key_material_id(key.key_id, key.key_spec, imported.check_value)
            if request.KeyMaterialId is not None and request.KeyMaterialId != material_id:
                raise IncorrectKeyMaterialException(_INCORRECT_MATERIAL)
            for _ in range(5):
                plan = self._plan(
                    key, materials, import_type, material_id, imported, now, model, valid_to,
                    request.KeyMaterialDescription,
                )  # fmt: skip
                if plan.version is not None and plan.version.version != version:
                    # Another version than the one the objects are labelled with (a re-import
                    # among several materials): unwrap again, named right.
                    self._destroy_quietly(imported.ref, key.key_id, version)
                    version = plan.version.version
                    imported = self._unwrap(
                        key, spec, version, wrapping, algorithm, request.EncryptedKeyMaterial
                    )
                    plan = dataclasses.replace(
                        plan,
                        version=dataclasses.replace(
                            plan.version, material_ref=imported.ref.to_str()
                        ),
                    )
                try:
                    updated = self._save(key, materials, plan)
                    break
                except ImportConflict:
                    # Another writer changed the key's material meanwhile: decide again.
                    refreshed = self._store.get_key(key.key_id)
                    if refreshed is None:
                        raise self._not_found(key.key_id) from None
                    key = refreshed
                    materials = self._store.imported_materials(key.key_id)
            else:
                raise KMSInvalidStateException(
                    f"{key.arn} is being changed concurrently; retry the request."
                )
        except BaseException:
            if not self._committed(key.key_id, version, imported.ref):
                self._destroy_quietly(imported.ref, key.key_id, version)
            raise
        if plan.version is None:
            self._destroy_quietly(imported.ref, key.key_id, version)
        if call.caller is not None:
            call.caller.note_key(key.arn, plan.material.version)
        log.info(
            "key_material_imported",
            key_id=key.key_id,
            version=plan.material.version,
            key_state=updated.state,
        )
        return ImportKeyMaterialResponse(
            KeyId=key.arn, KeyMaterialId=material_id if symmetric else None
        )

    @staticmethod
    def _expected_version(
        key: KeyRecord,
        materials: tuple[ImportedMaterialRecord, ...],
        import_type: ImportType,
        requested_id: str | None,
    ) -> int:
        """The version the material is expected to become (its token objects' label)."""
        if import_type is ImportType.NEW_KEY_MATERIAL or not materials:
            return max([m.version for m in materials] + [key.current_version]) + 1
        if requested_id is not None:
            for material in materials:
                if material.key_material_id == requested_id:
                    return material.version
        missing = [m.version for m in materials if m.import_state != IMPORTED]
        if len(missing) == 1:
            return missing[0]
        return key.current_version or materials[0].version

    def _unwrap(
        self,
        key: KeyRecord,
        spec: KeyMaterialSpec,
        version: int,
        wrapping: WrappingKeyRef,
        algorithm: WrappingAlgorithm,
        wrapped: bytes,
    ) -> ImportedMaterial:
        """The material unwrapped inside the token into new token objects, with its check
        value; the keystore's refusals as AWS errors."""
        backend = self._stores.get(wrapping.store)
        usage = None if spec.facts.takes_profile else MaterialUsage(key.key_usage)
        try:
            return backend.import_material(
                spec, MaterialName.key_version(key.key_id, version), wrapping, algorithm, wrapped,
                usage=usage,
            )  # fmt: skip
        except (DecryptionFailed, MaterialRejected):
            pass
        except UnsupportedByToken as exc:
            raise UnsupportedOperationException(
                f"This key store's token cannot import this key material: {exc.message}."
            ) from None
        except KeyMaterialMissing:
            # The wrapping key pair is gone from the token (expired and destroyed).
            raise InvalidImportTokenException(_INVALID_MESSAGE) from None
        # spec: InvalidCiphertextException — KMS could not decrypt the wrapped key material (or
        # it is not key material of the key's spec). Raised outside the handler: no detail.
        raise InvalidCiphertextException()

    def _plan(
        self,
        key: KeyRecord,
        materials: tuple[ImportedMaterialRecord, ...],
        import_type: ImportType,
        material_id: str,
        imported: ImportedMaterial,
        now: dt.datetime,
        model: ExpirationModel,
        valid_to: dt.datetime | None,
        description: str | None,
    ) -> _Plan:
        """What this import writes, given the key's materials as they are."""
        match = next((m for m in materials if m.key_material_id == material_id), None)
        if import_type is ImportType.EXISTING_KEY_MATERIAL:
            if match is None:
                raise IncorrectKeyMaterialException(_INCORRECT_MATERIAL)
            material = dataclasses.replace(
                match,
                expiration_model=model.value,
                valid_to=valid_to,
                description=description if description is not None else match.description,
                import_state=IMPORTED,
                imported_at=now,
            )
            if match.import_state == IMPORTED:
                # The objects are there: this import sets the expiration (and description).
                return _Plan(material, None)
            others = [m for m in materials if m.version != match.version]
            state = None
            if key.state == KeyState.PendingImport and all(
                m.import_state == IMPORTED for m in others
            ):
                state = KeyState.Enabled.value
            return _Plan(material, self._version_row(key, material, imported, now), None, state)
        if match is not None:
            raise IncorrectKeyMaterialException(_ALREADY_ASSOCIATED)
        pending = [m for m in materials if m.version > key.current_version]
        if pending:
            # spec: one new key material at a time waits for RotateKeyOnDemand.
            raise KMSInvalidStateException(
                f"New key material (id: {material_id}) cannot be imported into KMS key "
                f"{key.arn}, because another key material (id: {pending[0].key_material_id}) "
                "is pending rotation."
            )
        version = max([m.version for m in materials] + [key.current_version]) + 1
        material = ImportedMaterialRecord(
            key_id=key.key_id,
            version=version,
            key_material_id=material_id,
            expiration_model=model.value,
            valid_to=valid_to,
            description=description,
            import_state=IMPORTED,
            imported_at=now,
        )
        row = self._version_row(key, material, imported, now)
        if key.current_version == 0:
            # The key's first material: it becomes current, and the key usable.
            state = KeyState.Enabled.value if key.state == KeyState.PendingImport else None
            return _Plan(material, row, version, state)
        # New material for an on-demand rotation (symmetric keys): PENDING_ROTATION.
        return _Plan(material, row)

    @staticmethod
    def _version_row(
        key: KeyRecord,
        material: ImportedMaterialRecord,
        imported: ImportedMaterial,
        now: dt.datetime,
    ) -> KeyVersionRecord:
        ref = imported.ref
        return KeyVersionRecord(
            key_id=key.key_id,
            version=material.version,
            material_ref=ref.to_str(),
            profile=ref.profile.value if ref.profile is not None else "-",
            created_at=now,
            rotation_type="ON_DEMAND" if material.rotation_date is not None else None,
        )

    def _save(
        self, key: KeyRecord, materials: tuple[ImportedMaterialRecord, ...], plan: _Plan
    ) -> KeyRecord:
        """Write the plan if the key and its materials are still as it was made from."""

        def unchanged(
            current: KeyRecord, current_materials: tuple[ImportedMaterialRecord, ...]
        ) -> None:
            check_state(Access.MANAGE, current)
            if (
                current_materials != materials
                or current.current_version != key.current_version
                or current.state != key.state
            ):
                raise ImportConflict(key.key_id)

        return self._store.save_import(
            plan.material,
            plan.version,
            precondition=unchanged,
            current_version=plan.current_version,
            state=plan.state,
        )

    # -- DeleteImportedKeyMaterial --------------------------------------------------------------

    @operation("DeleteImportedKeyMaterial")
    def delete_imported_key_material(
        self, call: Call[DeleteImportedKeyMaterialRequest]
    ) -> DeleteImportedKeyMaterialResponse:
        """DeleteImportedKeyMaterial: destroy the (current, or named) imported material's token
        objects; the key becomes PendingImport (a key pending deletion stays so). No effect on
        material that is not imported."""
        request, key = call.request, call.key
        _require_external(key)
        symmetric = key.key_spec == KeySpec.SYMMETRIC_DEFAULT
        materials = self._store.imported_materials(key.key_id)
        if request.KeyMaterialId is not None:
            target = next(
                (m for m in materials if m.key_material_id == request.KeyMaterialId), None
            )
            if target is None:
                raise NotFoundException(
                    f"Key material {request.KeyMaterialId} is not associated with {key.arn}."
                )
        else:
            target = next((m for m in materials if m.version == key.current_version), None)
        if target is None:
            # spec: §3.5 — on a key without imported material: no effect.
            return DeleteImportedKeyMaterialResponse(KeyId=key.arn)
        if self._forget_material(key.key_id, target.version):
            log.info("key_material_deleted", key_id=key.key_id, version=target.version)
        if call.caller is not None:
            call.caller.note_key(key.arn, target.version)
        return DeleteImportedKeyMaterialResponse(
            KeyId=key.arn, KeyMaterialId=target.key_material_id if symmetric else None
        )
