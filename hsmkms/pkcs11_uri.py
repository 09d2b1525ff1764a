"""RFC 7512 PKCS#11 URIs: parsed (:func:`parse_pkcs11_uri`), formatted back
(:func:`format_pkcs11_uri`) and redacted for display (:func:`redact_pkcs11_uri`).

Security contract: a PIN (``pin-value``) never appears in an exception message, nor in the
``repr`` or ``str`` of a :class:`Pkcs11Uri`. :mod:`hsmkms.config` resolves a URI, with the
settings, into the keystore's configuration.
"""

from __future__ import annotations

__all__ = [
    "CK_ULONG_MAX",
    "OBJECT_TYPES",
    "Pkcs11Uri",
    "format_pkcs11_uri",
    "parse_pkcs11_uri",
    "pin_source_path",
    "redact_pkcs11_uri",
]

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from hsmkms.errors import ConfigError

# --------------------------------------------------------------------------------------------
# RFC 7512 PKCS#11 URI
# --------------------------------------------------------------------------------------------

_SCHEME = "pkcs11"
_MAX_URI_LENGTH = 8192
CK_ULONG_MAX = 2**64 - 1

# RFC 7512 §2.3: pk11-attr names, mapped to Pkcs11Uri field names. Order = formatting order.
_PATH_ATTRS: dict[str, str] = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "slot-description": "slot_description",
    "slot-manufacturer": "slot_manufacturer",
    "slot-id": "slot_id",
    "object": "object",
    "id": "id",
    "type": "type",
}
_QUERY_ATTRS: dict[str, str] = {
    "module-name": "module_name",
    "module-path": "module_path",
    "pin-source": "pin_source",
    "pin-value": "pin_value",
}
# p11-kit's legacy aliases (uri.c) and likely confusions: refused with a pointer to the
# standard name rather than silently ignored as vendor attributes.
_LEGACY_ALIASES: dict[str, str] = {
    "pinfile": "pin-source",
    "objecttype": "type",
    "object-type": "type",
    "label": "token",
    "slot": "slot-id",
    "pin": "pin-source",
}
OBJECT_TYPES = frozenset({"cert", "data", "private", "public", "secret-key"})

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
# pk11-pchar / pk11-qchar without pct-encoded: what may appear unencoded in a value.
_PATH_CHARS = _UNRESERVED | _RES_AVAIL | {"&"}
_QUERY_CHARS = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}
_HEX = frozenset("0123456789abcdefABCDEF")
_ATTR_NAME = re.compile(r"[A-Za-z0-9_-]+")  # pk11-v-attr-nm-char
_DECIMAL = re.compile(r"[0-9]+")
_LIBRARY_VERSION = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,3}))?")


