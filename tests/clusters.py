"""Further SoftHSM2 tokens for custom key stores (AWS_CLOUDHSM): made in a data directory's own
SoftHSM2 configuration, registered with ``hsmkms clusters add``."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from server import RunningServer

from hsmkms.softhsm import CONF_NAME, find_module


def cluster_uri(label: str) -> str:
    """The PKCS#11 URI of the token labelled ``label`` on the SoftHSM2 module."""
    return f"pkcs11:token={label}?module-path={find_module()}"


def init_token(data_dir: Path, label: str, pin: str) -> None:
    """A new SoftHSM2 token ``label`` with user PIN ``pin`` in ``data_dir``'s configuration."""
    util = shutil.which("softhsm2-util")
    assert util is not None, "softhsm2-util is needed"
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin,
         "--so-pin", secrets.token_hex(8)],
        env={**os.environ, "SOFTHSM2_CONF": str(data_dir / CONF_NAME)},
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip


def add_cluster(server: RunningServer, cluster_id: str, label: str) -> str:
    """``hsmkms clusters add`` for the token ``label``: its trust anchor."""
    result = server.cli(
        "clusters", "add", "--cluster-id", cluster_id, "--pkcs11-uri", cluster_uri(label), "--json"
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, str] = json.loads(result.stdout)
    assert found["CloudHsmClusterId"] == cluster_id
    return found["TrustAnchorCertificate"]
