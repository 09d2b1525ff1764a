"""The authorization suite (every test of tests/test_api_authorization.py: identity and key
policies, explicit denies, the lockout check, live policy changes, conditions, grants) run again
against a server whose default token is the NSS softokn (tests/nss.py)."""

from __future__ import annotations

from collections.abc import Iterator

import nss
import pytest
import test_api_authorization
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.nss, pytest.mark.slow]

nss_token = nss.nss_token
nss_uri = nss.nss_uri


@pytest.fixture(scope="module")
def server(nss_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("nss-authorization") / "data"
    env = {**test_api_authorization.ENV, "HSMKMS_PKCS11_URI": nss_uri}
    with running_server(data_dir, env=env) as srv:
        yield srv


nss.adopt(test_api_authorization, globals())
