"""The hsmkms error tree. Every error the service raises carries its AWS KMS ``__type``.

::

    KMSError                              root: ``code`` = AWS __type, ``status`` = HTTP status
    ├── ClientError (400)                 the caller's mistake
    │   ├── NotFoundException
    │   ├── DisabledException
    │   ├── KMSInvalidStateException
    │   │   └── KeyIntegrityError         the key's metadata row failed its token MAC check
    │   ├── InvalidCiphertextException     every decryption failure; never carries detail
    │   ├── KMSInvalidSignatureException   Verify: the signature does not verify; no detail
    │   ├── KMSInvalidMacException         VerifyMac: the MAC does not verify; no detail
    │   ├── IncorrectKeyException
    │   ├── InvalidKeyUsageException
    │   ├── ValidationException
    │   ├── AlreadyExistsException
    │   ├── LimitExceededException
    │   ├── InvalidAliasNameException
    │   ├── InvalidArnException
    │   ├── InvalidMarkerException
    │   ├── MalformedPolicyDocumentException
    │   ├── TagException
    │   ├── UnsupportedOperationException
    │   ├── ConflictException
    │   ├── AccessDeniedException
    │   ├── DryRunOperationException
    │   ├── InvalidGrantTokenException, InvalidGrantIdException
    │   ├── ExpiredImportTokenException, InvalidImportTokenException,
    │   │   IncorrectKeyMaterialException   importing key material
    │   ├── CustomKeyStoreNotFoundException, CustomKeyStoreNameInUseException,
    │   │   CustomKeyStoreInvalidStateException, CustomKeyStoreHasCMKsException,
    │   │   CloudHsmClusterNotFoundException, CloudHsmClusterInUseException,
    │   │   CloudHsmClusterNotRelatedException, IncorrectTrustAnchorException
    │   │   XksProxyUriInUseException, XksProxyInvalidConfigurationException,
    │   │   XksKeyAlreadyInUseException, XksKeyNotFoundException,
    │   │   XksKeyInvalidConfigurationException
    │   │                                   custom key stores
    │   ├── UnknownOperationException, SerializationException
    │   └── UnrecognizedClientException, InvalidSignatureException,
    │       IncompleteSignatureException, MissingAuthenticationTokenException
    └── ServerError (500)                 never shows internal detail to the caller
        ├── KMSInternalException
        ├── KeyUnavailableException
        ├── DependencyTimeoutException (503)
        │   └── ServiceUnavailable (503)  a fault the caller is told the cause of (a full
        │       │                         disk, the audit trail down): ``shows_cause``
        │       └── StorageUnavailable    a database cannot be written (disk full, I/O error)
        └── KeystoreError                 the PKCS#11 layer (``hsmkms.keystore``); tree in
            │                             ``hsmkms.keystore.errors``
            └── ...  (TokenUnavailable: 503, ``shows_cause``)

Status codes follow what AWS KMS sends on the wire (reference/aws-kms-api.md §2.2: 400 for
every client error), not the Smithy model's httpError values.

A server fault's message never reaches the caller (:data:`SERVER_FAULT_MESSAGE` instead),
except for the classes that set ``shows_cause``: faults of the service's surroundings that an
operator words (a full disk, the token away, the audit trail down) and whose cause the caller
may know — they are answered 503 with their message (``docs/operations-faults.md``).
"""

from __future__ import annotations

from typing import ClassVar, Final

SERVER_FAULT_MESSAGE: Final = "hsmkms could not complete the request. Retry it later."
"""What a caller (and the audit record of its call) is told about a server fault: never the
internal detail, which goes to the log only."""


class KMSError(Exception):
    """Root of every hsmkms error. ``code`` is the AWS ``__type``; ``status`` the HTTP status."""

    code: ClassVar[str] = "KMSInternalException"
    status: ClassVar[int] = 500
    shows_cause: ClassVar[bool] = False
    """Whether a server fault's message is shown to the caller (client errors always are)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ClientError(KMSError):
    """The request cannot succeed as sent (HTTP 400)."""

    code = "ValidationException"
    status = 400


class ConfigError(ClientError):
    """The configuration (settings, PKCS#11 URI, PIN source) is invalid or incomplete.

    The message is one line naming the problem; it never contains a PIN.
    """

    code = "ValidationException"


class ServerError(KMSError):
    """hsmkms could not serve a valid request (HTTP 5xx); the caller sees no detail."""

    code = "KMSInternalException"
    status = 500


class NotFoundException(ClientError):
    """The key, alias or resource does not exist."""

    code = "NotFoundException"


class DisabledException(ClientError):
    """The key is disabled."""

    code = "DisabledException"


class KMSInvalidStateException(ClientError):
    """The key's state does not allow the operation."""

    code = "KMSInvalidStateException"


class KeyIntegrityError(KMSInvalidStateException):
    """The key's metadata (its row, a version or a grant) was changed outside hsmkms: its MAC,
    computed inside the token, does not match. The key is unusable until an operator restores
    the rows (``hsmkms doctor`` lists them). The message names the key, never the row's content.
    """

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"The metadata of key {key_id} failed its integrity check: it was changed outside "
            "hsmkms. The key cannot be used until an operator restores it (see hsmkms doctor)."
        )
        self.key_id = key_id

    def __reduce__(self) -> tuple[type[KeyIntegrityError], tuple[str]]:
        return (type(self), (self.key_id,))


