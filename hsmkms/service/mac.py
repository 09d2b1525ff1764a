"""MAC operations: GenerateMac, VerifyMac, with HMAC keys computed inside the token.

Security contract: the message is passed to the token only; it is never logged or stored.
"""

from __future__ import annotations

from typing import Final

from hsmkms.errors import InvalidKeyUsageException, KMSInvalidMacException
from hsmkms.models import (
    GenerateMacRequest,
    GenerateMacResponse,
    VerifyMacRequest,
    VerifyMacResponse,
)
from hsmkms.models.enums import MacAlgorithmSpec
from hsmkms.service.core import Call, Prepared, ServiceCore, material_ref, operation
from hsmkms.service.key_types import KEY_TYPES_BY_NAME
from hsmkms.store import KeyRecord

__all__ = ["MacOperations"]


# The condition keys of each algorithm, made once: the prepare hook runs on every request.
_PREPARED: Final = {a: Prepared({"kms:MacAlgorithm": a.value}) for a in MacAlgorithmSpec}


def _prepare_mac(request: GenerateMacRequest | VerifyMacRequest) -> Prepared:
    return _PREPARED[request.MacAlgorithm]


def _check_mac_algorithm(key: KeyRecord, algorithm: MacAlgorithmSpec) -> None:
    """InvalidKeyUsageException unless ``algorithm`` is the key spec's one."""
    if algorithm not in KEY_TYPES_BY_NAME[key.key_spec].mac:
        # spec: "Algorithm HMAC_SHA_256 is incompatible with key spec HMAC_224." (LocalStack's
        # AWS-validated snapshot test_invalid_generate_mac)
        raise InvalidKeyUsageException(
            f"Algorithm {algorithm} is incompatible with key spec {key.key_spec}."
        )


class MacOperations(ServiceCore):
    """The MAC operations of :class:`~hsmkms.service.KmsService`."""

    @operation("GenerateMac", prepare=_prepare_mac)
    def generate_mac(self, call: Call[GenerateMacRequest]) -> GenerateMacResponse:
        """The HMAC of the message, computed inside the token with the key's HMAC key."""
        request, key = call.request, call.key
        _check_mac_algorithm(key, request.MacAlgorithm)
        self._dry_run(request.DryRun)
        ref = material_ref(call.version.material_ref)
        tag = self._stores.backend_for(ref).mac(ref, request.Message)
        # Built from trusted values: skip re-validation on the hot path.
        return GenerateMacResponse.trusted(
            Mac=tag, MacAlgorithm=request.MacAlgorithm, KeyId=key.arn
        )

    @operation("VerifyMac", prepare=_prepare_mac)
    def verify_mac(self, call: Call[VerifyMacRequest]) -> VerifyMacResponse:
        """Verify a MAC inside the token; one that does not verify is KMSInvalidMacException
        (AWS never answers ``MacValid: false``)."""
        request, key = call.request, call.key
        _check_mac_algorithm(key, request.MacAlgorithm)
        self._dry_run(request.DryRun)
        ref = material_ref(call.version.material_ref)
        if not self._stores.backend_for(ref).verify_mac(ref, request.Message, request.Mac):
            raise KMSInvalidMacException()
        return VerifyMacResponse(KeyId=key.arn, MacValid=True, MacAlgorithm=request.MacAlgorithm)
