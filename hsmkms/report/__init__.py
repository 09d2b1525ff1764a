"""The signed key-custody report (``hsmkms report``; ``docs/report.md``).

- :mod:`hsmkms.report.build` — the report object from the running system
  (:func:`build_report`, :class:`ReportContext` for one key at a time);
- :mod:`hsmkms.report.custody` — the token attributes and the verdict drawn from them;
- :mod:`hsmkms.report.access` — who may use, administer and view a key (the policy engine);
- :mod:`hsmkms.report.render` — JSON, HTML and Markdown, signed inside the token;
- :mod:`hsmkms.report.signing` — the signing key (``hsmkms:report`` on the token) and
  verification of a report file;
- ``report.schema.json`` — the JSON Schema of the JSON form (:func:`schema`).

It sits above the service and below the entry points: it is handed an open
:class:`~hsmkms.system.System` and reads no settings itself.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from hsmkms.report.build import FORMAT_VERSION, Deployment, ReportContext, build_report
from hsmkms.report.custody import Verdict
from hsmkms.report.render import render
from hsmkms.report.signing import (
    DocumentSignature,
    InvalidReportSignature,
    ReportFormat,
    SigningKey,
    UnsignedDocument,
    find_signing_keys,
    signing_key,
    verify_document,
)

__all__ = [
    "FORMAT_VERSION",
    "Deployment",
    "DocumentSignature",
    "InvalidReportSignature",
    "ReportContext",
    "ReportFormat",
    "SigningKey",
    "UnsignedDocument",
    "Verdict",
    "build_report",
    "find_signing_keys",
    "render",
    "schema",
    "signing_key",
    "verify_document",
]


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a JSON report file."""
    text = resources.files("hsmkms.report").joinpath("report.schema.json").read_text("utf-8")
    value: dict[str, Any] = json.loads(text)
    return value
