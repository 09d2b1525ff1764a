"""Settings, RFC 7512 PKCS#11 URIs, PIN sources and KeystoreConfig resolution (no HSM)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hsmkms import config
from hsmkms.config import (
    OBJECT_TYPES,
    ConfigError,
    PinSource,
    Pkcs11Uri,
    Settings,
    cluster_keystore_config,
    embedded_module_path,
    find_module_by_name,
    format_pkcs11_uri,
    keystore_config,
    parse_pkcs11_uri,
    pin_file_is_private,
    read_pin,
    redact_pkcs11_uri,
    resolve_pin_source,
)
from hsmkms.errors import ClientError
from hsmkms.keystore.config import KeyPlacement
from hsmkms.profiles import MechanismProfile

PIN = "s3cr3t-PIN-4711"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HSMKMS_* variable from the outer environment leaks in; cwd is a scratch dir."""
    for name in list(os.environ):
        if name.upper().startswith("HSMKMS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _pin_file(tmp_path: Path, content: str = PIN + "\n", name: str = "pin") -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    path.chmod(0o600)
    return path


def _fake_module(directory: Path, filename: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_bytes(b"\x7fELF")
    return path


# --------------------------------------------------------------------------------------------
# ConfigError
# --------------------------------------------------------------------------------------------


def test_config_error_is_a_client_error_with_validation_exception_code() -> None:
    assert issubclass(ConfigError, ClientError)
    assert ConfigError.code == "ValidationException"
    assert ConfigError("x").status == 400


# --------------------------------------------------------------------------------------------
# parse_pkcs11_uri: RFC 7512 examples (reference/pkcs11-facts.md §5.4)
# --------------------------------------------------------------------------------------------


def test_rfc_example_object_and_type_with_pin_source_parse() -> None:
    uri = parse_pkcs11_uri("pkcs11:object=my-key;type=private?pin-source=file:/etc/token")
    assert uri == Pkcs11Uri(object="my-key", type="private", pin_source="file:/etc/token")


def test_rfc_example_full_token_description_parses_every_field() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin"
    )
    assert uri.token == "The Software PKCS#11 Softtoken"
    assert uri.manufacturer == "Snake Oil, Inc."
    assert uri.model == "1.0"
    assert uri.object == "my-certificate"
    assert uri.type == "cert"
    assert uri.id == bytes([0x69, 0x95, 0x3E, 0x5C, 0xF4, 0xBD, 0xEC, 0x91])
    assert uri.serial == ""
    assert uri.pin_source == "file:/etc/token_pin"
    assert uri.pin_value is None


def test_rfc_example_module_name_parses() -> None:
    uri = parse_pkcs11_uri("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11")
    assert uri == Pkcs11Uri(object="my-sign-key", type="private", module_name="mypkcs11")


def test_rfc_example_pin_value_parses() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=Software%20PKCS%2311%20softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin"
    )
    assert uri.token == "Software PKCS#11 softtoken"
    assert uri.manufacturer == "Snake Oil, Inc."
    assert uri.pin_value == "the-pin"


# --------------------------------------------------------------------------------------------
# parse_pkcs11_uri: accepted forms
# --------------------------------------------------------------------------------------------


def test_bare_scheme_is_a_valid_empty_uri() -> None:
    assert parse_pkcs11_uri("pkcs11:") == Pkcs11Uri()


def test_empty_query_after_question_mark_is_accepted() -> None:
    assert parse_pkcs11_uri("pkcs11:token=a?") == Pkcs11Uri(token="a")


def test_scheme_is_case_insensitive() -> None:
    assert parse_pkcs11_uri("PKCS11:token=a") == Pkcs11Uri(token="a")


def test_every_path_attribute_maps_to_its_field() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=t;manufacturer=m;serial=s;model=mo;library-manufacturer=lm;"
        "library-description=ld;library-version=2.6;slot-description=sd;"
        "slot-manufacturer=sm;slot-id=7;object=o;id=%01%02;type=secret-key"
    )
    assert uri == Pkcs11Uri(
        token="t",
        manufacturer="m",
        serial="s",
        model="mo",
        library_manufacturer="lm",
        library_description="ld",
        library_version=(2, 6),
        slot_description="sd",
        slot_manufacturer="sm",
        slot_id=7,
        object="o",
        id=b"\x01\x02",
        type="secret-key",
    )


def test_every_query_attribute_maps_to_its_field() -> None:
    uri = parse_pkcs11_uri("pkcs11:?module-name=softhsm2&module-path=/usr/lib/x.so&pin-value=p")
    assert uri.module_name == "softhsm2"
    assert uri.module_path == "/usr/lib/x.so"
    assert uri.pin_value == "p"


def test_library_version_without_minor_means_minor_zero() -> None:
    assert parse_pkcs11_uri("pkcs11:library-version=3").library_version == (3, 0)


@pytest.mark.parametrize("object_type", sorted(OBJECT_TYPES))
def test_every_rfc_object_type_is_accepted(object_type: str) -> None:
    assert parse_pkcs11_uri(f"pkcs11:type={object_type}").type == object_type


def test_percent_encoding_is_decoded_as_utf8_with_either_hex_case() -> None:
    assert parse_pkcs11_uri("pkcs11:token=caf%C3%A9%2fx%2F").token == "café/x/"


