"""The KMS service: AWS KMS operations over the keystore and the metadata store."""

from __future__ import annotations

from hsmkms.service.core import EventSink, ServiceEvent
from hsmkms.service.kms import KmsService
from hsmkms.service.maintenance import DueTaskReport, Inconsistencies
from hsmkms.service.operations import OPERATIONS, Operation

__all__ = [
    "OPERATIONS",
    "DueTaskReport",
    "EventSink",
    "Inconsistencies",
    "KmsService",
    "Operation",
    "ServiceEvent",
]
