"""The service's own work: due automatic rotations and purges of deleted keys (periodically in
a background thread, or once), and the comparison of the token with the store that
``hsmkms doctor`` reports."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from hsmkms.keystore.base import KeyMaterialRef, TokenObject
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.models.enums import RotationType
from hsmkms.service.core import ServiceCore, log
from hsmkms.store import DELETING


@dataclasses.dataclass(frozen=True)
class DueTaskReport:
    """What one :meth:`Maintenance.run_due_tasks` pass did."""

    rotated: list[str]
    purged: list[str]


@dataclasses.dataclass(frozen=True)
class Inconsistencies:
    """Differences between the token and the store (``hsmkms doctor``).

    ``orphans``: token objects of this project that no key version refers to (for example left
    by a crash between creating the object and committing its row). ``missing``: key versions
    whose token object(s) are not on the token.
    """

    orphans: list[TokenObject]
    missing: list[tuple[str, int]]
    orphan_stores: dict[str, str] = dataclasses.field(default_factory=dict)
    """The key store holding each orphan (by object id)."""


class Maintenance(ServiceCore):
    """Periodic work and diagnostics of :class:`~hsmkms.service.KmsService`."""

    _thread: threading.Thread | None = None
    _stop_event: threading.Event | None = None

    def rotate_due(self) -> list[str]:
        """Rotate every Enabled key whose automatic rotation is due. Returns their ids."""
        rotated = []
        for key in self._store.keys_due_for_rotation(self._clock()):
            try:
                updated = self._rotate(key, RotationType.AUTOMATIC)
            except Exception:
                log.exception("rotation_failed", key_id=key.key_id)
                continue
            if updated is not None:
                rotated.append(key.key_id)
        return rotated

    def purge_due(self) -> list[str]:
        """Destroy keys whose deletion date has passed: every token object of every version
        (``C_DestroyObject``), then their rows, aliases and tags. Returns the purged key ids.

        Crash-safe: the key is first marked Deleting (gone for callers), then its objects are
        destroyed (destroying an absent object is not an error), then its rows deleted; a purge
        interrupted anywhere finishes on the next run.
        """
        now = self._clock()
        purged = []
        for key in self._store.keys_to_purge(now):
            if not self._store.mark_deleting(key.key_id, now):
                continue  # cancelled meanwhile
            try:
                for version in self._store.list_versions(key.key_id).items:
                    ref = KeyMaterialRef.from_str(version.material_ref)
                    self._stores.backend_for(ref).destroy(ref)
                self._store.delete_key(key.key_id)
            except Exception:
                log.exception("purge_failed", key_id=key.key_id)
                continue
            log.info("key_deleted", key_id=key.key_id)
            self._emit("DeleteKey", key.arn)
            purged.append(key.key_id)
        return purged

    def run_due_tasks(self) -> DueTaskReport:
        """One pass of the periodic work: due automatic rotations, then due deletions."""
        return DueTaskReport(rotated=self.rotate_due(), purged=self.purge_due())

    def find_inconsistencies(self) -> Inconsistencies:
        """Compare the token's objects with the store's key versions (``hsmkms doctor``).

        The token is listed first, so an object created (and committed) after the listing is
        not reported; an object whose row is not committed yet may be reported as an orphan.
        """
        objects = {store_id: backend.list_objects() for store_id, backend in self._stores.items()}
        present = {s: {o.object_id for o in listed} for s, listed in objects.items()}
        referenced: dict[str, set[str]] = {store_id: set() for store_id in objects}
        missing: list[tuple[str, int]] = []
        for version, state in self._store.all_versions():
            ref = KeyMaterialRef.from_str(version.material_ref)
            referenced.setdefault(ref.store, set()).update(ref.object_ids)
            in_store = present.get(ref.store, set())  # an unregistered store: all missing
            if state != DELETING and not all(oid in in_store for oid in ref.object_ids):
                missing.append((version.key_id, version.version))
        # Service keys (audit seal, credentials) are not key versions and never orphans here.
        orphans = []
        stores: dict[str, str] = {}
        for store_id, listed in objects.items():
            for o in listed:
                if o.is_key_version and o.object_id not in referenced[store_id]:
                    orphans.append(o)
                    stores[o.object_id] = store_id
        return Inconsistencies(orphans=orphans, missing=missing, orphan_stores=stores)

    def remove_orphans(
        self, *, grace: float = 15.0, sleep: Callable[[float], None] = time.sleep
    ) -> list[TokenObject]:
        """Destroy the token objects of key versions that no row refers to (``hsmkms doctor
        --remove-orphans``): those that are orphans in two looks ``grace`` seconds apart (an
        object whose CreateKey or rotation is still committing its row is given that time; a
        row waits at most the database's busy timeout, 10 s). Returns what was destroyed.

        Only for objects left by interrupted creations: after restoring the database from an
        older copy, the objects of keys created since look the same — and are their only
        material."""
        first = {o.object_id for o in self.find_inconsistencies().orphans}
        if not first:
            return []
        sleep(grace)
        found = self.find_inconsistencies()
        removed = []
        for orphan in found.orphans:
            if orphan.object_id not in first:
                continue
            # destroy() destroys every object holding the id; the spec is not looked at.
            ref = KeyMaterialRef(
                KeyMaterialSpec.HMAC_256, None, (orphan.object_id,),
                found.orphan_stores[orphan.object_id],
            )  # fmt: skip
            self._stores.backend_for(ref).destroy(ref)
            log.warning("orphan_destroyed", object_id=orphan.object_id, label=orphan.label)
            removed.append(orphan)
        return removed

    def start_background(self, interval: float = 60.0) -> None:
        """Run :meth:`run_due_tasks` every ``interval`` seconds in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        stop = self._stop_event = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.run_due_tasks()
                except Exception:
                    log.exception("due_tasks_failed")

        self._thread = threading.Thread(target=loop, name="hsmkms-due-tasks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the background thread (if running) and wait for it."""
        if self._stop_event is not None:
            self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop background work, close the store and log the keystore out (end of process)."""
        self.stop()
        self._store.close()
        self._stores.close()