def test_id_is_decoded_as_raw_bytes_not_utf8() -> None:
    assert parse_pkcs11_uri("pkcs11:id=%FF%00%80").id == b"\xff\x00\x80"


def test_ampersand_is_allowed_unencoded_in_a_path_value() -> None:
    assert parse_pkcs11_uri("pkcs11:token=a&b;object=c").token == "a&b"


def test_slash_question_mark_and_pipe_are_allowed_unencoded_in_a_query_value() -> None:
    uri = parse_pkcs11_uri("pkcs11:?module-path=/opt/a?b|c/lib.so")
    assert uri.module_path == "/opt/a?b|c/lib.so"


def test_equals_sign_inside_a_value_is_kept() -> None:
    assert parse_pkcs11_uri("pkcs11:object=a=b").object == "a=b"


def test_vendor_attributes_are_ignored_and_may_repeat() -> None:
    uri = parse_pkcs11_uri("pkcs11:x-foo=1;token=t;x-foo=2;vendor_attr=3?x-bar=%41&x-bar=b")
    assert uri == Pkcs11Uri(token="t")


@pytest.mark.parametrize(
    "pin_source",
    ["file:/etc/pin", "file:///etc/pin", "file://localhost/etc/pin", "/etc/pin"],
)
def test_local_file_pin_sources_are_accepted(pin_source: str) -> None:
    assert parse_pkcs11_uri(f"pkcs11:?pin-source={pin_source}").pin_source == pin_source


# --------------------------------------------------------------------------------------------
# parse_pkcs11_uri: rejected forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("token=a", "must start with 'pkcs11:'"),
        ("pkcs12:token=a", "must start with 'pkcs11:'"),
        ("", "must start with 'pkcs11:'"),
        ("pkcs11:token=a;token=b", "more than once"),
        ("pkcs11:?pin-source=file:/a&pin-source=file:/b", "more than once"),
        ("pkcs11:token=a%2", "percent-encoding"),
        ("pkcs11:token=a%zz", "percent-encoding"),
        ("pkcs11:token=a%", "percent-encoding"),
        ("pkcs11:token=%+f", "percent-encoding"),
        ("pkcs11:slot-id=x1", "slot-id must be a decimal"),
        ("pkcs11:slot-id=0x10", "slot-id must be a decimal"),
        ("pkcs11:slot-id=-1", "slot-id must be a decimal"),
        ("pkcs11:slot-id=", "slot-id must be a decimal"),
        ("pkcs11:slot-id=%D9%A1", "slot-id must be a decimal"),
        ("pkcs11:slot-id=18446744073709551616", "slot-id"),
        ("pkcs11:library-version=1.2.3", "library-version"),
        ("pkcs11:library-version=256", "library-version"),
        ("pkcs11:type=key", "type must be one of"),
        ("pkcs11:token=My Token", "must be percent-encoded"),
        ("pkcs11:token=a/b", "must be percent-encoded"),
        ("pkcs11:token=a#b", "must be percent-encoded"),
        ("pkcs11:token=caf\u00e9", "must be percent-encoded"),
        ("pkcs11:?module-path=/a;b", "must be percent-encoded"),
        ("pkcs11:token=%FF", "not valid UTF-8"),
        ("pkcs11:label=a", "unknown attribute 'label'; did you mean 'token'"),
        ("pkcs11:?pin=1234", "did you mean 'pin-source'"),
        ("pkcs11:Token=a", "did you mean 'token'"),
        ("pkcs11:slot_id=1", "did you mean 'slot-id'"),
        ("pkcs11:x-token=a", "did you mean 'token'"),
        ("pkcs11:?pinfile=/etc/pin", "did you mean 'pin-source'"),
        ("pkcs11:object-type=cert", "did you mean 'type'"),
        ("pkcs11:pin-source=file:/a", "query attribute"),
        ("pkcs11:?token=a", "path attribute"),
        ("pkcs11:token=a;", "empty"),
        ("pkcs11:token=a;;object=b", "empty"),
        ("pkcs11:token", "has no '='"),
        ("pkcs11:=a", "invalid name"),
        ("pkcs11:to.ken=a", "invalid name"),
        ("pkcs11:?module-path=lib/x.so", "absolute path"),
        ("pkcs11:?module-name=a%2Fb", "bare library name"),
        ("pkcs11:?module-name=", "bare library name"),
        ("pkcs11:?pin-source=relative/pin", "absolute path"),
        ("pkcs11:?pin-source=file:relative", "absolute path"),
        ("pkcs11:?pin-source=file://server/etc/pin", "local file"),
        ("pkcs11:?pin-source=https://example.com/pin", "file: URIs"),
        ("pkcs11:?pin-value=", "pin-value is empty"),
    ],
)
def test_malformed_uri_is_rejected_with_a_message_naming_the_problem(
    uri: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match="PKCS#11 URI") as caught:
        parse_pkcs11_uri(uri)
    assert fragment in caught.value.message
    assert "\n" not in caught.value.message


def test_command_pin_source_is_rejected_as_not_supported() -> None:
    with pytest.raises(ConfigError, match=r"commands \('\|\.\.\.'\) are not supported"):
        parse_pkcs11_uri("pkcs11:token=a?pin-source=|/usr/bin/get-pin")


