"""ReplicateKey and UpdatePrimaryRegion: multi-Region key operations. hsmkms makes no
multi-Region key (CreateKey refuses ``MultiRegion``), so every key is single-Region and both
operations answer, after the key is found and the caller authorized, what AWS answers for a
single-Region key: UnsupportedOperationException."""

from __future__ import annotations

from hsmkms.errors import UnsupportedOperationException
from hsmkms.models import (
    EmptyResponse,
    ReplicateKeyRequest,
    ReplicateKeyResponse,
    UpdatePrimaryRegionRequest,
)
from hsmkms.service.core import Call, ServiceCore, operation

__all__ = ["MultiRegionOperations"]


class MultiRegionOperations(ServiceCore):
    """The multi-Region key operations of :class:`~hsmkms.service.KmsService`."""

    @operation("ReplicateKey")
    def replicate_key(self, call: Call[ReplicateKeyRequest]) -> ReplicateKeyResponse:
        """ReplicateKey: refused, the key is not a multi-Region key."""
        # spec: LocalStack's AWS-modelled wording for a single-Region key.
        raise UnsupportedOperationException(
            f"Unable to replicate a non-MultiRegion key {call.key.key_id}"
        )

    @operation("UpdatePrimaryRegion")
    def update_primary_region(self, call: Call[UpdatePrimaryRegionRequest]) -> EmptyResponse:
        """UpdatePrimaryRegion: refused, the key is not a multi-Region key."""
        raise UnsupportedOperationException(f"{call.key.arn} is not a multi-Region key.")
