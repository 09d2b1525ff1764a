"""A log event full of secrets, for the tests of the one logging set-up: emitted by a process
right after it set up its logging, whatever its entry point.

:func:`install` wraps :func:`hsmkms.log.configure_logging` so that every call is followed by
:func:`emit`. The server test installs it in each process of ``hsmkms serve`` (the parent and
its spawned workers) through a ``sitecustomize`` module on ``PYTHONPATH``; the values come
from ``LEAK_PROBE`` (JSON, name -> hex).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

MARKER = "leak_probe"
ENV = "LEAK_PROBE"


def emit(values: Mapping[str, bytes]) -> None:
    """One structlog event and one stdlib record carrying ``pin``, ``secret_access_key``,
    ``plaintext`` and ``data_key``: as text under secret-like names, as bytes under plain
    names, nested, and as a stdlib record's ``%``-arguments."""
    pin, secret = values["pin"], values["secret_access_key"]
    plaintext, data_key = values["plaintext"], values["data_key"]
    structlog.get_logger("probe").warning(
        MARKER,
        pid=os.getpid(),
        user_pin=pin.decode(),
        SecretAccessKey=secret.decode(),
        Plaintext=base64.b64encode(plaintext).decode(),
        data_key=data_key.hex(),
        payload=plaintext,
        material=data_key,
        value=pin,
        detail=secret,
        body={"items": [plaintext, {"Authorization": f"Credential={secret.decode()}"}]},
    )
    logging.getLogger("uvicorn.error").warning(
        MARKER + " stdlib %s %s %s %s", pin, secret, plaintext, data_key
    )


def values_from_env() -> dict[str, bytes]:
    values = {k: bytes.fromhex(v) for k, v in json.loads(os.environ[ENV]).items()}
    # In a server worker, the data directory's real PIN (the parent exported the directory).
    data_dir = os.environ.get("HSMKMS_DATA_DIR")
    pin_file = Path(data_dir) / "user.pin" if data_dir else None
    if pin_file is not None and pin_file.is_file():
        values["pin"] = pin_file.read_bytes().strip()
    return values


def install() -> None:
    import hsmkms.log

    configure = hsmkms.log.configure_logging

    def configure_then_probe(*args: Any, **kwargs: Any) -> None:
        configure(*args, **kwargs)
        emit(values_from_env())

    hsmkms.log.configure_logging = configure_then_probe