def test_pin_source_and_pin_value_together_are_rejected() -> None:
    with pytest.raises(ConfigError, match="cannot both be given") as caught:
        parse_pkcs11_uri(f"pkcs11:?pin-source=file:/etc/pin&pin-value={PIN}")
    assert PIN not in str(caught.value)


def test_overlong_uri_is_rejected() -> None:
    with pytest.raises(ConfigError, match="longer than"):
        parse_pkcs11_uri("pkcs11:token=" + "a" * 9000)


def test_non_string_uri_is_rejected() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        parse_pkcs11_uri(b"pkcs11:token=a")  # type: ignore[arg-type]


def test_pkcs11_uri_constructor_validates_fields() -> None:
    with pytest.raises(ConfigError, match="slot-id"):
        Pkcs11Uri(slot_id=-1)
    with pytest.raises(ConfigError, match="library-version"):
        Pkcs11Uri(library_version=(1, 256))
    with pytest.raises(ConfigError, match="not encodable"):
        Pkcs11Uri(token="\ud800")


# --------------------------------------------------------------------------------------------
# The PIN never leaks from a URI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        f"pkcs11:?pin-value={PIN}%zz",
        f"pkcs11:?pin-value={PIN} x",
        f"pkcs11:?pin-value={PIN}%FF",
        f"pkcs11:pin-value={PIN}",
        f"pkcs11:?pin-value={PIN}&pin-value={PIN}",
        f"pkcs11:?pin-value={PIN}&pin-source=file:/x",
        f"pkcs11:?pin-value={PIN}&module-path=relative",
        f"pkcs11:?pin-value={PIN}&x=%",
        f"pkcs11:?{PIN}",
        f"pkcs11:{PIN}",
        f"pkcs11:token={PIN}?pin-value={PIN};",
        f"pkcs11:?pin-value={PIN}&type=bad",
        f"pkcs12:?pin-value={PIN}",
    ],
)
def test_pin_never_appears_in_a_uri_error(uri: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pkcs11_uri(uri.replace(f"token={PIN}", "token=t"))
    assert PIN not in str(caught.value)
    assert PIN not in repr(caught.value)


def test_pkcs11_uri_repr_and_str_redact_the_pin_value() -> None:
    uri = parse_pkcs11_uri(f"pkcs11:token=t?pin-value={PIN}")
    assert PIN not in repr(uri)
    assert PIN not in str(uri)
    assert "pin_value=<redacted>" in repr(uri)
    assert "token='t'" in repr(uri)


def test_redact_pkcs11_uri_masks_pin_value_even_in_unparseable_text() -> None:
    assert redact_pkcs11_uri(f"pkcs11:?pin-value={PIN}&x=1") == "pkcs11:?pin-value=***&x=1"
    assert PIN not in redact_pkcs11_uri(f"garbage;pin-value={PIN}")


# --------------------------------------------------------------------------------------------
# format_pkcs11_uri and properties
# --------------------------------------------------------------------------------------------


def test_format_produces_canonical_text_with_id_fully_encoded() -> None:
    uri = Pkcs11Uri(token="My Token", slot_id=3, id=b"AB", module_path="/usr/lib/x.so")
    assert (
        format_pkcs11_uri(uri)
        == "pkcs11:token=My%20Token;slot-id=3;id=%41%42?module-path=/usr/lib/x.so"
    )


def test_format_of_empty_uri_is_the_bare_scheme() -> None:
    assert format_pkcs11_uri(Pkcs11Uri()) == "pkcs11:"


_text = st.none() | st.text(max_size=40)


@st.composite
def pkcs11_uris(draw: st.DrawFn) -> Pkcs11Uri:
    pin = draw(
        st.sampled_from(["none", "source", "value"]),
    )
    pin_source = None
    pin_value = None
    if pin == "source":
        path = "/" + draw(st.text(max_size=30).filter(lambda s: "\0" not in s))
        pin_source = draw(st.sampled_from(["file:", "file://", ""])) + path
    elif pin == "value":
        pin_value = draw(st.text(min_size=1, max_size=30))
    module_path = draw(
        st.none() | st.text(max_size=30).filter(lambda s: "\0" not in s).map(lambda s: "/" + s)
    )
    module_name = draw(
        st.none()
        | st.text(min_size=1, max_size=20).filter(lambda s: "/" not in s and "\0" not in s)
    )
    fields: dict[str, Any] = {
        "token": draw(_text),
        "manufacturer": draw(_text),
        "serial": draw(_text),
        "model": draw(_text),
        "library_manufacturer": draw(_text),
        "library_description": draw(_text),
        "library_version": draw(st.none() | st.tuples(st.integers(0, 255), st.integers(0, 255))),
        "slot_description": draw(_text),
        "slot_manufacturer": draw(_text),
        "slot_id": draw(st.none() | st.integers(0, 2**64 - 1)),
        "object": draw(_text),
        "id": draw(st.none() | st.binary(max_size=32)),
        "type": draw(st.none() | st.sampled_from(sorted(OBJECT_TYPES))),
        "module_name": module_name,
        "module_path": module_path,
        "pin_source": pin_source,
        "pin_value": pin_value,
    }
    try:
        return Pkcs11Uri(**fields)
    except ConfigError:
        # e.g. a pin-source "file://" + "/x/..." whose authority is not local
        assume(False)
        raise


@given(pkcs11_uris())
def test_format_then_parse_round_trips_every_valid_uri(uri: Pkcs11Uri) -> None:
    assert parse_pkcs11_uri(format_pkcs11_uri(uri)) == uri


@given(st.text(max_size=60), st.binary(max_size=60))
def test_percent_encoding_of_arbitrary_unicode_and_bytes_round_trips(
    text: str, data: bytes
) -> None:
    fully_encoded = "".join(f"%{b:02x}" for b in text.encode("utf-8"))
    id_encoded = "".join(f"%{b:02X}" for b in data)
    uri = parse_pkcs11_uri(f"pkcs11:object={fully_encoded};id={id_encoded}")
    assert uri.object == text
    assert uri.id == data


@given(st.text(max_size=200))
def test_arbitrary_text_raises_nothing_but_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_pkcs11_uri(text)


_uri_alphabet = st.sampled_from(
    [*"pkcs11:;?&=%/|-_ xA0fF9", "token", "slot-id", "id", "pin-value", "type", "%C3"]
)


@given(st.lists(_uri_alphabet, max_size=40).map("".join))
def test_uri_like_text_raises_nothing_but_config_error(body: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_pkcs11_uri("pkcs11:" + body)


@given(
    st.text(alphabet="abcdefghijKLMNOP0123456789", min_size=12, max_size=24), st.text(max_size=30)
)
def test_pin_value_never_appears_in_any_parse_error(pin: str, noise: str) -> None:
    try:
        shown = repr(parse_pkcs11_uri(f"pkcs11:?pin-value={pin}{noise}"))
    except ConfigError as exc:
        shown = f"{exc} {exc!r}"
    assert pin not in shown


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_settings_defaults_describe_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings.load()
    assert settings.data_dir == tmp_path / ".hsmkms"
    assert settings.data_dir.is_absolute()
    assert settings.is_embedded
    assert settings.profile == "auto"
    assert settings.region == "us-east-1"
    assert settings.account_id == "111122223333"
    assert settings.database_url is None
    assert settings.effective_database_url == f"sqlite:///{tmp_path}/.hsmkms/hsmkms.db"


def test_settings_derived_paths_live_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.load(tmp_path / "d")
    assert settings.softhsm2_conf == tmp_path / "d" / "softhsm2.conf"
    assert settings.token_dir == tmp_path / "d" / "tokens"
    assert settings.user_pin_file == tmp_path / "d" / "user.pin"
    assert settings.so_pin_file == tmp_path / "d" / "so.pin"
    assert settings.sqlite_url == f"sqlite:///{tmp_path}/d/hsmkms.db"


def test_settings_are_read_from_hsmkms_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HSMKMS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HSMKMS_MODULE_PATH", "/opt/hsm/lib.so")
    monkeypatch.setenv("HSMKMS_TOKEN_LABEL", "prod")
    monkeypatch.setenv("HSMKMS_TOKEN_SERIAL", "0123")
    monkeypatch.setenv("HSMKMS_SLOT_ID", "5")
    monkeypatch.setenv("HSMKMS_PIN_FILE", "/etc/hsmkms/pin")
    monkeypatch.setenv("HSMKMS_PIN_ENV", "HSM_PIN")
    monkeypatch.setenv("HSMKMS_PROFILE", "AES_256_CBC_HMAC_SHA_256")
    monkeypatch.setenv("HSMKMS_REGION", "eu-central-1")
    monkeypatch.setenv("HSMKMS_ACCOUNT_ID", "123456789012")
    monkeypatch.setenv("HSMKMS_DATABASE_URL", "postgresql://db/kms")
    monkeypatch.setenv("HSMKMS_PKCS11_URI", "pkcs11:token=x")
    settings = Settings.load()
    assert settings.data_dir == tmp_path / "data"
    assert settings.module_path == "/opt/hsm/lib.so"
    assert settings.token_label == "prod"
    assert settings.token_serial == "0123"
    assert settings.slot_id == 5
    assert settings.pin_file == Path("/etc/hsmkms/pin")
    assert settings.pin_env == "HSM_PIN"
    assert settings.profile == "AES_256_CBC_HMAC_SHA_256"
    assert settings.region == "eu-central-1"
    assert settings.account_id == "123456789012"
    assert settings.effective_database_url == "postgresql://db/kms"
    assert settings.pkcs11_uri == "pkcs11:token=x"
    assert not settings.is_embedded


def test_load_argument_overrides_the_data_dir_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HSMKMS_DATA_DIR", str(tmp_path / "env"))
    assert Settings.load(tmp_path / "arg").data_dir == tmp_path / "arg"


def test_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMKMS_MODULE_PATH", "")
    monkeypatch.setenv("HSMKMS_SLOT_ID", "")
    settings = Settings.load()
    assert settings.module_path is None
    assert settings.slot_id is None
    assert settings.is_embedded


def test_dotenv_file_is_not_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HSMKMS_REGION=eu-west-1\n", encoding="utf-8")
    assert Settings.load().region == "us-east-1"


def test_setting_either_uri_or_module_path_leaves_the_embedded_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HSMKMS_PKCS11_URI", "pkcs11:token=a?module-path=/x.so")
    assert not Settings.load().is_embedded
    monkeypatch.delenv("HSMKMS_PKCS11_URI")
    monkeypatch.setenv("HSMKMS_MODULE_PATH", "/x.so")
    assert not Settings.load().is_embedded


@pytest.mark.parametrize(
    "account_id", ["12345678901", "1234567890123", "12345678901a", " 123456789012"]
)
def test_bad_account_id_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, account_id: str
) -> None:
    monkeypatch.setenv("HSMKMS_ACCOUNT_ID", account_id)
    with pytest.raises(ConfigError, match="HSMKMS_ACCOUNT_ID: must be exactly 12 digits"):
        Settings.load()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HSMKMS_PROFILE", "AES_128_GCM"),
        ("HSMKMS_KEY_PLACEMENT", "both"),
        ("HSMKMS_UNWRAPPED_KEYS", "0"),
        ("HSMKMS_UNWRAPPED_KEYS", "many"),
        ("HSMKMS_SLOT_ID", "one"),
        ("HSMKMS_SLOT_ID", "-1"),
        ("HSMKMS_REGION", "us:east"),
        ("HSMKMS_PIN_ENV", "not a name"),
        ("HSMKMS_PKCS11_URI", "token=a"),
    ],
)
def test_invalid_setting_is_a_one_line_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        Settings.load()
    assert caught.value.message.startswith(f"invalid {variable}: ")
    assert "\n" not in caught.value.message


