"""The KMS API conformance suite (every test of tests/test_api_kms.py: keys, aliases, tags,
encryption, data keys, random, rotation, policies, grants, imported material, the AWS CLI, the
Encryption SDK, custom key store operations) run again against a server whose default token is
the NSS softokn (tests/nss.py): the second PKCS#11 vendor of ``make test``.

Its tests are the same functions, collected here with this module's ``server`` fixture. Where
NSS differs, this module says so: imported symmetric material is refused (the wire format needs
AES-GCM, which NSS's single-part C_Encrypt fails), so its test here checks that refusal; two
tests that need a SoftHSM2 token beside the default one are skipped, with the reason. The
authorization suite runs there too: tests/test_nss_authorization.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import nss
import pytest
import test_api_kms
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.nss, pytest.mark.slow]

nss_token = nss.nss_token
nss_uri = nss.nss_uri


@pytest.fixture(scope="module")
def server(nss_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server (one worker) on the NSS token for the whole suite."""
    data_dir = tmp_path_factory.mktemp("nss-conformance") / "data"
    with running_server(data_dir, env={"HSMKMS_PKCS11_URI": nss_uri}) as srv:
        yield srv


def test_imported_key_material(kms: Any) -> None:
    """NSS cannot host imported symmetric material (it is used with AES-GCM): the first step
    says so with UnsupportedOperationException, and the key stays PendingImport."""
    key = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
    message = test_api_kms.raises(
        "UnsupportedOperationException",
        kms.get_parameters_for_import,
        KeyId=key["KeyId"],
        WrappingAlgorithm="RSAES_OAEP_SHA_256",
        WrappingKeySpec="RSA_2048",
    )
    assert "CKM_AES_GCM" in message
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"


nss.adopt(
    test_api_kms,
    globals(),
    skipped={
        "test_custom_key_store_operations": "its custom key store is a SoftHSM2 token made in "
        "the server's data directory, which an NSS-backed server has not (the other "
        "arrangement, an NSS custom key store beside a SoftHSM2 default token: "
        "tests/test_nss_token.py)",
        "test_every_registered_operation_was_called_end_to_end": "the import and custom key "
        "store operations are not called end to end here (above)",
    },
)
