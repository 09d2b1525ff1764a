"""``hsmkms seed export``: a data directory's definitions as a seed file, never its secrets.

Keys (their ids, aliases, description, spec and usage, key policy when it is not the default
one, tags, rotation, disabled state) and credentials (name, access key id, identity policy);
keys pending deletion are left out, and said so in the header. Applying the export to the same
data directory changes nothing; applying it elsewhere needs each credential's secret added
(``secret_access_key_env`` or ``secret_access_key_file``).
"""

from __future__ import annotations

from typing import Any

import yaml

from hsmkms.identity import ROOT_NAME
from hsmkms.models.enums import KeyState
from hsmkms.policy import default_key_policy
from hsmkms.seed.document import SEED_VERSION, policy_value
from hsmkms.store import KeyRecord
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


def _key_entry(system: System, key: KeyRecord, default_policy: Any) -> dict[str, Any]:
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
    return entry


def export_seed(system: System) -> str:
    """The seed file (YAML text) of ``system``'s data directory. Reads only; no secret of any
    credential is part of it. ``system`` is opened with ``identity=True``."""
    settings = system.settings
    default_policy = policy_value(default_key_policy(settings.account_id))
    keys, skipped = [], 0
    for key in _keys(system):
        if key.state in (KeyState.Enabled.value, KeyState.Disabled.value):
            keys.append(_key_entry(system, key, default_policy))
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
    if skipped:
        header.append(f"# {skipped} key(s) pending deletion are left out.")
    document: dict[str, Any] = {"version": SEED_VERSION, "keys": keys}
    if credentials:
        document["credentials"] = credentials
    body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body