@dataclasses.dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 PKCS#11 URI. Field names are the attribute names with ``_``.

    ``None`` means the attribute is absent; ``""`` means present and empty (``serial=``).
    Construction validates every field, so any instance formats to a URI that parses back to
    an equal instance. ``pin_value`` never shows in ``repr``/``str``.
    """

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, int] | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_name: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                _check_encodable(value, field.name)
        if self.slot_id is not None and (
            isinstance(self.slot_id, bool) or not 0 <= self.slot_id <= CK_ULONG_MAX
        ):
            raise ConfigError("PKCS#11 URI: slot-id must be a decimal number from 0 to 2^64-1")
        if self.library_version is not None and not (
            len(self.library_version) == 2
            and all(not isinstance(n, bool) and 0 <= n <= 255 for n in self.library_version)
        ):
            raise ConfigError("PKCS#11 URI: library-version must be M or M.m with 0 <= M, m <= 255")
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise ConfigError(
                f"PKCS#11 URI: type must be one of {', '.join(sorted(OBJECT_TYPES))}, "
                f"not {self.type!r}"
            )
        if self.module_path is not None and (
            not self.module_path.startswith("/") or "\0" in self.module_path
        ):
            raise ConfigError("PKCS#11 URI: module-path must be an absolute path")
        if self.module_name is not None and (
            not self.module_name or "/" in self.module_name or "\0" in self.module_name
        ):
            raise ConfigError(
                "PKCS#11 URI: module-name must be a bare library name such as 'softhsm2' "
                "(use module-path for a path)"
            )
        if self.pin_source is not None:
            pin_source_path(self.pin_source)
        if self.pin_value is not None and not self.pin_value:
            raise ConfigError("PKCS#11 URI: pin-value is empty")
        if self.pin_source is not None and self.pin_value is not None:
            # RFC 7512 §2.3: a URI with both pin-source and pin-value should be refused.
            raise ConfigError("PKCS#11 URI: pin-source and pin-value cannot both be given")

    def __repr__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            shown = "<redacted>" if field.name == "pin_value" else repr(value)
            parts.append(f"{field.name}={shown}")
        return f"Pkcs11Uri({', '.join(parts)})"

    __str__ = __repr__


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 ``pkcs11:`` URI.

    Values are percent-decoded as UTF-8 (``id`` as bytes). Standard attribute names are
    case-sensitive; a standard attribute given twice, in the wrong component (``pin-value``
    before ``?``), misspelt by case or separator (``Token``, ``slot_id``, ``x-token``), or a
    p11-kit legacy alias (``pinfile``) is an error. Any other well-formed name is a vendor
    attribute and ignored. Raises only :class:`ConfigError`, whose message never contains a
    value of ``pin-value``.
    """
    if not isinstance(uri, str):
        raise ConfigError("PKCS#11 URI: must be a string")
    if len(uri) > _MAX_URI_LENGTH:
        raise ConfigError(f"PKCS#11 URI: longer than {_MAX_URI_LENGTH} characters")
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() != _SCHEME:
        raise ConfigError("PKCS#11 URI: must start with 'pkcs11:'")
    path, _, query = rest.partition("?")
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    if path:
        for index, segment in enumerate(path.split(";"), start=1):
            _parse_attribute(segment, index, "path", fields, seen)
    if query:
        for index, segment in enumerate(query.split("&"), start=1):
            _parse_attribute(segment, index, "query", fields, seen)
    return Pkcs11Uri(**fields)


def _parse_attribute(
    segment: str,
    index: int,
    component: Literal["path", "query"],
    fields: dict[str, Any],
    seen: set[str],
) -> None:
    where = f"PKCS#11 URI: {component} attribute {index}"
    name, equals, raw = segment.partition("=")
    if not segment:
        raise ConfigError(f"{where} is empty (stray ';' or '&'?)")
    if not equals:
        raise ConfigError(f"{where} has no '=' (expected name=value)")
    if not _ATTR_NAME.fullmatch(name):
        raise ConfigError(f"{where} has an invalid name (letters, digits, '-' and '_' only)")
    own, other = (_PATH_ATTRS, _QUERY_ATTRS) if component == "path" else (_QUERY_ATTRS, _PATH_ATTRS)
    allowed = _PATH_CHARS if component == "path" else _QUERY_CHARS
    if name in other:
        place = "before '?'" if component == "query" else "after '?'"
        raise ConfigError(
            f"PKCS#11 URI: {name!r} is a {_other(component)} attribute; put it {place}"
        )
    if name not in own:
        standard = _misspelt_standard_name(name)
        if standard is not None:
            raise ConfigError(
                f"PKCS#11 URI: unknown attribute {name!r}; did you mean {standard!r}? "
                "(attribute names are case-sensitive)"
            )
        # RFC 7512 §2.3: a vendor attribute; still has to be well-formed, but is not used.
        _percent_decode(raw, name, allowed, secret=False)
        return
    if name in seen:
        raise ConfigError(f"PKCS#11 URI: attribute {name!r} is given more than once")
    seen.add(name)
    data = _percent_decode(raw, name, allowed, secret=name == "pin-value")
    fields[own[name]] = _convert(name, data)


def _other(component: str) -> str:
    return "query" if component == "path" else "path"


def _misspelt_standard_name(name: str) -> str | None:
    """The standard name ``name`` looks like a variant of, or ``None`` for a vendor name."""
    lowered = name.lower()
    if lowered in _LEGACY_ALIASES:
        return _LEGACY_ALIASES[lowered]
    lowered = lowered.removeprefix("x-").removeprefix("x_")
    squashed = lowered.replace("-", "").replace("_", "")
    for standard in (*_PATH_ATTRS, *_QUERY_ATTRS):
        if squashed == standard.replace("-", ""):
            return standard
    return None


