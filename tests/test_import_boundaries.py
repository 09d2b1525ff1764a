"""Only ``hsmkms/keystore/`` imports python-pkcs11: by source, and by what importing the layers
above actually loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hsmkms"
_IMPORTS_PKCS11 = re.compile(r"^\s*(?:import\s+pkcs11\b|from\s+pkcs11(?:\.|\s+import)\b)", re.M)

# Layers that must not load python-pkcs11 when imported.
PURE = [
    "hsmkms",
    "hsmkms.profiles",
    "hsmkms.ciphertext",
    "hsmkms.keystore.base",
    "hsmkms.keystore.errors",
    "hsmkms.keystore.specs",
    "hsmkms.keystore.stores",
    "hsmkms.service",
    "hsmkms.store",
    "hsmkms.audit",
    "hsmkms.identity",
    "hsmkms.api.app",
    "hsmkms.config",
    "hsmkms.softhsm",
    "hsmkms.envelope",
    "hsmkms.cli.serve",
    "hsmkms.cli.credentials",
    "hsmkms.cli.envelope",
    "hsmkms.cli.main",
    "hsmkms.system",
    "hsmkms.api.runtime",
    "hsmkms.api.server",
]
# The composition root (hsmkms.system) loads it when it opens the system, not when imported.


def test_only_the_keystore_package_imports_pkcs11() -> None:
    offenders = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if _IMPORTS_PKCS11.search(path.read_text()) and path.parent.name != "keystore"
    )
    assert offenders == []


def test_the_scan_recognizes_every_import_form() -> None:
    for line in ("import pkcs11", "import pkcs11.exceptions as e", "from pkcs11 import KDF",
                 "from pkcs11.util.ec import x", "    import pkcs11"):  # fmt: skip
        assert _IMPORTS_PKCS11.search(line), line
    for line in ("import pkcs11_errors", "from hsmkms.keystore.pkcs11 import X", "# pkcs11"):
        assert not _IMPORTS_PKCS11.search(line), line


@pytest.mark.parametrize("module", PURE)
def test_importing_a_layer_does_not_load_pkcs11(module: str) -> None:
    """A fresh interpreter: importing the module leaves ``pkcs11`` out of ``sys.modules``."""
    code = f"import sys, {module}; print('pkcs11' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
