"""The package's public surface is deliberate: sorted, and every name resolves."""

from __future__ import annotations

import hsmkms


def test_all_is_sorted_and_resolves() -> None:
    assert hsmkms.__all__ == sorted(hsmkms.__all__)
    for name in hsmkms.__all__:
        assert getattr(hsmkms, name) is not None


def test_importing_the_package_does_not_load_pkcs11() -> None:
    """Only hsmkms.keystore.pkcs11 imports python-pkcs11, and only when a keystore is used."""
    import subprocess
    import sys

    code = "import sys, hsmkms; print('pkcs11' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
