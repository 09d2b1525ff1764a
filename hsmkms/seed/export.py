"""``hsmkms seed export``: a data directory's definitions as a seed file, never its secrets.

Custom key stores (name, type, cluster id and trust anchor, or the proxy's endpoint, path,
connectivity and access key id — never the password or the proxy's secret), keys (their ids,
aliases, description, spec and usage, key policy when it is not the default one, tags,
rotation, disabled state, custom key store by name, XksKeyId) and credentials (name, access
key id, identity policy);
keys pending deletion are left out, and said so in the header. Applying the export to the same
data directory changes nothing; applying it elsewhere needs each credential's secret added
(``secret_access_key_env`` or ``secret_access_key_file``).
"""

from __future__ import annotations

from typing import Any

import yaml

from hsmkms.errors import UnsupportedOperationException
from hsmkms.identity import ROOT_NAME
from hsmkms.models import DescribeKeyRequest
from hsmkms.models.enums import KeyState, OriginType
from hsmkms.policy import default_key_policy
from hsmkms.seed.document import SEED_VERSION, policy_value
from hsmkms.service import OPERATIONS
from hsmkms.store import KeyRecord
from hsmkms.store.key_stores import CustomKeyStoreRecord
from hsmkms.system import System

__all__ = ["export_seed"]

_PAGE = 1000


def _keys(system: System) -> list[KeyRecord]:
    keys: list[KeyRecord] = []
    marker: str | None = None
    while True:
        page = system.store.list_keys(_PAGE, marker)
        keys.extend(page.items)
        if page.next_marker is None:
            return keys
        marker = page.next_marker


def _store_entry(system: System, record: CustomKeyStoreRecord) -> dict[str, Any]:
    """A custom key store as a seed entry: never its password or its proxy's secret."""
    entry: dict[str, Any] = {"name": record.name, "type": record.store_type}
    if record.xks is not None:
        entry["xks_proxy_uri_endpoint"] = record.xks.uri_endpoint
        entry["xks_proxy_uri_path"] = record.xks.uri_path
        entry["xks_proxy_connectivity"] = record.xks.connectivity
        entry["xks_proxy_access_key_id"] = record.xks.access_key_id
        return entry
    entry["cluster_id"] = record.cluster_id
    table = system.service.custom_key_stores.table
    cluster = None if record.cluster_id is None else table.cluster(record.cluster_id)
    if cluster is not None:
        entry["trust_anchor_certificate"] = cluster.trust_anchor
    return entry


def _key_store_members(
    system: System, key: KeyRecord, store_names: dict[str, str]
) -> dict[str, Any]:
    """``custom_key_store`` (the store's name) and ``xks_key_id`` of a key in a store."""
    if key.origin not in (OriginType.AWS_CLOUDHSM, OriginType.EXTERNAL_KEY_STORE):
        return {}
    worker = getattr(system.service, OPERATIONS["DescribeKey"].worker)
    meta = worker(DescribeKeyRequest(KeyId=key.key_id), None).KeyMetadata
    if meta.CustomKeyStoreId is None:
        return {}
    members: dict[str, Any] = {
        "custom_key_store": store_names.get(meta.CustomKeyStoreId, meta.CustomKeyStoreId)
    }
    if meta.XksKeyConfiguration is not None:
        members["xks_key_id"] = meta.XksKeyConfiguration.get("Id")
    return members


def _key_entry(
    system: System, key: KeyRecord, default_policy: Any, store_names: dict[str, str]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": key.key_id}
    aliases = sorted(system.store.alias_names_of(key.key_id))
    if aliases:
        entry["aliases"] = aliases
    if key.description:
        entry["description"] = key.description
    entry["spec"] = key.key_spec
    entry["usage"] = key.key_usage
    policy = policy_value(key.policy)
    if policy != default_policy:
        entry["policy"] = policy
    tags = dict(system.store.tags_of(key.key_id))
    if tags:
        entry["tags"] = tags
    if key.rotation_enabled:
        entry["rotation"] = {"enabled": True, "period_days": key.rotation_period_days}
    if key.state == KeyState.Disabled.value:
        entry["enabled"] = False
    entry.update(_key_store_members(system, key, store_names))
    return entry


def _stores(system: System) -> list[CustomKeyStoreRecord]:
    """The custom key stores, oldest first (none where the service has none)."""
    try:
        return system.service.custom_key_stores.table.stores()
    except UnsupportedOperationException:
        return []


def export_seed(system: System) -> str:
    """The seed file (YAML text) of ``system``'s data directory. Reads only; no secret of any
    credential is part of it. ``system`` is opened with ``identity=True``."""
    settings = system.settings
    default_policy = policy_value(default_key_policy(settings.account_id))
    records = _stores(system)
    stores = [_store_entry(system, record) for record in records]
    store_names = {record.store_id: record.name for record in records}
    keys, skipped = [], 0
    for key in _keys(system):
        if key.state in (KeyState.Enabled.value, KeyState.Disabled.value):
            keys.append(_key_entry(system, key, default_policy, store_names))
        else:
            skipped += 1
    credentials = []
    for info in system.credentials.list():
        if info.name == ROOT_NAME:
            continue
        entry: dict[str, Any] = {"name": info.name, "access_key_id": info.access_key_id}
        if info.has_policy:
            policy = system.credentials.get_policy(info.access_key_id)[1]
            if policy is not None:
                entry["policy"] = policy_value(policy)
        credentials.append(entry)
    header = [
        f"# hsmkms seed file: the definitions of account {settings.account_id}, region "
        f"{settings.region} (hsmkms seed export).",
        "# Secrets are never exported: to create a credential in another data directory, add",
        "# secret_access_key_env (or secret_access_key_file) to its entry.",
    ]
    if stores:
        header += [
            "# To create a custom key store elsewhere, add key_store_password_env (or _file), or",
            "# xks_proxy_secret_access_key_env (or _file), to its entry.",
        ]
    if skipped:
        header.append(f"# {skipped} key(s) pending deletion are left out.")
    document: dict[str, Any] = {"version": SEED_VERSION}
    if stores:
        document["custom_key_stores"] = stores
    document["keys"] = keys
    if credentials:
        document["credentials"] = credentials
    body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body
