"""The README says what is not supported yet, and stays true: its list of operations answered
UnknownOperationException is the operations the descriptors have no models for."""

from __future__ import annotations

import re
from pathlib import Path

from hsmkms.service.operations import ALL_OPERATIONS, OPERATIONS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_lists_exactly_the_operations_not_implemented_yet() -> None:
    text = README.read_text()
    section = text[text.index("## Not supported yet") :]
    paragraph = section[: section.index("\n- ", section.index("UnknownOperationException"))]
    listed = set(re.findall(r"`([A-Z][A-Za-z]+)`", paragraph)) - {
        "UnknownOperationException",
        "UnsupportedOperationException",
    }
    assert listed == set(ALL_OPERATIONS) - set(OPERATIONS)