def _percent_decode(raw: str, name: str, allowed: frozenset[str], *, secret: bool) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            digits = raw[i + 1 : i + 3]
            if len(digits) != 2 or not all(d in _HEX for d in digits):
                raise ConfigError(
                    f"PKCS#11 URI: bad percent-encoding in {name!r} "
                    "('%' must be followed by two hex digits)"
                )
            out.append(int(digits, 16))
            i += 3
        elif char in allowed:
            out.append(ord(char))
            i += 1
        else:
            shown = "a character" if secret else repr(char)
            raise ConfigError(
                f"PKCS#11 URI: {name!r} contains {shown} that must be percent-encoded"
            )
    return bytes(out)


def _convert(name: str, data: bytes) -> Any:
    if name == "id":
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"PKCS#11 URI: {name!r} is not valid UTF-8 once decoded") from None
    if name == "slot-id":
        if not _DECIMAL.fullmatch(text) or len(text) > 20:
            raise ConfigError("PKCS#11 URI: slot-id must be a decimal number")
        return int(text)
    if name == "library-version":
        match = _LIBRARY_VERSION.fullmatch(text)
        if match is None:
            raise ConfigError("PKCS#11 URI: library-version must be M or M.m (decimal)")
        return (int(match.group(1)), int(match.group(2) or 0))
    return text


def _check_encodable(value: str, field_name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"PKCS#11 URI: {field_name.replace('_', '-')!r} is not encodable as UTF-8"
        ) from None


def _percent_encode(data: bytes, unencoded: frozenset[str]) -> str:
    return "".join(chr(b) if chr(b) in unencoded else f"%{b:02X}" for b in data)


def format_pkcs11_uri(uri: Pkcs11Uri) -> str:
    """The canonical RFC 7512 text of ``uri``; ``parse_pkcs11_uri`` gives back an equal value.

    Attributes come in a fixed order, ``id`` is fully percent-encoded, other values only where
    RFC 7512 requires it. The result contains ``pin-value`` if ``uri`` has one: do not log it.
    """
    path: list[str] = []
    for name, field_name in _PATH_ATTRS.items():
        value = getattr(uri, field_name)
        if value is None:
            continue
        if name == "id":
            encoded = _percent_encode(value, frozenset())
        elif name == "library-version":
            encoded = f"{value[0]}.{value[1]}"
        elif name == "slot-id":
            encoded = str(value)
        else:
            encoded = _percent_encode(value.encode("utf-8"), _PATH_CHARS - {"&"})
        path.append(f"{name}={encoded}")
    query: list[str] = []
    for name, field_name in _QUERY_ATTRS.items():
        value = getattr(uri, field_name)
        if value is not None:
            query.append(f"{name}={_percent_encode(value.encode('utf-8'), _QUERY_CHARS)}")
    text = f"{_SCHEME}:{';'.join(path)}"
    return f"{text}?{'&'.join(query)}" if query else text


_PIN_VALUE_IN_TEXT = re.compile(r"(pin-value=)[^;&]*")


def redact_pkcs11_uri(uri: str) -> str:
    """``uri`` with any ``pin-value`` replaced by ``***``; works on unparseable text too."""
    return _PIN_VALUE_IN_TEXT.sub(r"\1***", uri)


def pin_source_path(pin_source: str) -> Path:
    """The file a ``pin-source`` names: ``file:/abs``, ``file:///abs``, or ``/abs``."""
    if pin_source.startswith("|"):
        raise ConfigError(
            "PKCS#11 URI: pin-source commands ('|...') are not supported; "
            "use pin-source=file:/path/to/pin"
        )
    path = pin_source
    if path.startswith("file:"):
        path = path.removeprefix("file:")
        if path.startswith("//"):
            authority, slash, rest = path[2:].partition("/")
            if authority not in ("", "localhost"):
                raise ConfigError("PKCS#11 URI: pin-source must be a local file (file:/path)")
            path = slash + rest
    elif ":" in path.split("/", 1)[0]:
        raise ConfigError("PKCS#11 URI: pin-source supports only file: URIs and absolute paths")
    if not path.startswith("/") or "\0" in path:
        raise ConfigError("PKCS#11 URI: pin-source must name an absolute path (file:/path)")
    return Path(path)
