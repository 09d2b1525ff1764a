"""The policy examples of docs/key-policies.md, read from the file itself, so the tests exercise
exactly the text a reader copies.

An example is the ```` ```json ```` block right after an HTML marker comment
(``<!-- separation-of-duties -->``).
"""

from __future__ import annotations

import re
from pathlib import Path

KEY_POLICIES_DOC = Path(__file__).resolve().parent.parent / "docs" / "key-policies.md"

# The principals the separation-of-duties example names (users, as `hsmkms credentials`
# creates them), so a test can put real credentials' ARNs in their place.
EXAMPLE_ACCOUNT = "111122223333"
EXAMPLE_ROOT = f"arn:aws:iam::{EXAMPLE_ACCOUNT}:root"
EXAMPLE_ADMIN = f"arn:aws:iam::{EXAMPLE_ACCOUNT}:user/KeyAdmin"
EXAMPLE_USER = f"arn:aws:iam::{EXAMPLE_ACCOUNT}:user/KeyUser"


def doc_example(marker: str) -> str:
    """The JSON block after ``<!-- marker -->`` in docs/key-policies.md, exactly as written."""
    text = KEY_POLICIES_DOC.read_text()
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```json\n(.*?)\n```", text, re.DOTALL)
    assert match is not None, f"the {marker} example is missing from docs/key-policies.md"
    return match.group(1)


def separation_of_duties() -> str:
    """The separation-of-duties key policy of the docs, as text."""
    return doc_example("separation-of-duties")
