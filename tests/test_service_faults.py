"""A key creation that fails half-way — its token object made, the token gone before its row
is written — leaves no orphan once the token is back: the service destroys what it made
(:meth:`KmsService.clean_leftovers`, which a server's periodic work calls), and ``hsmkms
doctor`` finds nothing. On a real SoftHSM2 token and SQLite file."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from hsmkms import models as m
from hsmkms.config import Settings
from hsmkms.keystore.base import TokenObject
from hsmkms.keystore.errors import TokenUnavailable
from hsmkms.system import System

pytestmark = [pytest.mark.hsm, pytest.mark.vendors]


def listing(system: System) -> list[TokenObject]:
    """The token's objects, once the keystore's retry pause after the outage has passed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return system.keystore.list_objects()
        except TokenUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.05)


class TokenMover:
    """A keystore observer that moves the token's directory away right after the next key
    generation: the token object exists, then the token is gone."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.armed = False
        self.home: Path | None = None

    def __call__(self, operation: str, seconds: float) -> None:
        if self.armed and operation == "create_key":
            self.armed = False
            # The token's directory (beside it: the token write lock, which stays).
            (self.home,) = (p for p in (self.data_dir / "tokens").iterdir() if p.is_dir())
            shutil.move(str(self.home), str(self.data_dir / "away"))

    def bring_back(self) -> None:
        assert self.home is not None
        shutil.move(str(self.data_dir / "away"), str(self.home))


def test_a_create_key_that_fails_half_way_leaves_no_orphan(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    mover = TokenMover(data_dir)
    with System.open(Settings.load(data_dir), audit=None) as system:
        system.service.create_key(m.CreateKeyRequest())  # the token and the database exist
    with System.open(Settings.load(data_dir), audit=None, observer=mover) as system:
        service = system.service
        before = {o.object_id for o in system.keystore.list_objects()}
        mover.armed = True
        with pytest.raises(TokenUnavailable):
            service.create_key(m.CreateKeyRequest())
        assert service.clean_leftovers() == 0  # the token is still away: kept for later
        mover.bring_back()
        made = {o.object_id for o in listing(system)} - before
        assert len(made) == 1  # the half-made key's object is on the token...
        assert service.find_inconsistencies().orphans != []
        assert service.clean_leftovers() == 1  # ...until the service destroys it
        assert {o.object_id for o in system.keystore.list_objects()} == before
        found = service.find_inconsistencies()
        assert (found.orphans, found.missing) == ([], [])
        assert service.clean_leftovers() == 0
        assert len(service.list_keys(m.ListKeysRequest()).Keys) == 1
