"""AWS KMS enumerations (reference/aws-kms-api.md §3.2), with AWS's exact spellings."""

from __future__ import annotations

import enum


class KeyState(enum.StrEnum):
    """Key states as AWS names them (hsmkms uses Enabled, Disabled and PendingDeletion)."""

    Creating = "Creating"
    Enabled = "Enabled"
    Disabled = "Disabled"
    PendingDeletion = "PendingDeletion"
    PendingImport = "PendingImport"
    PendingReplicaDeletion = "PendingReplicaDeletion"
    Unavailable = "Unavailable"
    Updating = "Updating"


class KeyUsage(enum.StrEnum):
    """What a key may be used for."""

    SIGN_VERIFY = "SIGN_VERIFY"
    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
    KEY_AGREEMENT = "KEY_AGREEMENT"
    ENCAPSULATE_DECAPSULATE = "ENCAPSULATE_DECAPSULATE"


class KeySpec(enum.StrEnum):
    """The type of key material (which of them a token can host: ``hsmkms doctor``)."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    ECC_NIST_P256 = "ECC_NIST_P256"
    ECC_NIST_P384 = "ECC_NIST_P384"
    ECC_NIST_P521 = "ECC_NIST_P521"
    ECC_SECG_P256K1 = "ECC_SECG_P256K1"
    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
    HMAC_224 = "HMAC_224"
    HMAC_256 = "HMAC_256"
    HMAC_384 = "HMAC_384"
    HMAC_512 = "HMAC_512"
    SM2 = "SM2"
    ML_DSA_44 = "ML_DSA_44"
    ML_DSA_65 = "ML_DSA_65"
    ML_DSA_87 = "ML_DSA_87"
    ECC_NIST_EDWARDS25519 = "ECC_NIST_EDWARDS25519"
    ML_KEM_512 = "ML_KEM_512"
    ML_KEM_768 = "ML_KEM_768"
    ML_KEM_1024 = "ML_KEM_1024"


class CustomerMasterKeySpec(enum.StrEnum):
    """The deprecated name of :class:`KeySpec`: the specs that existed when it was replaced
    (a key of a newer spec has no ``CustomerMasterKeySpec`` in its metadata)."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    ECC_NIST_P256 = "ECC_NIST_P256"
    ECC_NIST_P384 = "ECC_NIST_P384"
    ECC_NIST_P521 = "ECC_NIST_P521"
    ECC_SECG_P256K1 = "ECC_SECG_P256K1"
    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
    HMAC_224 = "HMAC_224"
    HMAC_256 = "HMAC_256"
    HMAC_384 = "HMAC_384"
    HMAC_512 = "HMAC_512"
    SM2 = "SM2"


class KeyFamily(enum.Enum):
    """A family of key specs that take part in the same operations (not a wire type)."""

    SYMMETRIC = "SYMMETRIC"
    RSA = "RSA"
    ECC = "ECC"
    HMAC = "HMAC"
    SM2 = "SM2"
    ML_DSA = "ML_DSA"
    ML_KEM = "ML_KEM"


_FAMILY_PREFIXES: tuple[tuple[str, KeyFamily], ...] = (
    ("SYMMETRIC_DEFAULT", KeyFamily.SYMMETRIC),
    ("RSA_", KeyFamily.RSA),
    ("ECC_", KeyFamily.ECC),
    ("HMAC_", KeyFamily.HMAC),
    ("SM2", KeyFamily.SM2),
    ("ML_DSA_", KeyFamily.ML_DSA),
    ("ML_KEM_", KeyFamily.ML_KEM),
)


def key_family(key_spec: str) -> KeyFamily | None:
    """The family of a key spec (a :class:`KeySpec` value, or any string); None when unknown."""
    for prefix, family in _FAMILY_PREFIXES:
        if key_spec.startswith(prefix):
            return family
    return None


class OriginType(enum.StrEnum):
    """Where the key material comes from."""

    AWS_KMS = "AWS_KMS"
    EXTERNAL = "EXTERNAL"
    AWS_CLOUDHSM = "AWS_CLOUDHSM"
    EXTERNAL_KEY_STORE = "EXTERNAL_KEY_STORE"


class KeyManager(enum.StrEnum):
    """Who manages the key."""

    AWS = "AWS"
    CUSTOMER = "CUSTOMER"


class DataKeySpec(enum.StrEnum):
    """GenerateDataKey key lengths."""

    AES_256 = "AES_256"
    AES_128 = "AES_128"

    @property
    def length(self) -> int:
        """The data key length in bytes."""
        return 32 if self is DataKeySpec.AES_256 else 16


class EncryptionAlgorithmSpec(enum.StrEnum):
    """Encryption algorithms; symmetric keys use SYMMETRIC_DEFAULT only."""

    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
    RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
    RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"
    SM2PKE = "SM2PKE"


