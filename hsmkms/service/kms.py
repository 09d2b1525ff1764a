"""KmsService: the AWS KMS operations over a keystore (root keys in the token) and a metadata
store. Every public operation takes its request model and the request's ``caller`` and returns
its response model.

The operations are grouped by concern, one module each (keys, aliases and tags, crypto,
asymmetric, mac, data key pairs, last usage, multi-Region, imported key material, rotation,
policies, grants, maintenance); each runs through the one template of
:class:`~hsmkms.service.core.ServiceCore` as its descriptor in
:mod:`hsmkms.service.operations` says. The API writes the call's audit record from the result
(:mod:`hsmkms.api.app`).
"""

from __future__ import annotations

from hsmkms.service.aliases import AliasOperations
from hsmkms.service.asymmetric import AsymmetricOperations
from hsmkms.service.crypto import CryptoOperations
from hsmkms.service.data_key_pairs import DataKeyPairOperations
from hsmkms.service.grants import GrantOperations
from hsmkms.service.imports import ImportOperations
from hsmkms.service.key_stores import KeyStoreOperations
from hsmkms.service.keys import KeyOperations
from hsmkms.service.last_usage import LastUsageOperations
from hsmkms.service.mac import MacOperations
from hsmkms.service.maintenance import Maintenance
from hsmkms.service.multi_region import MultiRegionOperations
from hsmkms.service.policies import PolicyOperations
from hsmkms.service.rotation import RotationOperations
from hsmkms.service.xks import XksOperations


class KmsService(
    KeyOperations,
    AliasOperations,
    CryptoOperations,
    ImportOperations,
    AsymmetricOperations,
    MacOperations,
    DataKeyPairOperations,
    LastUsageOperations,
    MultiRegionOperations,
    RotationOperations,
    PolicyOperations,
    GrantOperations,
    XksOperations,
    KeyStoreOperations,
    Maintenance,
):
    """The KMS facade. Thread-safe (the keystore serializes token calls; the store pools
    connections). Every operation takes the request's ``caller`` (None: the local operator,
    not authorized) and authorizes it against the key policy, its identity policy and grants
    (:mod:`hsmkms.service.authorize`)."""
