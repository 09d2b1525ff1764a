"""Column types whose storage differs between dialects; the differences stay here."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, DateTime, Dialect, Integer, TypeDecorator

__all__ = ["BigIntKey", "UTCDateTime"]


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC timestamp on every dialect.

    SQLite has no time zone type: values are stored as naive UTC and read back as aware UTC.
    PostgreSQL gets ``TIMESTAMP WITH TIME ZONE``. Naive datetimes are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError("timestamps must be aware datetimes")
        utc = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


BigIntKey = BigInteger().with_variant(Integer(), "sqlite")
"""A 64-bit integer primary key given by the application (``autoincrement=False``): ``BIGINT``,
but ``INTEGER`` on SQLite, where ``INTEGER PRIMARY KEY`` is the rowid itself (no second index)
and already 64 bits."""
