"""The keystore's pure parts: profile and spec registries, key material references (their text
forms, old and new), material names, the registry of key stores. No token needed."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmkms.keystore.base import (
    DEFAULT_STORE,
    KeyMaterialRef,
    Keystore,
    MaterialName,
    TokenObject,
)
from hsmkms.keystore.errors import UnknownKeyStore
from hsmkms.keystore.specs import SPECS, KeyMaterialSpec, MaterialKind, MaterialUsage
from hsmkms.keystore.stores import KeyStores, key_stores
from hsmkms.profiles import PROFILES, MechanismProfile, ObjectRole, ProfileRegistry

GCM = MechanismProfile.AES_256_GCM
CBC = MechanismProfile.AES_256_CBC_HMAC_SHA_256
A = "00112233445566778899aabbccddeeff"
B = "ffeeddccbbaa99887766554433221100"

# -- profiles -------------------------------------------------------------------------------


def test_profiles_are_found_by_name_and_frozen_wire_id() -> None:
    assert [p.name for p in PROFILES] == [GCM, CBC]
    assert PROFILES.by_wire_id(1).name is GCM
    assert PROFILES.by_wire_id(2).name is CBC
    assert PROFILES.by_name("AES_256_CBC_HMAC_SHA_256") is CBC.facts
    assert MechanismProfile.from_wire_id(2) is CBC
    with pytest.raises(ValueError, match="unknown profile id 3"):
        PROFILES.by_wire_id(3)
    with pytest.raises(ValueError, match="AES_128_GCM"):
        PROFILES.by_name("AES_128_GCM")


def test_profile_facts() -> None:
    assert (GCM.wire_id, GCM.iv_length, GCM.tag_length) == (1, 12, 16)
    assert (CBC.wire_id, CBC.iv_length, CBC.tag_length) == (2, 16, 32)
    assert GCM.facts.roles == (ObjectRole.ENCRYPT,)
    assert CBC.facts.roles == (ObjectRole.ENCRYPT, ObjectRole.MAC)
    assert GCM.max_body_length(4096) == 4096 + 16
    assert CBC.max_body_length(4096) == 4112 + 32


@pytest.mark.parametrize(
    ("profile", "length", "ok"),
    [
        (GCM, 15, False), (GCM, 16, True), (GCM, 17, True), (GCM, 4112, True), (GCM, 4113, False),
        (CBC, 32, False), (CBC, 47, False), (CBC, 48, True), (CBC, 64, True), (CBC, 63, False),
        (CBC, 4144, True), (CBC, 4160, False),
    ],
)  # fmt: skip
def test_body_check_knows_each_profile_shape(
    profile: MechanismProfile, length: int, ok: bool
) -> None:
    assert profile.facts.body_check(4096)(length) is ok


def test_body_check_without_a_limit() -> None:
    assert GCM.facts.body_check(None)(1 << 20)
    assert CBC.facts.body_check(None)((1 << 20) + 32)
    assert not CBC.facts.body_check(None)((1 << 20) + 33)


def test_the_profile_registry_refuses_duplicates_and_gaps() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        ProfileRegistry([GCM.facts, GCM.facts, CBC.facts])
    with pytest.raises(ValueError, match="without facts"):
        ProfileRegistry([GCM.facts])


# -- specs ----------------------------------------------------------------------------------


def test_spec_facts() -> None:
    assert [f.spec for f in SPECS] == list(KeyMaterialSpec)
    symmetric = KeyMaterialSpec.SYMMETRIC_DEFAULT.facts
    assert symmetric.takes_profile
    assert symmetric.roles(CBC) == (ObjectRole.ENCRYPT, ObjectRole.MAC)
    with pytest.raises(ValueError, match="needs a mechanism profile"):
        symmetric.roles(None)
    for bits in (224, 256, 384, 512):
        facts = KeyMaterialSpec(f"HMAC_{bits}").facts
        assert (facts.kind, facts.key_bits, facts.mac_length) == (
            MaterialKind.HMAC,
            bits,
            bits // 8,
        )
        assert facts.roles(None) == (ObjectRole.MAC,)
        with pytest.raises(ValueError, match="has no mechanism profile"):
            facts.roles(GCM)
    ecc = KeyMaterialSpec.ECC_NIST_P256.facts
    assert ecc.usage(None) is MaterialUsage.SIGN_VERIFY
    assert ecc.usage(MaterialUsage.KEY_AGREEMENT) is MaterialUsage.KEY_AGREEMENT
    with pytest.raises(ValueError, match="not for KEY_AGREEMENT"):
        KeyMaterialSpec.RSA_2048.facts.usage(MaterialUsage.KEY_AGREEMENT)
    rsa = KeyMaterialSpec.RSA_4096.facts
    assert (rsa.kind, rsa.key_bits, rsa.usage(None)) == (
        MaterialKind.RSA, 4096, MaterialUsage.SIGN_VERIFY,
    )  # fmt: skip
    assert rsa.usage(MaterialUsage.ENCRYPT_DECRYPT) is MaterialUsage.ENCRYPT_DECRYPT
    assert KeyMaterialSpec.ECC_NIST_P521.facts.key_bits == 521
    for only_signing in ("ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519", "ML_DSA_65"):
        facts = KeyMaterialSpec(only_signing).facts
        assert facts.usages == (MaterialUsage.SIGN_VERIFY,)
        with pytest.raises(ValueError, match="not for KEY_AGREEMENT"):
            facts.usage(MaterialUsage.KEY_AGREEMENT)
    kem = KeyMaterialSpec.ML_KEM_768.facts
    assert kem.usages == (MaterialUsage.ENCAPSULATE_DECAPSULATE,)


# -- key material references ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec", "profile", "ids"),
    [
        (f"AES_256_GCM:{A}", KeyMaterialSpec.SYMMETRIC_DEFAULT, GCM, (A,)),
        (f"AES_256_CBC_HMAC_SHA_256:{A},{B}", KeyMaterialSpec.SYMMETRIC_DEFAULT, CBC, (A, B)),
        (f"HMAC_SHA_256:{A}", KeyMaterialSpec.HMAC_256, None, (A,)),
    ],
    ids=["gcm", "portable", "mac"],
)
def test_old_text_forms_are_read_and_kept_byte_for_byte(
    text: str, spec: KeyMaterialSpec, profile: MechanismProfile | None, ids: tuple[str, ...]
) -> None:
    """Rows written before references named their store: the default store; the text is
    never rewritten (database rows carry token MACs over it)."""
    ref = KeyMaterialRef.from_str(text)
    assert (ref.store, ref.spec, ref.profile, ref.object_ids) == (DEFAULT_STORE, spec, profile, ids)
    assert ref.to_str() == text
    assert ref == KeyMaterialRef(spec, profile, ids)  # the same material as a new reference


def test_new_references_get_the_versioned_text_form() -> None:
    ref = KeyMaterialRef(KeyMaterialSpec.SYMMETRIC_DEFAULT, CBC, (A, B))
    assert ref.to_str() == f"v2:default:SYMMETRIC_DEFAULT:AES_256_CBC_HMAC_SHA_256:{A},{B}"
    mac = KeyMaterialRef(KeyMaterialSpec.HMAC_512, None, (A,), store="cks-0123456789abcdef0")
    assert mac.to_str() == f"v2:cks-0123456789abcdef0:HMAC_512:-:{A}"
    for made in (ref, mac):
        parsed = KeyMaterialRef.from_str(made.to_str())
        assert parsed == made
        assert parsed.store == made.store
        assert parsed.to_str() == made.to_str()
    assert ref.raw_ids == (bytes.fromhex(A), bytes.fromhex(B))
    assert ref.roles == (ObjectRole.ENCRYPT, ObjectRole.MAC)
    assert ref.encryption_profile is CBC
    with pytest.raises(ValueError, match="no mechanism profile"):
        _ = mac.encryption_profile


@pytest.mark.parametrize(
    "text",
    [
        "",
        "AES_256_GCM",
        "AES_256_GCM:",
        f"AES_256_GCM:{A},{B}",  # GCM material is one object
        f"AES_256_CBC_HMAC_SHA_256:{A}",  # the portable profile is two
        f"AES_256_GCM:{A},",
        "AES_256_GCM:xyz0",
        "AES_256_GCM:abc",  # odd number of hex digits
        f"AES_128_GCM:{A}",
        f"HMAC_SHA_256:{A},{B}",
        f"HMAC_SHA_512:{A}",
        f"v2:default:SYMMETRIC_DEFAULT:AES_256_GCM:{A}:x",
        f"v2:default:SYMMETRIC_DEFAULT:-:{A}",  # symmetric material needs its profile
        f"v2:default:HMAC_256:AES_256_GCM:{A}",  # and HMAC material has none
        f"v2:default:HMAC_256:-:{A},{B}",
        f"v2:default:RSA_2048:-:{A},{B}",  # a key pair is one id
        f"v2:Default:HMAC_256:-:{A}",  # store ids are lowercase
        f"v2::HMAC_256:-:{A}",
        f"v2:default:HMAC_1024:-:{A}",
        f"v3:default:HMAC_256:-:{A}",
    ],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every malformed text is a ValueError
        KeyMaterialRef.from_str(text)


@given(st.text(max_size=80))
def test_parsing_any_text_gives_a_reference_or_value_error(text: str) -> None:
    try:
        ref = KeyMaterialRef.from_str(text)
    except ValueError:
        return
    assert ref.to_str() == text
    assert KeyMaterialRef.from_str(ref.to_str()) == ref


def test_the_reference_repr_shows_no_text_field_and_no_secret() -> None:
    ref = KeyMaterialRef(KeyMaterialSpec.SYMMETRIC_DEFAULT, GCM, (A,))
    assert repr(ref) == (
        "KeyMaterialRef(spec=<KeyMaterialSpec.SYMMETRIC_DEFAULT: 'SYMMETRIC_DEFAULT'>, "
        f"profile=<MechanismProfile.AES_256_GCM: 'AES_256_GCM'>, object_ids=('{A}',), "
        "store='default')"
    )


# -- names and token objects ----------------------------------------------------------------


def test_material_names_make_the_labels_of_today() -> None:
    version = MaterialName.key_version("1234abcd-12ab-34cd-56ef-1234567890ab", 7)
    assert version.label(ObjectRole.ENCRYPT) == "hsmkms:1234abcd12ab34cd56ef:7:a"
    assert version.label(ObjectRole.MAC) == "hsmkms:1234abcd12ab34cd56ef:7:h"
    assert version.label(ObjectRole.KEY_PAIR) == "hsmkms:1234abcd12ab34cd56ef:7:k"
    assert MaterialName.service_key("audit").label(ObjectRole.MAC) == "hsmkms:audit"


def test_key_version_objects_are_told_from_service_keys() -> None:
    for suffix in "ahk":
        assert TokenObject(A, f"hsmkms:1234abcd12ab34cd56ef:7:{suffix}", "AES").is_key_version
    assert not TokenObject(A, "hsmkms:1234abcd12ab34cd56ef:7:z", "AES").is_key_version
    assert not TokenObject(A, "hsmkms:audit", "GENERIC_SECRET").is_key_version


# -- the registry of key stores -------------------------------------------------------------


class _Store:
    """Stands in for a key store: the registry only routes and closes."""

    def __init__(self, fail_close: bool = False) -> None:
        self.closed = False
        self.fail_close = fail_close

    def close(self) -> None:
        self.closed = True
        if self.fail_close:
            raise RuntimeError("close failed")


def _as_keystore(store: _Store) -> Keystore:
    return cast(Keystore, store)


def test_the_registry_routes_a_reference_to_its_store() -> None:
    default, other = _Store(), _Store()
    stores = KeyStores(_as_keystore(default), {"cks-1": _as_keystore(other)})
    ref = KeyMaterialRef(KeyMaterialSpec.HMAC_256, None, (A,))
    assert cast(Any, stores.backend_for(ref)) is default
    moved = KeyMaterialRef(KeyMaterialSpec.HMAC_256, None, (A,), store="cks-1")
    assert cast(Any, stores.backend_for(moved)) is other
    assert cast(Any, stores.default) is default
    assert cast(Any, stores.get("cks-1")) is other
    assert "cks-1" in stores
    assert [store_id for store_id, _ in stores.items()] == ["default", "cks-1"]
    with pytest.raises(UnknownKeyStore, match="no key store 'cks-2'"):
        stores.backend_for(KeyMaterialRef(KeyMaterialSpec.HMAC_256, None, (A,), store="cks-2"))
    assert UnknownKeyStore.code == "KeyUnavailableException"


def test_a_single_store_is_the_default_of_a_registry_of_one() -> None:
    default = _Store()
    stores = key_stores(_as_keystore(default))
    assert cast(Any, stores.default) is default
    assert len(stores) == 1
    assert key_stores(stores) is stores


def test_the_registry_refuses_bad_and_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        KeyStores(_as_keystore(_Store()), {"default": _as_keystore(_Store())})
    with pytest.raises(ValueError, match="malformed key store id"):
        KeyStores(_as_keystore(_Store()), {"Bad:Id": _as_keystore(_Store())})


def test_closing_the_registry_closes_every_store_even_after_a_failure() -> None:
    default, failing = _Store(), _Store(fail_close=True)
    stores = KeyStores(_as_keystore(default), {"cks-1": _as_keystore(failing)})
    with pytest.raises(RuntimeError, match="close failed"):
        stores.close()
    assert default.closed
    assert failing.closed