def test_several_invalid_settings_are_counted_in_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HSMKMS_ACCOUNT_ID", "1")
    monkeypatch.setenv("HSMKMS_REGION", "US EAST")
    with pytest.raises(ConfigError, match=r"\(and 1 more\)"):
        Settings.load()


def test_invalid_uri_setting_error_never_shows_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSMKMS_PKCS11_URI", f"pkcs11:token=a b?pin-value={PIN}")
    with pytest.raises(ConfigError) as caught:
        Settings.load()
    assert PIN not in str(caught.value)
    assert PIN not in repr(caught.value)
    assert PIN not in str(caught.value.__cause__)


def test_settings_repr_and_str_redact_a_pin_value_in_the_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HSMKMS_PKCS11_URI", f"pkcs11:token=a?module-path=/x.so&pin-value={PIN}")
    settings = Settings.load()
    assert PIN not in repr(settings)
    assert PIN not in str(settings)
    assert "pin-value=***" in repr(settings)


# --------------------------------------------------------------------------------------------
# PIN sources
# --------------------------------------------------------------------------------------------


def test_pin_file_has_exactly_one_trailing_newline_stripped(tmp_path: Path) -> None:
    assert read_pin(PinSource("file", str(_pin_file(tmp_path, "abc\n")), "t")) == "abc"
    assert read_pin(PinSource("file", str(_pin_file(tmp_path, "abc\r\n")), "t")) == "abc"
    assert read_pin(PinSource("file", str(_pin_file(tmp_path, "abc\n\n")), "t")) == "abc\n"
    assert read_pin(PinSource("file", str(_pin_file(tmp_path, " abc ")), "t")) == " abc "