class InvalidCiphertextException(ClientError):
    """The ciphertext, its encryption context or its key is wrong. Carries no detail, on purpose."""

    code = "InvalidCiphertextException"

    def __init__(self, message: str = "") -> None:
        # spec: AWS KMS answers InvalidCiphertextException with an empty message (reference §8).
        super().__init__("")


class KMSInvalidSignatureException(ClientError):
    """Verify: the signature is not valid for the message, key and algorithm. Carries no detail
    (spec: AWS answers a failed Verify with this error, never ``SignatureValid: false``)."""

    code = "KMSInvalidSignatureException"

    def __init__(self, message: str = "") -> None:
        super().__init__("")


class KMSInvalidMacException(ClientError):
    """VerifyMac: the MAC is not valid for the message, key and algorithm. Carries no detail
    (spec: AWS answers a failed VerifyMac with this error, never ``MacValid: false``)."""

    code = "KMSInvalidMacException"

    def __init__(self, message: str = "") -> None:
        super().__init__("")


class IncorrectKeyException(ClientError):
    """The KeyId given does not identify the key that encrypted the ciphertext."""

    code = "IncorrectKeyException"


class InvalidKeyUsageException(ClientError):
    """The key's usage does not allow the operation."""

    code = "InvalidKeyUsageException"


class ValidationException(ClientError):
    """A request parameter is missing, of the wrong type or out of range."""

    code = "ValidationException"


class AlreadyExistsException(ClientError):
    """The resource (for example an alias) already exists."""

    code = "AlreadyExistsException"


class LimitExceededException(ClientError):
    """A quota or length limit is exceeded."""

    code = "LimitExceededException"


class InvalidAliasNameException(ClientError):
    """The alias name is malformed or reserved."""

    code = "InvalidAliasNameException"


class InvalidArnException(ClientError):
    """The ARN is malformed."""

    code = "InvalidArnException"


class InvalidMarkerException(ClientError):
    """The pagination marker is not one this service issued."""

    code = "InvalidMarkerException"


class MalformedPolicyDocumentException(ClientError):
    """The key policy is not valid JSON or not a valid policy."""

    code = "MalformedPolicyDocumentException"


class TagException(ClientError):
    """A tag key or value is invalid, reserved or duplicated."""

    code = "TagException"


class UnsupportedOperationException(ClientError):
    """The operation is not supported for this key."""

    code = "UnsupportedOperationException"


class ConflictException(ClientError):
    """The request conflicts with the key's current state (for example a rotation in progress)."""

    code = "ConflictException"


class AccessDeniedException(ClientError):
    """The caller is not authorized for the operation on this resource."""

    code = "AccessDeniedException"


class DryRunOperationException(ClientError):
    """The request would have succeeded, but DryRun was set."""

    code = "DryRunOperationException"


class InvalidGrantTokenException(ClientError):
    """The grant token is not valid."""

    code = "InvalidGrantTokenException"


class InvalidGrantIdException(ClientError):
    """The grant id is not valid."""

    code = "InvalidGrantIdException"


class ExpiredImportTokenException(ClientError):
    """The import token (GetParametersForImport) has expired: get new parameters."""

    code = "ExpiredImportTokenException"


class InvalidImportTokenException(ClientError):
    """The import token is not one of ours, or belongs to another key."""

    code = "InvalidImportTokenException"


class IncorrectKeyMaterialException(ClientError):
    """The imported key material is not what the key expects: not the material imported
    before, or not new when new material was asked for."""

    code = "IncorrectKeyMaterialException"


class CustomKeyStoreNotFoundException(ClientError):
    """No custom key store has this id (or name)."""

    code = "CustomKeyStoreNotFoundException"


class CustomKeyStoreNameInUseException(ClientError):
    """Another custom key store of the account has this name."""

    code = "CustomKeyStoreNameInUseException"


class CustomKeyStoreInvalidStateException(ClientError):
    """The custom key store's connection state does not allow the operation."""

    code = "CustomKeyStoreInvalidStateException"


