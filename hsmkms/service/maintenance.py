"""The service's own work: due automatic rotations, purges of deleted keys, expiry of imported
key material and of import tokens (periodically in a background thread, or once), and the
comparison of the token with the store that ``hsmkms doctor`` reports."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable

from hsmkms.errors import KMSInvalidStateException
from hsmkms.keystore.base import KeyMaterialRef, Keystore, TokenObject
from hsmkms.keystore.imports import WrappingKeyRef, WrappingKeySpec, wrapping_key_end
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.models.enums import RotationType
from hsmkms.service.core import ServiceCore, log
from hsmkms.store import DELETING, ImportTokenRecord

LEFTOVER_SWEEP_INTERVAL = 3600.0
"""Seconds between two looks for wrapping key pairs that no import token names (a crash between
making one and recording its token): each look lists the token's objects."""


@dataclasses.dataclass(frozen=True)
class DueTaskReport:
    """What one :meth:`Maintenance.run_due_tasks` pass did."""

    rotated: list[str]
    purged: list[str]
    expired: list[str] = dataclasses.field(default_factory=list)
    """Keys whose imported key material expired (and was deleted) in this pass."""
    import_tokens: int = 0
    """Import tokens that expired in this pass (their wrapping key pairs destroyed)."""


@dataclasses.dataclass(frozen=True)
class Inconsistencies:
    """Differences between the token and the store (``hsmkms doctor``).

    ``orphans``: token objects of this project that no key version refers to (for example left
    by a crash between creating the object and committing its row). ``missing``: key versions
    whose token object(s) are not on the token.
    """

    orphans: list[TokenObject]
    missing: list[tuple[str, int]]
    """(A wrapped key version is missing when its KEK is.)"""
    orphan_stores: dict[str, str] = dataclasses.field(default_factory=dict)
    """The key store holding each orphan (by object id)."""