def test_missing_pin_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pin"
    with pytest.raises(ConfigError, match=f"PIN file {path} .*does not exist"):
        read_pin(PinSource("file", str(path), "HSMKMS_PIN_FILE"))


@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_empty_pin_file_is_rejected(tmp_path: Path, content: str) -> None:
    path = _pin_file(tmp_path, content)
    with pytest.raises(ConfigError, match=f"PIN file {path} is empty"):
        read_pin(PinSource("file", str(path), "t"))


def test_pin_file_that_is_a_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        read_pin(PinSource("file", str(tmp_path), "t"))


def test_oversized_pin_file_is_rejected_without_showing_content(tmp_path: Path) -> None:
    path = _pin_file(tmp_path, PIN * 1000)
    with pytest.raises(ConfigError, match="larger than") as caught:
        read_pin(PinSource("file", str(path), "t"))
    assert PIN not in str(caught.value)


def test_non_utf8_pin_file_is_rejected_without_showing_content(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(PIN.encode() + b"\xff")
    with pytest.raises(ConfigError, match="not valid UTF-8") as caught:
        read_pin(PinSource("file", str(path), "t"))
    assert PIN not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_pin_file_error_names_the_file(tmp_path: Path) -> None:
    path = _pin_file(tmp_path)
    path.chmod(0o000)
    with pytest.raises(ConfigError, match=f"PIN file {path} .*not readable") as caught:
        read_pin(PinSource("file", str(path), "t"))
    assert PIN not in str(caught.value)


def test_pin_env_reads_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_HSM_PIN", PIN)
    assert read_pin(PinSource("env", "MY_HSM_PIN", "HSMKMS_PIN_ENV")) == PIN


def test_unset_pin_variable_error_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_HSM_PIN", raising=False)
    with pytest.raises(ConfigError, match=r"environment variable MY_HSM_PIN .*is not set"):
        read_pin(PinSource("env", "MY_HSM_PIN", "HSMKMS_PIN_ENV"))


def test_empty_pin_variable_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_HSM_PIN", "")
    with pytest.raises(ConfigError, match="environment variable MY_HSM_PIN is empty"):
        read_pin(PinSource("env", "MY_HSM_PIN", "HSMKMS_PIN_ENV"))


def test_pin_value_source_returns_the_value_and_hides_it_in_repr() -> None:
    source = PinSource("value", "pin-value", "uri", PIN)
    assert read_pin(source) == PIN
    assert PIN not in repr(source)
    with pytest.raises(ConfigError, match="is empty"):
        read_pin(PinSource("value", "pin-value", "uri", ""))


def test_pin_file_is_private_only_without_group_or_other_bits(tmp_path: Path) -> None:
    path = _pin_file(tmp_path)
    assert pin_file_is_private(path)
    path.chmod(0o400)
    assert pin_file_is_private(path)
    path.chmod(0o640)
    assert not pin_file_is_private(path)
    path.chmod(0o604)
    assert not pin_file_is_private(path)
    path.chmod(0o602)
    assert not pin_file_is_private(path)


def test_group_readable_pin_file_is_still_accepted(tmp_path: Path) -> None:
    path = _pin_file(tmp_path)
    path.chmod(0o644)
    assert read_pin(PinSource("file", str(path), "t")) == PIN


def test_pin_file_is_private_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be examined"):
        pin_file_is_private(tmp_path / "missing")


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"HSMKMS_{name.upper()}", value)
    return Settings.load()


