"""The mechanism profiles do exactly what docs/keystore.md says, checked against an independent
implementation (pyca/cryptography) with keys imported into the token for this test only.

Production keys are always generated inside the token; importing known values here is the only
way to compare the token's output byte for byte with a reference computation.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, ObjectClass

from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.keystore.pkcs11 import LABEL_PREFIX, Pkcs11Keystore
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.profiles import MechanismProfile

pytestmark = pytest.mark.hsm


ENC = {Attribute.ENCRYPT: True, Attribute.DECRYPT: True}
MAC = {Attribute.SIGN: True, Attribute.VERIFY: True}


def _import_secret(ks: Pkcs11Keystore, key_type: Any, value: bytes, caps: dict[Any, bool]) -> str:
    object_id = os.urandom(16)
    with_caps = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: key_type,
        Attribute.VALUE: value,
        Attribute.ID: object_id,
        Attribute.LABEL: f"{LABEL_PREFIX}kat",
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        **caps,
    }
    # Through the keystore's own call path, so a stale session is reopened like anywhere else.
    ks._call("importing a test key", lambda conn: conn.session.create_object(with_caps))
    return object_id.hex()


def test_gcm_profile_matches_reference_aes_gcm(keystore: Pkcs11Keystore) -> None:
    key = bytes(range(32))
    ref = KeyMaterialRef(
        KeyMaterialSpec.SYMMETRIC_DEFAULT,
        MechanismProfile.AES_256_GCM,
        (_import_secret(keystore, KeyType.AES, key, ENC),),
    )
    aad = b"header||context"
    sealed_iv, body = keystore.encrypt(ref, b"known answer", aad)
    assert AESGCM(key).decrypt(sealed_iv, body, aad) == b"known answer"
    iv = bytes(12)
    reference = AESGCM(key).encrypt(iv, b"the other way", aad)
    assert keystore.decrypt(ref, iv, reference, aad) == b"the other way"


def test_portable_profile_is_cbc_pad_then_hmac_over_len_aad_iv_ct(
    portable_keystore: Pkcs11Keystore,
) -> None:
    aes_key, mac_key = bytes(range(32)), bytes(range(32, 64))
    ks = portable_keystore
    ref = KeyMaterialRef(
        KeyMaterialSpec.SYMMETRIC_DEFAULT,
        MechanismProfile.AES_256_CBC_HMAC_SHA_256,
        (
            _import_secret(ks, KeyType.AES, aes_key, ENC),
            _import_secret(ks, KeyType.GENERIC_SECRET, mac_key, MAC),
        ),
    )
    aad = b"header||context"
    sealed_iv, body = ks.encrypt(ref, b"known answer, portable", aad)
    ct, tag = body[:-32], body[-32:]
    mac_input = len(aad).to_bytes(8, "big") + aad + sealed_iv + ct
    assert hmac.compare_digest(tag, hmac.new(mac_key, mac_input, hashlib.sha256).digest())
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(sealed_iv)).decryptor()
    padded = decryptor.update(ct) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    assert unpadder.update(padded) + unpadder.finalize() == b"known answer, portable"

    # And the other way: a ciphertext made by the reference decrypts in the token.
    iv = bytes(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(b"made outside") + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    ct = encryptor.update(padded) + encryptor.finalize()
    tag = hmac.new(mac_key, len(aad).to_bytes(8, "big") + aad + iv + ct, hashlib.sha256).digest()
    assert ks.decrypt(ref, iv, ct + tag, aad) == b"made outside"
    with pytest.raises(DecryptionFailed):
        ks.decrypt(ref, iv, ct + bytes(32), aad)
