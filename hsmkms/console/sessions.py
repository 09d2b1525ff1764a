"""Console sessions: who is signed in to the read-only web console, in the metadata database,
each row authenticated by a MAC key inside the token.

A session is 32 random bytes given to the browser as a cookie (never stored: the database holds
its SHA-256), the access key id it was opened with, its expiry and its CSRF token. The database
is not trusted, so each row carries an HMAC-SHA-256 tag made inside the token with the console's
own non-extractable key (label ``hsmkms:console``)::

    tag = HMAC(b"hsmkms-console-session-v1\\n" || id_hash || "\\n" || access_key_id || "\\n"
               || expires_at || "\\n" || csrf)

so a row written into the database by someone without the token (a session "for the root") does
not open, nor does one whose expiry or access key id was edited. Each worker of a server reads the
same rows, so a session opened in one worker is known to all; signing out deletes the row at once.

Tables (component ``console`` of the database layer's migration runner)::

    console_settings  name -> value: ``mac_key`` (KeyMaterialRef text of HMAC_256 material)
    console_sessions  id_hash (PK, hex), access_key_id, created_at, expires_at, csrf, tag
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
from typing import Final

from sqlalchemy import Column, Connection, MetaData, String, Table, delete, insert, select

from hsmkms.db import Component, Database, ErrorMessages, Migration, migrate
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName, checked_mac_key
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.types import Clock, utc_now

__all__ = ["CONSOLE_KEY_NAME", "SESSION_LIFETIME", "ConsoleSessions", "Session"]

CONSOLE_KEY_NAME: Final = "console"
SESSION_LIFETIME: Final = dt.timedelta(hours=8)
_DOMAIN: Final = b"hsmkms-console-session-v1\n"
_ERRORS: Final = ErrorMessages(busy="The console is busy.", failed="The console failed.")
_TIME: Final = "%Y-%m-%dT%H:%M:%S.%fZ"

metadata = MetaData()
console_settings = Table(
    "console_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(512), nullable=False),
)
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("access_key_id", String(128), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("expires_at", String(32), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("tag", String(64), nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


COMPONENT: Final = Component("console", [Migration(1, "console_settings, console_sessions", _v1)])


@dataclasses.dataclass(frozen=True)
class Session:
    """An open console session (never its secret id)."""

    access_key_id: str
    csrf: str
    expires_at: dt.datetime


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _payload(id_hash: str, access_key_id: str, expires_at: str, csrf: str) -> bytes:
    return _DOMAIN + "\n".join((id_hash, access_key_id, expires_at, csrf)).encode()


class ConsoleSessions:
    """Console sessions in ``database``, authenticated by a MAC key in ``keystore``'s token.
    Thread-safe; one per worker process."""

    def __init__(
        self,
        database: Database,
        keystore: Keystore,
        *,
        clock: Clock = utc_now,
        lifetime: dt.timedelta = SESSION_LIFETIME,
    ) -> None:
        self._db = database
        self._keystore = keystore
        self._clock = clock
        self._lifetime = lifetime
        with self._db.write(_ERRORS) as conn:
            migrate(conn, COMPONENT, clock)
            row = conn.execute(
                select(console_settings.c.value).where(console_settings.c.name == "mac_key")
            ).first()
            if row is None:
                # Made under the write lock: the workers of a server agree on one key.
                ref = keystore.create(
                    KeyMaterialSpec.HMAC_256, MaterialName.service_key(CONSOLE_KEY_NAME)
                )
                conn.execute(insert(console_settings).values(name="mac_key", value=ref.to_str()))
                text = ref.to_str()
            else:
                text = str(row.value)
        self._key: KeyMaterialRef = checked_mac_key(keystore, text, CONSOLE_KEY_NAME)

    def open(self, access_key_id: str) -> tuple[str, Session]:
        """A new session for ``access_key_id`` (already authenticated): the cookie value (the
        only time it exists) and the session. Expired sessions are removed meanwhile."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        now = self._clock()
        expires = now + self._lifetime
        id_hash = _hash(token)
        expires_text = expires.astimezone(dt.UTC).strftime(_TIME)
        tag = self._keystore.mac(self._key, _payload(id_hash, access_key_id, expires_text, csrf))
        with self._db.write(_ERRORS) as conn:
            conn.execute(
                delete(console_sessions).where(
                    console_sessions.c.expires_at < now.astimezone(dt.UTC).strftime(_TIME)
                )
            )
            conn.execute(
                insert(console_sessions).values(
                    id_hash=id_hash,
                    access_key_id=access_key_id,
                    created_at=now.astimezone(dt.UTC).strftime(_TIME),
                    expires_at=expires_text,
                    csrf=csrf,
                    tag=tag.hex(),
                )
            )
        return token, Session(access_key_id, csrf, expires)

    def get(self, token: str | None) -> Session | None:
        """The open session of a cookie value; None when unknown, expired or its row does not
        verify against the token."""
        if not token or len(token) > 128:
            return None
        id_hash = _hash(token)
        with self._db.read(_ERRORS) as conn:
            row = conn.execute(
                select(console_sessions).where(console_sessions.c.id_hash == id_hash)
            ).first()
        if row is None:
            return None
        try:
            tag = bytes.fromhex(row.tag)
            expires = dt.datetime.strptime(row.expires_at, _TIME).replace(tzinfo=dt.UTC)
        except ValueError:
            return None
        payload = _payload(id_hash, row.access_key_id, row.expires_at, row.csrf)
        if not self._keystore.verify_mac(self._key, payload, tag):
            return None
        if expires <= self._clock():
            return None
        return Session(str(row.access_key_id), str(row.csrf), expires)

    def close(self, token: str | None) -> None:
        """Sign out: forget the session (nothing when there is none)."""
        if not token or len(token) > 128:
            return
        with self._db.write(_ERRORS) as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.id_hash == _hash(token)))