def test_pin_file_setting_wins_over_every_other_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    file_pin = _pin_file(tmp_path, "from-file")
    uri_pin = _pin_file(tmp_path, "from-uri", name="uri.pin")
    monkeypatch.setenv("HSM_PIN", "from-env")
    settings = _settings(
        monkeypatch,
        pin_file=str(file_pin),
        pin_env="HSM_PIN",
        pkcs11_uri=f"pkcs11:token=a?module-path=/x.so&pin-source=file:{uri_pin}",
    )
    assert resolve_pin_source(settings) == PinSource("file", str(file_pin), "HSMKMS_PIN_FILE")
    assert read_pin(resolve_pin_source(settings)) == "from-file"


def test_pin_env_setting_wins_over_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_PIN", "from-env")
    settings = _settings(
        monkeypatch, pin_env="HSM_PIN", pkcs11_uri="pkcs11:?module-path=/x.so&pin-value=from-uri"
    )
    assert read_pin(resolve_pin_source(settings)) == "from-env"


@pytest.mark.parametrize("prefix", ["file:", "file://", ""])
def test_uri_pin_source_names_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str
) -> None:
    path = _pin_file(tmp_path, "from-uri-file")
    settings = _settings(
        monkeypatch, pkcs11_uri=f"pkcs11:?module-path=/x.so&pin-source={prefix}{path}"
    )
    source = resolve_pin_source(settings)
    assert (source.kind, source.location) == ("file", str(path))
    assert read_pin(source) == "from-uri-file"


def test_uri_pin_value_is_used_when_nothing_else_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, pkcs11_uri=f"pkcs11:?module-path=/x.so&pin-value={PIN}")
    source = resolve_pin_source(settings)
    assert source.kind == "value"
    assert read_pin(source) == PIN
    assert PIN not in repr(source)


def test_embedded_default_reads_user_pin_from_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings.load(tmp_path)
    _pin_file(tmp_path, "embedded\n", name="user.pin")
    source = resolve_pin_source(settings)
    assert source == PinSource("file", str(tmp_path / "user.pin"), "embedded default")
    assert read_pin(source) == "embedded"


def test_pin_settings_win_over_the_embedded_user_pin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _pin_file(tmp_path, "embedded", name="user.pin")
    monkeypatch.setenv("HSM_PIN", "from-env")
    settings = _settings(monkeypatch, data_dir=str(tmp_path), pin_env="HSM_PIN")
    assert read_pin(resolve_pin_source(settings)) == "from-env"


def test_no_pin_source_outside_the_embedded_default_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(monkeypatch, module_path="/x.so")
    with pytest.raises(ConfigError, match="no PIN source"):
        resolve_pin_source(settings)


def test_command_pin_source_in_settings_is_rejected_as_not_supported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HSMKMS_PKCS11_URI", "pkcs11:?pin-source=|/bin/echo%201234")
    with pytest.raises(ConfigError, match="not supported"):
        Settings.load()


# --------------------------------------------------------------------------------------------
# Module discovery
# --------------------------------------------------------------------------------------------


def test_find_module_by_name_prefers_lib_prefix_then_bare_name_in_directory_order(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    bare = _fake_module(first, "mypkcs11.so")
    _fake_module(second, "libmypkcs11.so")
    prefixed = _fake_module(first, "libmypkcs11.so")
    assert find_module_by_name("mypkcs11", [first, second]) == prefixed
    prefixed.unlink()
    assert find_module_by_name("mypkcs11", [first, second]) == bare


def test_find_module_by_name_not_found_names_the_module_and_the_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"'nothere' not found .* in {tmp_path}"):
        find_module_by_name("nothere", [tmp_path])