class CustomKeyStoreHasCMKsException(ClientError):
    """The custom key store still holds KMS keys (pending deletion included)."""

    code = "CustomKeyStoreHasCMKsException"


class CloudHsmClusterNotFoundException(ClientError):
    """No cluster (token registered by the operator) has this id."""

    code = "CloudHsmClusterNotFoundException"


class CloudHsmClusterInUseException(ClientError):
    """Another custom key store uses this cluster."""

    code = "CloudHsmClusterInUseException"


class CloudHsmClusterNotRelatedException(ClientError):
    """The cluster is not the same token as the custom key store's (another trust anchor)."""

    code = "CloudHsmClusterNotRelatedException"


class IncorrectTrustAnchorException(ClientError):
    """The trust anchor certificate is not the cluster's."""

    code = "IncorrectTrustAnchorException"


class XksProxyUriInUseException(ClientError):
    """Another external key store uses this XKS proxy endpoint and path."""

    code = "XksProxyUriInUseException"


class XksKeyAlreadyInUseException(ClientError):
    """Another KMS key of the external key store uses this XksKeyId."""

    code = "XksKeyAlreadyInUseException"


class XksKeyNotFoundException(ClientError):
    """The external key store's proxy does not know this XksKeyId."""

    code = "XksKeyNotFoundException"


class XksKeyInvalidConfigurationException(ClientError):
    """The external key is not an enabled AES_256 key for ENCRYPT and DECRYPT."""

    code = "XksKeyInvalidConfigurationException"


class XksProxyInvalidConfigurationException(ClientError):
    """The XKS proxy configuration is not valid (an ``http://`` endpoint refused, a
    connectivity hsmkms does not offer)."""

    code = "XksProxyInvalidConfigurationException"


class XksProxyIncorrectAuthenticationCredentialException(ClientError):
    """The XKS proxy refused the authentication credential (checked before an update)."""

    code = "XksProxyIncorrectAuthenticationCredentialException"


class XksProxyUriUnreachableException(ClientError):
    """The XKS proxy could not be reached, or did not answer in time (checked before an
    update)."""

    code = "XksProxyUriUnreachableException"


class XksProxyInvalidResponseException(ClientError):
    """The XKS proxy's answer is not what the XKS API specifies."""

    code = "XksProxyInvalidResponseException"


class UnknownOperationException(ClientError):
    """The X-Amz-Target names no operation this service knows."""

    code = "UnknownOperationException"


class SerializationException(ClientError):
    """The request body is not a JSON object of the expected shape."""

    code = "SerializationException"


class UnrecognizedClientException(ClientError):
    """The access key id is unknown."""

    code = "UnrecognizedClientException"


class InvalidSignatureException(ClientError):
    """The request signature does not match, or the request is too old or too new."""

    code = "InvalidSignatureException"


class IncompleteSignatureException(ClientError):
    """The Authorization header is malformed or lacks a required part."""

    code = "IncompleteSignatureException"


class MissingAuthenticationTokenException(ClientError):
    """The request carries no Authorization header."""

    code = "MissingAuthenticationTokenException"


class KMSInternalException(ServerError):
    """An internal fault; retryable."""

    code = "KMSInternalException"


class KeyUnavailableException(ServerError):
    """The key's material cannot be reached right now (for example the HSM is away); retryable."""

    code = "KeyUnavailableException"


class DependencyTimeoutException(ServerError):
    """A dependency (the HSM, the database) did not answer in time; retryable."""

    code = "DependencyTimeoutException"
    status = 503


class ServiceUnavailable(DependencyTimeoutException):
    """hsmkms cannot serve the request now, for a cause the caller is told (503, retryable):
    the audit trail cannot be written, the token is away. The message is worded by hsmkms
    and names the cause, never a secret or a path; AWS KMS's own 503 code
    (``DependencyTimeoutException``) so that SDKs retry it."""

    shows_cause = True


class StorageUnavailable(ServiceUnavailable):
    """A database cannot be written: no space left on its device, or an I/O error
    (:mod:`hsmkms.db.errors`)."""


def caller_error_fields(failure: BaseException) -> tuple[str, str]:
    """``(errorCode, errorMessage)`` of a failed call as its caller sees them: a client error's
    code and message; a server fault's code (``KMSInternalException`` for anything not a
    :class:`KMSError`) with :data:`SERVER_FAULT_MESSAGE`, never its internal detail — unless
    its class ``shows_cause`` (then its own message)."""
    if isinstance(failure, KMSError):
        if failure.status < 500 or failure.shows_cause:
            return failure.code, failure.message
        return failure.code, SERVER_FAULT_MESSAGE
    return KMSInternalException.code, SERVER_FAULT_MESSAGE