class SigningAlgorithmSpec(enum.StrEnum):
    """Signing algorithms (Sign, Verify)."""

    RSASSA_PSS_SHA_256 = "RSASSA_PSS_SHA_256"
    RSASSA_PSS_SHA_384 = "RSASSA_PSS_SHA_384"
    RSASSA_PSS_SHA_512 = "RSASSA_PSS_SHA_512"
    RSASSA_PKCS1_V1_5_SHA_256 = "RSASSA_PKCS1_V1_5_SHA_256"
    RSASSA_PKCS1_V1_5_SHA_384 = "RSASSA_PKCS1_V1_5_SHA_384"
    RSASSA_PKCS1_V1_5_SHA_512 = "RSASSA_PKCS1_V1_5_SHA_512"
    ECDSA_SHA_256 = "ECDSA_SHA_256"
    ECDSA_SHA_384 = "ECDSA_SHA_384"
    ECDSA_SHA_512 = "ECDSA_SHA_512"
    SM2DSA = "SM2DSA"
    ML_DSA_SHAKE_256 = "ML_DSA_SHAKE_256"
    ED25519_SHA_512 = "ED25519_SHA_512"
    ED25519_PH_SHA_512 = "ED25519_PH_SHA_512"


class MessageType(enum.StrEnum):
    """What Sign and Verify get in ``Message``: the message, its digest, or ML-DSA's mu."""

    RAW = "RAW"
    DIGEST = "DIGEST"
    EXTERNAL_MU = "EXTERNAL_MU"


class MacAlgorithmSpec(enum.StrEnum):
    """MAC algorithms (GenerateMac, VerifyMac): one per HMAC key spec."""

    HMAC_SHA_224 = "HMAC_SHA_224"
    HMAC_SHA_256 = "HMAC_SHA_256"
    HMAC_SHA_384 = "HMAC_SHA_384"
    HMAC_SHA_512 = "HMAC_SHA_512"


class KeyAgreementAlgorithmSpec(enum.StrEnum):
    """Key agreement algorithms (DeriveSharedSecret)."""

    ECDH = "ECDH"


class EncapsulationAlgorithmSpec(enum.StrEnum):
    """Key encapsulation algorithms (Encapsulate, Decapsulate)."""

    ML_KEM = "ML_KEM"


class DataKeyPairSpec(enum.StrEnum):
    """The kinds of data key pair GenerateDataKeyPair makes."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    ECC_NIST_P256 = "ECC_NIST_P256"
    ECC_NIST_P384 = "ECC_NIST_P384"
    ECC_NIST_P521 = "ECC_NIST_P521"
    ECC_SECG_P256K1 = "ECC_SECG_P256K1"
    SM2 = "SM2"
    ECC_NIST_EDWARDS25519 = "ECC_NIST_EDWARDS25519"
    ML_KEM_512 = "ML_KEM_512"
    ML_KEM_768 = "ML_KEM_768"
    ML_KEM_1024 = "ML_KEM_1024"


class KeyLastUsageOperation(enum.StrEnum):
    """The cryptographic operations GetKeyLastUsage reports."""

    Decrypt = "Decrypt"
    DeriveSharedSecret = "DeriveSharedSecret"
    Encrypt = "Encrypt"
    GenerateDataKey = "GenerateDataKey"
    GenerateDataKeyPair = "GenerateDataKeyPair"
    GenerateDataKeyPairWithoutPlaintext = "GenerateDataKeyPairWithoutPlaintext"
    GenerateDataKeyWithoutPlaintext = "GenerateDataKeyWithoutPlaintext"
    GenerateMac = "GenerateMac"
    ReEncrypt = "ReEncrypt"
    Sign = "Sign"
    Verify = "Verify"
    VerifyMac = "VerifyMac"
    Encapsulate = "Encapsulate"
    Decapsulate = "Decapsulate"


class RotationType(enum.StrEnum):
    """How a key version came to be (ListKeyRotations)."""

    AUTOMATIC = "AUTOMATIC"
    ON_DEMAND = "ON_DEMAND"


class IncludeKeyMaterial(enum.StrEnum):
    """ListKeyRotations: list only rotations, or the original key material too."""

    ALL_KEY_MATERIAL = "ALL_KEY_MATERIAL"
    ROTATIONS_ONLY = "ROTATIONS_ONLY"


class KeyMaterialState(enum.StrEnum):
    """State of one key material (version) in ListKeyRotations."""

    CURRENT = "CURRENT"
    NON_CURRENT = "NON_CURRENT"
    PENDING_ROTATION = "PENDING_ROTATION"
    PENDING_MULTI_REGION_IMPORT_AND_ROTATION = "PENDING_MULTI_REGION_IMPORT_AND_ROTATION"


class ExpirationModel(enum.StrEnum):
    """Whether imported key material expires."""

    KEY_MATERIAL_EXPIRES = "KEY_MATERIAL_EXPIRES"
    KEY_MATERIAL_DOES_NOT_EXPIRE = "KEY_MATERIAL_DOES_NOT_EXPIRE"


class WrappingAlgorithmSpec(enum.StrEnum):
    """How key material is wrapped for import (AWS ``AlgorithmSpec``). RSAES_PKCS1_V1_5 (no
    longer accepted by AWS) and SM2PKE (China Regions only) are refused."""

    RSAES_PKCS1_V1_5 = "RSAES_PKCS1_V1_5"
    RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
    RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"
    RSA_AES_KEY_WRAP_SHA_1 = "RSA_AES_KEY_WRAP_SHA_1"
    RSA_AES_KEY_WRAP_SHA_256 = "RSA_AES_KEY_WRAP_SHA_256"
    SM2PKE = "SM2PKE"


class WrappingKeySpec(enum.StrEnum):
    """The public key GetParametersForImport returns (SM2: China Regions only, refused)."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    SM2 = "SM2"


