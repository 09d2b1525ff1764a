"""The local operator: key operations run by a command on a local data directory, audited.

``hsmkms encrypt-file``, ``decrypt-file`` and ``rewrap`` without ``--endpoint-url`` call the
service in their own process with ``caller=None``: whoever runs them holds the token PIN and
the database, so no policy is asked (``docs/architecture.md``, decision 8). They are recorded
all the same, through the server's path: :class:`OperatorService` builds each call's
``AwsApiCall`` record with :func:`hsmkms.audit.prepare_api_call` and hands it to
:meth:`System.audit <hsmkms.system.System.audit>`, which appends it to the trail before the
answer is used. No record, no result: when the record cannot be written, the call's answer is
dropped and the error raised instead, as the server answers with the error.

``hsmkms credentials create``, ``delete`` and ``set-policy`` change who may call the API; they
are recorded the same way (:class:`OperatorCredentials`), as IAM records its own changes:
``eventSource`` ``iam.amazonaws.com``, ``eventName`` ``CreateAccessKey``, ``DeleteAccessKey``,
``PutUserPolicy`` or ``DeleteUserPolicy``, never a secret.

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
from hsmkms.identity import CredentialInfo, IssuedCredential
from hsmkms.identity.xks import IssuedXksCredential, XksCredentialInfo
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
from hsmkms.store.key_stores import ClusterRecord
from hsmkms.system.root import System
from hsmkms.types import Caller

__all__ = [
    "IAM_EVENT_SOURCE",
    "LOCAL_OPERATOR_TYPE",
    "LOCAL_SOURCE",
    "OperatorClusters",
    "OperatorCredentials",
    "OperatorService",
    "OperatorXksCredentials",
    "keys_used",
    "local_operator_identity",
]

LOCAL_OPERATOR_TYPE = "LocalOperator"
"""``userIdentity.type`` of a call made by the local operator (not a CloudTrail type: no AWS
principal made the call, and the record says so rather than borrow ``Root``)."""

LOCAL_SOURCE = "hsmkms-cli"
"""``sourceIPAddress`` of a local operator's call: no network address was involved, so it
names the origin, as CloudTrail names a service (``kms.amazonaws.com``) there."""

XKS_EVENT_SOURCE = "kms-xks-proxy.hsmkms"
"""``eventSource`` of the records of XKS proxy credential changes and XKS proxy API calls (no
AWS service makes them: hsmkms is the external key manager there)."""

IAM_EVENT_SOURCE = "iam.amazonaws.com"
"""``eventSource`` of the records of credential changes (hsmkms's credentials are its IAM)."""

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


def _looks_like_key_id(value: str) -> bool:
    """Whether a credential named on the command line is an access key id this store made
    (else it is taken for a user name, in the record of a failed change)."""
    return len(value) == 20 and value.startswith("AKIA") and value.isalnum() and value.isupper()


class _OperatorChanges:
    """What the operator classes share: who the local operator is, and recording one change
    (successful or failed) in the audit trail through :meth:`System.audit
    <hsmkms.system.System.audit>` before its result is used — no record, no result."""

    EVENT_SOURCE: str | None = None
    """The records' ``eventSource`` (None: the KMS one)."""

    def __init__(self, system: System, *, command: str) -> None:
        self._system = system
        self._identity = local_operator_identity(system.settings.account_id)
        self._user_agent = f"hsmkms-cli/{__version__} ({command})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(user_agent={self._user_agent!r})"

    def _record(
        self,
        event: str,
        request: dict[str, Any],
        response: dict[str, Any] | None,
        failure: Exception | None,
    ) -> None:
        error_code = error_message = None
        if failure is not None:
            error_code, error_message = caller_error_fields(failure)
        settings = self._system.settings
        extra: dict[str, Any] = {}
        if self.EVENT_SOURCE is not None:
            extra["event_source"] = self.EVENT_SOURCE
        self._system.audit(
            prepare_api_call(
                event,
                read_only=False,
                identity=self._identity,
                account_id=settings.account_id,
                region=settings.region,
                request_id=str(uuid.uuid4()),
                request=request,
                response=response,
                source_ip=LOCAL_SOURCE,
                user_agent=self._user_agent,
                error_code=error_code,
                error_message=error_message,
                **extra,
            )
        )


class OperatorCredentials(_OperatorChanges):
    """The credentials store as the local operator changes it (``hsmkms credentials``), every
    change — successful or failed — recorded in the audit trail through
    :meth:`System.audit <hsmkms.system.System.audit>` before its result is used. No record, no
    result: when the record cannot be written, its error is raised instead (a credential
    created meanwhile exists, but its secret is never shown: delete it).

    Records (``eventSource`` ``iam.amazonaws.com``, ``userIdentity`` ``LocalOperator``):
    ``CreateAccessKey`` (``userName``; the response's ``accessKey`` without the secret),
    ``DeleteAccessKey`` (``userName``, ``accessKeyId``), ``PutUserPolicy`` (``userName``,
    ``policyDocument``: identity policies are not secret, as IAM logs them) and
    ``DeleteUserPolicy``; ``TrustCredentials`` (``hsmkms credentials trust``). The root
    credential set from ``HSMKMS_ROOT_*`` at a start is a ``CreateAccessKey`` of ``root``.
    """

    EVENT_SOURCE = IAM_EVENT_SOURCE

    def __init__(self, system: System, *, command: str) -> None:
        super().__init__(system, command=command)
        self._store = system.credentials

    @staticmethod
    def _named(name_or_key_id: str) -> dict[str, Any]:
        member = "AccessKeyId" if _looks_like_key_id(name_or_key_id) else "UserName"
        return {member: name_or_key_id}

    def create(self, name: str, policy: str | None = None) -> IssuedCredential:
        """:meth:`CredentialStore.create`, recorded as ``CreateAccessKey`` (and the policy it
        attaches as part of the request)."""
        request: dict[str, Any] = {"UserName": name}
        if policy is not None:
            request["PolicyDocument"] = policy
        try:
            issued = self._store.create(name, policy)
        except Exception as exc:
            self._record("CreateAccessKey", request, None, exc)
            raise
        self.record_created(issued, policy)
        return issued

    def record_created(self, issued: IssuedCredential, policy: str | None = None) -> None:
        """Record a credential created (also the root set from ``HSMKMS_ROOT_*``)."""
        request: dict[str, Any] = {"UserName": issued.name}
        if policy is not None:
            request["PolicyDocument"] = policy
        access_key = {
            "AccessKeyId": issued.access_key_id,
            "UserName": issued.name,
            "Status": "Active",
        }
        self._record("CreateAccessKey", request, {"AccessKey": access_key}, None)

    def rotate(self, name_or_key_id: str) -> IssuedCredential:
        """:meth:`CredentialStore.rotate` (a second access key for the user), recorded as
        ``CreateAccessKey``, as IAM records a user's second key."""
        try:
            issued = self._store.rotate(name_or_key_id)
        except Exception as exc:
            self._record("CreateAccessKey", self._named(name_or_key_id), None, exc)
            raise
        self.record_created(issued)
        return issued

    def list(self) -> list[CredentialInfo]:
        """:meth:`CredentialStore.list` (a read: not recorded)."""
        return self._store.list()

    def delete(self, name_or_key_id: str) -> CredentialInfo:
        """:meth:`CredentialStore.delete`, recorded as ``DeleteAccessKey``."""
        try:
            info = self._store.delete(name_or_key_id)
        except Exception as exc:
            self._record("DeleteAccessKey", self._named(name_or_key_id), None, exc)
            raise
        request = {"UserName": info.name, "AccessKeyId": info.access_key_id}
        self._record("DeleteAccessKey", request, None, None)
        return info

    def trust(self) -> int:
        """:meth:`CredentialStore.trust`, recorded as ``TrustCredentials`` (an hsmkms event:
        the operator vouched for the credential set in the database) with the count."""
        try:
            count = self._store.trust()
        except Exception as exc:
            self._record("TrustCredentials", {}, None, exc)
            raise
        self._record("TrustCredentials", {}, {"AccessKeys": count}, None)
        return count

    def set_policy(self, name_or_key_id: str, policy: str | None) -> CredentialInfo:
        """:meth:`CredentialStore.set_policy`, recorded as ``PutUserPolicy`` (with the policy)
        or ``DeleteUserPolicy`` (``policy`` None)."""
        event = "DeleteUserPolicy" if policy is None else "PutUserPolicy"
        request = self._named(name_or_key_id)
        if policy is not None:
            request["PolicyDocument"] = policy
        try:
            info = self._store.set_policy(name_or_key_id, policy)
        except Exception as exc:
            self._record(event, request, None, exc)
            raise
        request.update({"UserName": info.name, "AccessKeyId": info.access_key_id})
        self._record(event, request, None, None)
        return info


class OperatorXksCredentials(_OperatorChanges):
    """The XKS proxy credentials as the local operator changes them (``hsmkms xks
    credentials``), every change — successful or failed — recorded in the audit trail before
    its result is used (no record, no result), as :class:`OperatorCredentials` does.

    Records (``eventSource`` :data:`XKS_EVENT_SOURCE`, ``userIdentity`` ``LocalOperator``):
    ``CreateXksCredential`` (``prefix``; the response's access key id and URI path, never the
    secret), ``DeleteXksCredential`` (``accessKeyId``, ``prefix``), ``TrustXksCredentials``
    (the operator vouched for the set in the database), ``PutXksPolicy`` and
    ``DeleteXksPolicy`` (a prefix's secondary authorization)."""

    EVENT_SOURCE = XKS_EVENT_SOURCE

    def __init__(self, system: System, *, command: str) -> None:
        super().__init__(system, command=command)
        self._store = system.xks_credentials

    def create(self, prefix: str) -> IssuedXksCredential:
        """:meth:`XksCredentialStore.create`, recorded as ``CreateXksCredential``."""
        request: dict[str, Any] = {"Prefix": prefix}
        try:
            issued = self._store.create(prefix)
        except Exception as exc:
            self._record("CreateXksCredential", request, None, exc)
            raise
        response = {"AccessKeyId": issued.access_key_id, "UriPath": issued.uri_path}
        self._record("CreateXksCredential", request, response, None)
        return issued

    def list(self, prefix: str | None = None) -> list[XksCredentialInfo]:
        """:meth:`XksCredentialStore.list` (a read: not recorded)."""
        return self._store.list(prefix)

    def delete(self, access_key_id: str) -> XksCredentialInfo:
        """:meth:`XksCredentialStore.delete`, recorded as ``DeleteXksCredential``."""
        request: dict[str, Any] = {"AccessKeyId": access_key_id}
        try:
            info = self._store.delete(access_key_id)
        except Exception as exc:
            self._record("DeleteXksCredential", request, None, exc)
            raise
        request["Prefix"] = info.prefix
        self._record("DeleteXksCredential", request, None, None)
        return info

    def trust(self) -> int:
        """:meth:`XksCredentialStore.trust`, recorded as ``TrustXksCredentials`` with the
        count."""
        try:
            count = self._store.trust()
        except Exception as exc:
            self._record("TrustXksCredentials", {}, None, exc)
            raise
        self._record("TrustXksCredentials", {}, {"AccessKeys": count}, None)
        return count

    def put_policy(self, prefix: str, policy: str) -> None:
        """:meth:`XksCredentialStore.put_policy`, recorded as ``PutXksPolicy`` (the prefix
        and the document)."""
        request: dict[str, Any] = {"Prefix": prefix, "PolicyDocument": policy}
        try:
            self._store.put_policy(prefix, policy)
        except Exception as exc:
            self._record("PutXksPolicy", request, None, exc)
            raise
        self._record("PutXksPolicy", request, None, None)

    def policy(self, prefix: str) -> str | None:
        """:meth:`XksCredentialStore.policy` (a read: not recorded)."""
        return self._store.policy(prefix)

    def delete_policy(self, prefix: str) -> bool:
        """:meth:`XksCredentialStore.delete_policy`, recorded as ``DeleteXksPolicy``."""
        request: dict[str, Any] = {"Prefix": prefix}
        try:
            removed = self._store.delete_policy(prefix)
        except Exception as exc:
            self._record("DeleteXksPolicy", request, None, exc)
            raise
        self._record("DeleteXksPolicy", request, None, None)
        return removed


class OperatorClusters(_OperatorChanges):
    """The clusters of custom key stores (further tokens) as the local operator changes them
    (``hsmkms clusters``), every change — successful or failed — recorded in the audit trail
    before its result is used, as :class:`OperatorXksCredentials` does.

    Records (``eventSource`` ``kms.amazonaws.com``, ``userIdentity`` ``LocalOperator``):
    ``AddCloudHsmCluster`` (``CloudHsmClusterId``, ``Pkcs11Uri``, which carries no PIN) and
    ``RemoveCloudHsmCluster`` (``CloudHsmClusterId``)."""

    def __init__(self, system: System, *, command: str) -> None:
        super().__init__(system, command=command)
        self._table = system.service.custom_key_stores.table

    def add(self, cluster_id: str, pkcs11_uri: str, trust_anchor: str) -> ClusterRecord:
        """:meth:`CustomKeyStoreTable.add_cluster`, recorded as ``AddCloudHsmCluster``."""
        request: dict[str, Any] = {"CloudHsmClusterId": cluster_id, "Pkcs11Uri": pkcs11_uri}
        try:
            record = self._table.add_cluster(cluster_id, pkcs11_uri, trust_anchor)
        except Exception as exc:
            self._record("AddCloudHsmCluster", request, None, exc)
            raise
        self._record("AddCloudHsmCluster", request, {"CloudHsmClusterId": cluster_id}, None)
        return record

    def remove(self, cluster_id: str) -> ClusterRecord:
        """:meth:`CustomKeyStoreTable.remove_cluster`, recorded as ``RemoveCloudHsmCluster``."""
        request: dict[str, Any] = {"CloudHsmClusterId": cluster_id}
        try:
            record = self._table.remove_cluster(cluster_id)
        except Exception as exc:
            self._record("RemoveCloudHsmCluster", request, None, exc)
            raise
        self._record("RemoveCloudHsmCluster", request, None, None)
        return record
