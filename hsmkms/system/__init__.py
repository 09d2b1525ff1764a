"""The composition root: the running system built from settings, for every entry point.

It sits above ``service/``, ``store/``, ``keystore/``, ``identity/`` and ``audit/`` and below
``api/`` and ``cli/`` (``docs/architecture.md``, "The composition root"):

* :mod:`hsmkms.system.root` — :class:`System` (keystore, sealed metadata store, service,
  credentials store, audit trail and writer), :func:`open_audit_reader`,
  :func:`open_audit_verifier`; the only module constructing those parts;
* :mod:`hsmkms.system.datadir` — :func:`initialize`: the data directory, the token, the
  database and the root identity (``hsmkms init``, ``serve``'s parent);
  :func:`require_data_directory`: every other command's first question;
* :mod:`hsmkms.system.operator` — :class:`OperatorService`: the local operator's key
  operations, each recorded in the audit trail like an API call; :class:`OperatorCredentials`:
  the changes of ``hsmkms credentials``, recorded the same way.
"""

from __future__ import annotations

from hsmkms.system.datadir import (
    ROOT_CREDENTIALS_FILE,
    ROOT_KEY_ENV,
    ROOT_SECRET_ENV,
    InitReport,
    NoDataDirectory,
    check_data_directory,
    data_directory_exists,
    initialize,
    require_data_directory,
    write_root_file,
)
from hsmkms.system.operator import (
    LOCAL_OPERATOR_TYPE,
    LOCAL_SOURCE,
    OperatorClusters,
    OperatorCredentials,
    OperatorService,
    OperatorXksCredentials,
    local_operator_identity,
)
from hsmkms.system.root import (
    AuditMode,
    System,
    cluster_identity,
    database_device,
    open_audit_reader,
    open_audit_resumer,
    open_audit_verifier,
    service_event_sink,
)

__all__ = [
    "LOCAL_OPERATOR_TYPE",
    "LOCAL_SOURCE",
    "ROOT_CREDENTIALS_FILE",
    "ROOT_KEY_ENV",
    "ROOT_SECRET_ENV",
    "AuditMode",
    "InitReport",
    "NoDataDirectory",
    "OperatorClusters",
    "OperatorCredentials",
    "OperatorService",
    "OperatorXksCredentials",
    "System",
    "check_data_directory",
    "cluster_identity",
    "data_directory_exists",
    "database_device",
    "initialize",
    "local_operator_identity",
    "open_audit_reader",
    "open_audit_resumer",
    "open_audit_verifier",
    "require_data_directory",
    "service_event_sink",
    "write_root_file",
]