class ImportType(enum.StrEnum):
    """Whether ImportKeyMaterial brings new key material or material the key had before."""

    NEW_KEY_MATERIAL = "NEW_KEY_MATERIAL"
    EXISTING_KEY_MATERIAL = "EXISTING_KEY_MATERIAL"


class ImportState(enum.StrEnum):
    """Whether an imported key material is in the key store now (ListKeyRotations)."""

    IMPORTED = "IMPORTED"
    PENDING_IMPORT = "PENDING_IMPORT"


class GrantOperation(enum.StrEnum):
    """The operations a grant can allow (reference §3.2)."""

    Decrypt = "Decrypt"
    Encrypt = "Encrypt"
    GenerateDataKey = "GenerateDataKey"
    GenerateDataKeyWithoutPlaintext = "GenerateDataKeyWithoutPlaintext"
    ReEncryptFrom = "ReEncryptFrom"
    ReEncryptTo = "ReEncryptTo"
    Sign = "Sign"
    Verify = "Verify"
    GetPublicKey = "GetPublicKey"
    CreateGrant = "CreateGrant"
    RetireGrant = "RetireGrant"
    DescribeKey = "DescribeKey"
    GenerateDataKeyPair = "GenerateDataKeyPair"
    GenerateDataKeyPairWithoutPlaintext = "GenerateDataKeyPairWithoutPlaintext"
    GenerateMac = "GenerateMac"
    VerifyMac = "VerifyMac"
    DeriveSharedSecret = "DeriveSharedSecret"
    Encapsulate = "Encapsulate"
    Decapsulate = "Decapsulate"


class CustomKeyStoreType(enum.StrEnum):
    """The kind of a custom key store."""

    AWS_CLOUDHSM = "AWS_CLOUDHSM"
    EXTERNAL_KEY_STORE = "EXTERNAL_KEY_STORE"


class ConnectionStateType(enum.StrEnum):
    """A custom key store's connection state."""

    CONNECTED = "CONNECTED"
    CONNECTING = "CONNECTING"
    FAILED = "FAILED"
    DISCONNECTED = "DISCONNECTED"
    DISCONNECTING = "DISCONNECTING"


class ConnectionErrorCodeType(enum.StrEnum):
    """Why a custom key store's connection FAILED (botocore's ConnectionErrorCodeType)."""

    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    CLUSTER_NOT_FOUND = "CLUSTER_NOT_FOUND"
    NETWORK_ERRORS = "NETWORK_ERRORS"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    INSUFFICIENT_CLOUDHSM_HSMS = "INSUFFICIENT_CLOUDHSM_HSMS"
    USER_LOCKED_OUT = "USER_LOCKED_OUT"
    USER_NOT_FOUND = "USER_NOT_FOUND"
    USER_LOGGED_IN = "USER_LOGGED_IN"
    SUBNET_NOT_FOUND = "SUBNET_NOT_FOUND"
    INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET = "INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET"
    XKS_PROXY_ACCESS_DENIED = "XKS_PROXY_ACCESS_DENIED"
    XKS_PROXY_NOT_REACHABLE = "XKS_PROXY_NOT_REACHABLE"
    XKS_VPC_ENDPOINT_SERVICE_NOT_FOUND = "XKS_VPC_ENDPOINT_SERVICE_NOT_FOUND"
    XKS_PROXY_INVALID_RESPONSE = "XKS_PROXY_INVALID_RESPONSE"
    XKS_PROXY_INVALID_CONFIGURATION = "XKS_PROXY_INVALID_CONFIGURATION"
    XKS_VPC_ENDPOINT_SERVICE_INVALID_CONFIGURATION = (
        "XKS_VPC_ENDPOINT_SERVICE_INVALID_CONFIGURATION"
    )
    XKS_PROXY_TIMED_OUT = "XKS_PROXY_TIMED_OUT"
    XKS_PROXY_INVALID_TLS_CONFIGURATION = "XKS_PROXY_INVALID_TLS_CONFIGURATION"