def test_find_module_by_name_rejects_a_path_as_a_name() -> None:
    with pytest.raises(ConfigError, match="bare library name"):
        find_module_by_name("../etc/evil")


def test_default_search_dirs_include_the_standard_locations() -> None:
    dirs = config.MODULE_SEARCH_DIRS
    for expected in [
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/pkcs11",
        "/usr/lib/softhsm",
        "/usr/local/lib",
    ]:
        assert Path(expected) in dirs


def test_embedded_module_is_the_first_existing_candidate(tmp_path: Path) -> None:
    missing = tmp_path / "missing.so"
    present = _fake_module(tmp_path / "x", "libsofthsm2.so")
    assert embedded_module_path([missing, present]) == present
    assert embedded_module_path([missing]) == missing


def test_embedded_module_candidates_start_with_the_debian_softhsm_path() -> None:
    candidates = config.SOFTHSM2_MODULE_CANDIDATES
    assert candidates[0] == Path("/usr/lib/softhsm/libsofthsm2.so")
    assert Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so") in candidates
    assert Path("/usr/local/lib/softhsm/libsofthsm2.so") in candidates


# --------------------------------------------------------------------------------------------
# keystore_config
# --------------------------------------------------------------------------------------------


def test_embedded_default_resolves_softhsm_token_pin_and_conf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module = _fake_module(tmp_path / "lib", "libsofthsm2.so")
    monkeypatch.setattr(config, "SOFTHSM2_MODULE_CANDIDATES", (tmp_path / "no.so", module))
    data = tmp_path / "data"
    data.mkdir()
    _pin_file(data, PIN, name="user.pin")
    resolved = keystore_config(Settings.load(data))
    assert resolved.module_path == str(module)
    assert resolved.token_label == "hsmkms"
    assert resolved.token_serial is None
    assert resolved.slot_id is None
    assert resolved.pin == PIN
    assert resolved.profile is None
    assert resolved.placement is KeyPlacement.TOKEN
    assert resolved.unwrapped_cache == 1024
    assert resolved.softhsm2_conf == str(data / "softhsm2.conf")
    assert PIN not in repr(resolved)


@pytest.mark.parametrize("placement", list(KeyPlacement))
def test_key_placement_reaches_the_keystore_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, placement: KeyPlacement
) -> None:
    _pin_file(tmp_path, name="user.pin")
    settings = _settings(monkeypatch, data_dir=str(tmp_path), key_placement=placement.value)
    assert keystore_config(settings).placement is placement


def test_unwrapped_keys_reaches_the_keystore_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _pin_file(tmp_path, name="user.pin")
    settings = _settings(monkeypatch, data_dir=str(tmp_path), unwrapped_keys="120000")
    assert keystore_config(settings).unwrapped_cache == 120_000


@pytest.mark.parametrize("profile", list(MechanismProfile))
def test_forced_profile_maps_to_the_mechanism_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, profile: MechanismProfile
) -> None:
    _pin_file(tmp_path, name="user.pin")
    settings = _settings(monkeypatch, data_dir=str(tmp_path), profile=profile.value)
    assert keystore_config(settings).profile is profile


def test_uri_supplies_module_token_serial_and_slot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pin = _pin_file(tmp_path)
    settings = _settings(
        monkeypatch,
        pkcs11_uri=(
            f"pkcs11:token=YubiHSM;serial=0012345;slot-id=2"
            f"?module-path=/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so&pin-source=file:{pin}"
        ),
    )
    resolved = keystore_config(settings)
    assert resolved.module_path == "/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so"
    assert resolved.token_label == "YubiHSM"
    assert resolved.token_serial == "0012345"
    assert resolved.slot_id == 2
    assert resolved.pin == PIN
    assert resolved.softhsm2_conf is None
    # Not only the embedded token: the workers of one data directory share its write lock.
    assert resolved.write_lock == str(settings.data_dir / ".token-writes.lock")


def _softhsm2_conf(path: Path, token_dir: str | None) -> Path:
    line = "" if token_dir is None else f"directories.tokendir = {token_dir}\n"
    path.write_text(f"# a SoftHSM2 configuration\n{line}objectstore.backend = file\n")
    return path


def test_a_softhsm2_token_s_write_lock_is_in_its_token_directory_whatever_the_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every process on one SoftHSM2 token directory takes one write lock: the embedded
    default's, another data directory's on that token (SOFTHSM2_CONF), and a custom key
    store's token beside the default one."""
    module = _fake_module(tmp_path / "lib", "libsofthsm2.so")
    pin = _pin_file(tmp_path)
    embedded = tmp_path / "node1"
    embedded.mkdir()
    _softhsm2_conf(embedded / "softhsm2.conf", str(tmp_path / "shared-tokens"))
    _pin_file(embedded, name="user.pin")
    monkeypatch.setattr(config, "embedded_module_path", lambda: module)
    lock = str(tmp_path / "shared-tokens" / ".token-writes.lock")
    first = _settings(monkeypatch, data_dir=str(embedded))
    assert keystore_config(first).write_lock == lock
    store = f"pkcs11:token=store?module-path={module}"
    assert cluster_keystore_config(first, store, PIN, "cks-1").write_lock == lock
    monkeypatch.setenv("SOFTHSM2_CONF", str(embedded / "softhsm2.conf"))
    second = _settings(
        monkeypatch, data_dir=str(tmp_path / "node2"), pkcs11_uri=(
            f"pkcs11:token=hsmkms?module-path={module}&pin-source=file:{pin}"
        ),
    )  # fmt: skip
    assert keystore_config(second).write_lock == lock