class Maintenance(ServiceCore):
    """Periodic work and diagnostics of :class:`~hsmkms.service.KmsService`."""

    _thread: threading.Thread | None = None
    _stop_event: threading.Event | None = None
    _last_leftover_sweep: float | None = None

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

    def expire_due_material(self) -> list[str]:
        """Delete imported key material whose ValidTo has come: its token objects are destroyed
        and the key becomes PendingImport (as DeleteImportedKeyMaterial; a CloudTrail
        ``DeleteExpiredKeyMaterial`` service event). Returns the key ids."""
        expired = []
        for material in self._store.expired_materials(self._clock()):
            key = self._store.get_key(material.key_id)
            if key is None or key.state == DELETING:
                continue
            try:
                if not self._forget_material(material.key_id, material.version):
                    continue
            except Exception:
                log.exception("material_expiry_failed", key_id=material.key_id)
                continue
            log.info("key_material_expired", key_id=material.key_id, version=material.version)
            self._emit("DeleteExpiredKeyMaterial", key.arn, material.version)
            expired.append(material.key_id)
        return expired

    def purge_import_tokens(self) -> int:
        """Forget expired import tokens and destroy their wrapping key pairs; now and then,
        also wrapping key pairs no token names whose label's day has passed (left by a crash
        between making the pair and recording its token). Returns the number of tokens
        purged."""
        now = self._clock()
        purged = 0
        for token in self._store.import_tokens(expired_by=now):
            if self._destroy_import_token(token):
                purged += 1
        last = self._last_leftover_sweep
        if last is None or time.monotonic() - last >= LEFTOVER_SWEEP_INTERVAL:
            self._last_leftover_sweep = time.monotonic()
            self._sweep_leftover_wrapping_keys(now.date())
        return purged

    def _destroy_import_token(self, token: ImportTokenRecord) -> bool:
        try:
            ref = WrappingKeyRef.from_str(token.wrapping_key)
            self._stores.get(ref.store).destroy_wrapping_key(ref)
            return self._store.delete_import_token(token.token_id)
        except Exception:
            log.exception("import_token_purge_failed", key_id=token.key_id)
            return False

    def _sweep_leftover_wrapping_keys(self, today: dt.date) -> None:
        named = {
            WrappingKeyRef.from_str(t.wrapping_key).object_id for t in self._store.import_tokens()
        }
        for store_id, backend in self._stores.items():
            try:
                leftovers = [
                    o
                    for o in backend.list_objects()
                    if o.is_wrapping_key and o.object_id not in named
                ]
                for obj in leftovers:
                    self._destroy_leftover(store_id, backend, obj, today)
            except Exception:
                log.exception("wrapping_key_sweep_failed", store=store_id)

    @staticmethod
    def _destroy_leftover(
        store_id: str, backend: Keystore, obj: TokenObject, today: dt.date
    ) -> None:
        end = wrapping_key_end(obj.label)
        # A pair made moments ago, whose token row is not committed yet, ends in the future.
        if end is None or end >= today:
            return
        modulus = backend.attributes(obj.object_id, ["MODULUS"]).get("MODULUS")
        try:
            spec = WrappingKeySpec(f"RSA_{len(modulus or b'') * 8}")
        except ValueError:
            return
        backend.destroy_wrapping_key(WrappingKeyRef(spec, obj.object_id, store_id))
        log.info("leftover_wrapping_key_destroyed", store=store_id)

    def purge_due(self) -> list[str]:
        """Destroy keys whose deletion date has passed: every token object of every version
        (``C_DestroyObject``), then their rows, aliases and tags. Returns the purged key ids.
        A wrapped version has no token object (``destroy`` leaves the token alone): deleting
        its row, the only copy of its wrapped material, destroys it.

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
                for token in self._store.import_tokens(key_id=key.key_id):
                    wrapping = WrappingKeyRef.from_str(token.wrapping_key)
                    self._stores.get(wrapping.store).destroy_wrapping_key(wrapping)
                self._store.delete_key(key.key_id)
            except KMSInvalidStateException as exc:
                # Its custom key store is not connected: its material stays in that token
                # (and the key Deleting) until the store is connected again.
                log.warning("purge_waits_for_key_store", key_id=key.key_id, reason=exc.message)
                continue
            except Exception:
                log.exception("purge_failed", key_id=key.key_id)
                continue
            log.info("key_deleted", key_id=key.key_id)
            self._emit("DeleteKey", key.arn)
            purged.append(key.key_id)
        return purged

    def run_due_tasks(self) -> DueTaskReport:
        """One pass of the periodic work: due automatic rotations, due deletions, expired
        imported key material, expired import tokens; custom key stores whose connection
        attempt was abandoned are set FAILED."""
        if self._custom is not None:
            try:
                self._custom.settle_stale(self._clock())
            except Exception:
                log.exception("custom_key_store_settle_failed")
        return DueTaskReport(
            rotated=self.rotate_due(),
            purged=self.purge_due(),
            expired=self.expire_due_material(),
            import_tokens=self.purge_import_tokens(),
        )

    def find_inconsistencies(self) -> Inconsistencies:
        """Compare the token's objects with the store's key versions (``hsmkms doctor``).

        The token is listed first, so an object created (and committed) after the listing is
        not reported; an object whose row is not committed yet may be reported as an orphan.
        """
        objects = {store_id: backend.list_objects() for store_id, backend in self._stores.items()}
        present = {s: {o.object_id for o in listed} for s, listed in objects.items()}
        referenced: dict[str, set[str]] = {store_id: set() for store_id in objects}
        missing: list[tuple[str, int]] = []
        unchecked: set[str] = set()  # custom key stores not connected: their keys not checked
        for version, state in self._store.all_versions():
            ref = KeyMaterialRef.from_str(version.material_ref)
            if ref.store not in objects and not self._list_custom_store(
                ref.store, objects, present, referenced, unchecked
            ):
                continue
            # Wrapped material has no object of its own: it needs its KEK.
            needed = ref.token_object_ids
            referenced.setdefault(ref.store, set()).update(needed)
            in_store = present.get(ref.store, set())  # an unregistered store: all missing
            if state != DELETING and not all(oid in in_store for oid in needed):
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

    def _list_custom_store(
        self,
        store_id: str,
        objects: dict[str, list[TokenObject]],
        present: dict[str, set[str]],
        referenced: dict[str, set[str]],
        unchecked: set[str],
    ) -> bool:
        """List a custom key store's token into the consistency check's maps; False when it
        is not connected (or not a custom key store): its versions are not checked."""
        if store_id in unchecked:
            return False
        custom = self._custom
        if custom is None or custom.table.get(store_id) is None:
            return True  # an unregistered store: all missing
        try:
            listed = custom.backend(store_id).list_objects()
        except Exception:
            unchecked.add(store_id)
            return False
        objects[store_id] = listed
        present[store_id] = {o.object_id for o in listed}
        referenced[store_id] = set()
        return True

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
        self.close_custom_key_stores()
        self._stores.close()
