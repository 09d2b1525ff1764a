"""The local operator: key operations run by a command on a local data directory, audited.

``hsmkms encrypt-file``, ``decrypt-file`` and ``rewrap`` without ``--endpoint-url`` call the
service in their own process with ``caller=None``: whoever runs them holds the token PIN and
the database, so no policy is asked (``docs/architecture.md``, decision 8). They are recorded
all the same, through the server's path: :class:`OperatorService` builds each call's
``AwsApiCall`` record with :func:`hsmkms.audit.prepare_api_call` and hands it to
:meth:`System.audit <hsmkms.system.System.audit>`, which appends it to the trail before the
answer is used. No record, no result: when the record cannot be written, the call's answer is
dropped and the error raised instead, as the server answers with the error.

Who the record names (``docs/audit.md``, "Local operator records")::

    "userIdentity": {"type": "LocalOperator", "principalId": "<os user>@<host>",
                     "accountId": "<account>", "userName": "<os user>"},
    "sourceIPAddress": "hsmkms-cli", "userAgent": "hsmkms-cli/<version> (<command>)"
"""

from __future__ import annotations

import os
import pwd
import socket
import uuid
from typing import Any

from pydantic import BaseModel

from hsmkms import __version__
from hsmkms.audit import UserIdentity, prepare_api_call
from hsmkms.ciphertext import CiphertextBlob
from hsmkms.errors import KMSError, caller_error_fields
from hsmkms.models.crypto import (
    DecryptRequest,
    DecryptResponse,
    GenerateDataKeyRequest,
    GenerateDataKeyResponse,
    ReEncryptRequest,
    ReEncryptResponse,
)
from hsmkms.service import OPERATIONS
from hsmkms.service.identifiers import Arns
from hsmkms.system.root import System
from hsmkms.types import Caller

__all__ = [
    "LOCAL_OPERATOR_TYPE",
    "LOCAL_SOURCE",
    "OperatorService",
    "keys_used",
    "local_operator_identity",
]

LOCAL_OPERATOR_TYPE = "LocalOperator"
"""``userIdentity.type`` of a call made by the local operator (not a CloudTrail type: no AWS
principal made the call, and the record says so rather than borrow ``Root``)."""

LOCAL_SOURCE = "hsmkms-cli"
"""``sourceIPAddress`` of a local operator's call: no network address was involved, so it
names the origin, as CloudTrail names a service (``kms.amazonaws.com``) there."""

# Request and response members that name a key, in the order the service notes them.
_KEY_NAME_MEMBERS = ("KeyId", "SourceKeyId", "DestinationKeyId")


def _os_user() -> str:
    """The name of the process's effective user id — not ``$USER``, which the caller sets."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry (some containers)
        return f"uid-{uid}"


def local_operator_identity(account_id: str) -> UserIdentity:
    """The ``userIdentity`` of this process's operator: type ``LocalOperator``, the OS user
    (of the effective user id) and host as ``principalId``, the OS user as ``userName``. No
    ARN and no access key: the operator is no principal of the account, and authenticated
    with none."""
    user = _os_user()
    return UserIdentity(
        LOCAL_OPERATOR_TYPE,
        principal_id=f"{user}@{socket.gethostname()}",
        account_id=account_id,
        user_name=user,
    )


def _note(used: dict[str, int | None], arn: str, version: int | None) -> None:
    # Caller.note_key's rule: a version, once known, is kept unless a later one replaces it.
    if version is not None or arn not in used:
        used[arn] = version


def keys_used(arns: Arns, request: BaseModel, response: BaseModel | None) -> dict[str, int | None]:
    """The keys a local call used (key ARN -> key version or None), for ``resources`` and
    ``keyVersion`` — what the service notes on an API caller, read from the call itself:
    the key and version inside each ciphertext blob (the response's, then the request's, the
    order in which ReEncrypt notes them), the key ARNs the response names, and — for a failed
    call — the keys the request names by key id or key ARN (an alias is not resolved)."""
    used: dict[str, int | None] = {}
    for model in (response, request):
        data = getattr(model, "CiphertextBlob", None) if model is not None else None
        if isinstance(data, bytes):
            try:
                blob = CiphertextBlob.parse(data)
            except KMSError:
                continue
            _note(used, arns.key(blob.key_id), blob.key_version)
    named = response if response is not None else request
    for member in _KEY_NAME_MEMBERS:
        value = getattr(named, member, None)
        if not isinstance(value, str):
            continue
        try:
            key_id = arns.parse(value, aliases=False).key_id
        except KMSError:
            continue
        if key_id is not None:
            _note(used, arns.key(key_id), None)
    return used


class OperatorService:
    """The service as the local operator calls it, every call recorded in the audit trail.

    :meth:`invoke` runs any operation; :meth:`generate_data_key`, :meth:`decrypt` and
    :meth:`re_encrypt` are what :class:`hsmkms.envelope.ServiceProvider` calls. ``command`` is
    the command line's command, shown in ``userAgent``.
    """

    def __init__(self, system: System, *, command: str) -> None:
        self._system = system
        self._service = system.service
        self._arns = Arns(system.settings.region, system.settings.account_id)
        self._identity = local_operator_identity(system.settings.account_id)
        self._user_agent = f"hsmkms-cli/{__version__} ({command})"

    def __repr__(self) -> str:
        return f"OperatorService(user_agent={self._user_agent!r})"

    def invoke(self, operation: str, request: BaseModel) -> Any:
        """Run ``operation`` (an AWS name, e.g. ``"Decrypt"``) as the local operator, record it
        (allowed, successful or failed, like an API call), and return its response or raise
        its error. When the record cannot be written, that error is raised instead."""
        op = OPERATIONS[operation]
        method = getattr(self._service, op.worker)
        response: BaseModel | None = None
        failure: Exception | None = None
        try:
            response = method(request, None)
        except Exception as exc:
            failure = exc
        error_code = error_message = None
        if failure is not None:
            error_code, error_message = caller_error_fields(failure)
        used = keys_used(self._arns, request, response)
        versions = [v for v in used.values() if v is not None]
        settings = self._system.settings
        record = prepare_api_call(
            operation,
            read_only=op.read_only,
            identity=self._identity,
            account_id=settings.account_id,
            region=settings.region,
            request_id=str(uuid.uuid4()),
            request=request,
            response=response,
            key_arns=list(used),
            source_ip=LOCAL_SOURCE,
            user_agent=self._user_agent,
            error_code=error_code,
            error_message=error_message,
            additional_event_data={"keyVersion": versions[0]} if len(versions) == 1 else None,
        )
        self._system.audit(record)
        if failure is not None:
            raise failure
        return response

    @staticmethod
    def _operator_only(caller: Caller | None) -> None:
        if caller is not None:
            raise TypeError("OperatorService runs calls as the local operator only")

    def generate_data_key(
        self, request: GenerateDataKeyRequest, caller: Caller | None = None
    ) -> GenerateDataKeyResponse:
        self._operator_only(caller)
        response: GenerateDataKeyResponse = self.invoke("GenerateDataKey", request)
        return response

    def decrypt(self, request: DecryptRequest, caller: Caller | None = None) -> DecryptResponse:
        self._operator_only(caller)
        response: DecryptResponse = self.invoke("Decrypt", request)
        return response

    def re_encrypt(
        self, request: ReEncryptRequest, caller: Caller | None = None
    ) -> ReEncryptResponse:
        self._operator_only(caller)
        response: ReEncryptResponse = self.invoke("ReEncrypt", request)
        return response