def test_the_embedded_token_s_write_lock_before_its_configuration_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before ``softhsm2.conf`` exists (the first start), the lock is where that file will
    point: every process of a new data directory agrees."""
    _pin_file(tmp_path, name="user.pin")
    settings = _settings(monkeypatch, data_dir=str(tmp_path))
    assert keystore_config(settings).write_lock == str(tmp_path / "tokens" / ".token-writes.lock")


@pytest.mark.parametrize("conf", ["missing", "no tokendir line"])
def test_a_softhsm2_configuration_naming_no_token_directory_leaves_the_data_directory_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, conf: str
) -> None:
    module = _fake_module(tmp_path / "lib", "libsofthsm2.so")
    path = tmp_path / "softhsm2.conf"
    if conf != "missing":
        _softhsm2_conf(path, None)
    monkeypatch.setenv("SOFTHSM2_CONF", str(path))
    settings = _settings(
        monkeypatch, data_dir=str(tmp_path / "d"), module_path=str(module), token_label="t",
        pin_file=str(_pin_file(tmp_path)),
    )  # fmt: skip
    assert keystore_config(settings).write_lock == str(tmp_path / "d" / ".token-writes.lock")


def test_explicit_settings_win_over_the_uri(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pin = _pin_file(tmp_path)
    settings = _settings(
        monkeypatch,
        pkcs11_uri="pkcs11:token=uri;serial=1;slot-id=1?module-path=/uri.so&pin-value=uri-pin",
        module_path="/setting.so",
        token_label="setting",
        token_serial="2",
        slot_id="3",
        pin_file=str(pin),
    )
    resolved = keystore_config(settings)
    assert (resolved.module_path, resolved.token_label, resolved.token_serial) == (
        "/setting.so",
        "setting",
        "2",
    )
    assert resolved.slot_id == 3
    assert resolved.pin == PIN


def test_module_path_setting_without_uri_has_no_embedded_label(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _settings(monkeypatch, module_path="/x.so", pin_file=str(_pin_file(tmp_path)))
    resolved = keystore_config(settings)
    assert resolved.token_label is None
    assert resolved.softhsm2_conf is None


def test_uri_module_name_is_looked_up_in_the_search_dirs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module = _fake_module(tmp_path / "pkcs11", "yubihsm_pkcs11.so")
    monkeypatch.setattr(config, "MODULE_SEARCH_DIRS", (tmp_path / "empty", tmp_path / "pkcs11"))
    settings = _settings(
        monkeypatch, pkcs11_uri="pkcs11:token=t?module-name=yubihsm_pkcs11&pin-value=p"
    )
    assert keystore_config(settings).module_path == str(module)


def test_uri_module_name_not_found_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config, "MODULE_SEARCH_DIRS", (tmp_path,))
    settings = _settings(monkeypatch, pkcs11_uri="pkcs11:?module-name=nothere&pin-value=p")
    with pytest.raises(ConfigError, match="'nothere' not found"):
        keystore_config(settings)


def test_uri_module_path_directory_is_searched_for_module_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module = _fake_module(tmp_path / "mods", "libsofthsm2.so")
    settings = _settings(
        monkeypatch,
        pkcs11_uri=f"pkcs11:?module-path={tmp_path}/mods&module-name=softhsm2&pin-value=p",
    )
    assert keystore_config(settings).module_path == str(module)


def test_uri_module_path_directory_without_module_name_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _settings(monkeypatch, pkcs11_uri=f"pkcs11:?module-path={tmp_path}&pin-value=p")
    with pytest.raises(ConfigError, match="is a directory; add module-name"):
        keystore_config(settings)


def test_uri_without_any_module_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, pkcs11_uri="pkcs11:token=a?pin-value=p")
    with pytest.raises(ConfigError, match="no PKCS#11 module"):
        keystore_config(settings)


def test_module_path_is_not_checked_for_existence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _settings(
        monkeypatch, pkcs11_uri="pkcs11:?module-path=/does/not/exist.so&pin-value=p"
    )
    assert keystore_config(settings).module_path == "/does/not/exist.so"


def test_empty_uri_token_and_serial_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch, pkcs11_uri="pkcs11:token=;serial=?module-path=/x.so&pin-value=p"
    )
    resolved = keystore_config(settings)
    assert resolved.token_label is None
    assert resolved.token_serial is None


def test_token_label_longer_than_32_bytes_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(
        monkeypatch, pkcs11_uri=f"pkcs11:token={'a' * 33}?module-path=/x.so&pin-value=p"
    )
    with pytest.raises(ConfigError, match="longer than 32 bytes"):
        keystore_config(settings)


def test_keystore_config_propagates_a_missing_pin_file_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings.load(tmp_path / "fresh")
    with pytest.raises(ConfigError, match=r"user\.pin .*does not exist"):
        keystore_config(settings)
