"""What the token says about each piece of key material, and the plain verdict drawn from it.

The report reads the custody attributes of every key version's token objects back from the
token at the time of the report (:data:`CUSTODY_ATTRIBUTES`, :data:`OPERATION_ATTRIBUTES`:
``CKA_`` names without the prefix) and turns them into one :class:`Custody` per version: a
verdict, one sentence, and the exact reasons when the verdict is not the best one. Pure: the
attributes are read by :mod:`hsmkms.report.build` through the keystore's inventory.

The rules (PKCS#11 v2.40 §4.4, §4.8-4.9; ``docs/report.md``):

- ``CKA_TOKEN``, ``CKA_SENSITIVE`` true and ``CKA_EXTRACTABLE`` false: the material cannot leave
  the token now, in plaintext or wrapped. Anything else is :attr:`Verdict.EXTRACTABLE`.
- ``CKA_LOCAL`` true: generated on the token (a key unwrapped or imported into it is not
  local); ``CKA_ALWAYS_SENSITIVE`` and ``CKA_NEVER_EXTRACTABLE`` true: it has never been readable
  or exportable since it came to be. All three: :attr:`Verdict.GENERATED_NEVER_EXTRACTABLE`.
- ``CKA_MODIFIABLE``, ``CKA_COPYABLE``, ``CKA_DESTROYABLE`` and the permitted operations are
  shown and may add notes; they never make the verdict worse: PKCS#11 forbids setting
  ``CKA_SENSITIVE`` back to false or ``CKA_EXTRACTABLE`` back to true, and a copy inherits both.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = [
    "CUSTODY_ATTRIBUTES",
    "OPERATION_ATTRIBUTES",
    "PUBLIC_KEY_ATTRIBUTES",
    "Custody",
    "ObjectReading",
    "Placement",
    "Verdict",
    "judge",
]

CUSTODY_ATTRIBUTES: Final = (
    "TOKEN",
    "PRIVATE",
    "SENSITIVE",
    "ALWAYS_SENSITIVE",
    "EXTRACTABLE",
    "NEVER_EXTRACTABLE",
    "LOCAL",
    "MODIFIABLE",
    "COPYABLE",
    "DESTROYABLE",
)
"""The attributes read from every secret or private key object, in report order."""

OPERATION_ATTRIBUTES: Final = (
    "ENCRYPT",
    "DECRYPT",
    "SIGN",
    "VERIFY",
    "WRAP",
    "UNWRAP",
    "DERIVE",
    "SIGN_RECOVER",
    "VERIFY_RECOVER",
)
"""The capability attributes read: the permitted operations are those set to true."""

PUBLIC_KEY_ATTRIBUTES: Final = (
    "TOKEN",
    "PRIVATE",
    "LOCAL",
    "MODIFIABLE",
    "COPYABLE",
    "DESTROYABLE",
)
"""What a key pair's public key object is asked (it has no SENSITIVE or EXTRACTABLE)."""

# Operations beyond what a key's usage needs that deserve a note.
_WRAPPING: Final = ("WRAP", "UNWRAP")


class Verdict(enum.StrEnum):
    """The custody verdict of one key version, best first."""

    GENERATED_NEVER_EXTRACTABLE = "GENERATED_IN_HSM_NEVER_EXTRACTABLE"
    """Generated in the token, never readable or exportable since."""
    NOT_EXTRACTABLE = "NOT_EXTRACTABLE"
    """In the token and not exportable now, but not since generation (imported material, or
    it was once extractable or not sensitive)."""
    EXTRACTABLE = "EXTRACTABLE"
    """The token would let the material out (plaintext or wrapped), or it is a session object."""
    UNVERIFIED = "UNVERIFIED"
    """The token's attributes could not be read (store not connected, attribute not reported,
    or the material is held outside any token this hsmkms reads)."""
    MISSING = "MISSING"
    """The token object is not there."""

    @property
    def rank(self) -> int:
        """0 for the best verdict; a key's summary is its worst version's."""
        return list(Verdict).index(self)


class Placement(enum.StrEnum):
    """Where a key version's material lives."""

    TOKEN_OBJECT = "TOKEN_OBJECT"  # noqa: S105 - a placement, not a secret
    """One or more objects on a PKCS#11 token (every version today)."""
    WRAPPED = "WRAPPED"
    """Generated in the token, wrapped there under the token's key encryption key (KEK) and
    stored wrapped in the database (``HSMKMS_KEY_PLACEMENT=wrapped``). The KEK's attributes
    are the evidence."""
    EXTERNAL = "EXTERNAL"
    """Held by an external key manager (XKS): no token attributes to read here."""


@dataclasses.dataclass(frozen=True)
class ObjectReading:
    """The attributes read from one token object (``None``: the token did not report it)."""

    role: str
    object_id: str
    object_class: str
    attributes: Mapping[str, bool | None]
    present: bool = True

    @property
    def permitted_operations(self) -> list[str]:
        """The capability attributes set to true, in :data:`OPERATION_ATTRIBUTES` order."""
        return [name for name in OPERATION_ATTRIBUTES if self.attributes.get(name) is True]

    @property
    def unreported(self) -> list[str]:
        """Attributes asked for that the token did not report."""
        return [name for name, value in self.attributes.items() if value is None]


@dataclasses.dataclass(frozen=True)
class Custody:
    """The verdict on one key version, in plain words, with the exact reasons."""

    verdict: Verdict
    text: str
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


_TEXT: Final = {
    Verdict.GENERATED_NEVER_EXTRACTABLE: "generated in the HSM, never extractable",
    Verdict.NOT_EXTRACTABLE: "in the HSM and not extractable now, but not since it was generated",
    Verdict.EXTRACTABLE: "can leave the HSM",
    Verdict.UNVERIFIED: "not verified",
    Verdict.MISSING: "key material missing from the token",
}


def judge(
    objects: Sequence[ObjectReading],
    *,
    origin: str,
    placement: Placement = Placement.TOKEN_OBJECT,
    expected_operations: frozenset[str] | None = None,
    unavailable: str | None = None,
    wrapped_local: bool | None = None,
) -> Custody:
    """The custody verdict of one key version from the readings of its token objects.

    ``objects``: every secret or private key object of the version (public key objects may be
    included; they are not judged). ``origin``: the key's Origin (``AWS_KMS``, ``EXTERNAL``,
    ...). ``expected_operations``: the capabilities its usage needs (a note names any other
    wrapping capability). ``unavailable``: why the objects could not be read at all (a key
    store that is not connected).

    With ``placement`` WRAPPED, ``objects`` is the reading of the KEK the material is wrapped
    under and ``wrapped_local`` whether the token reported the generated material as
    ``CKA_LOCAL``: a KEK that is itself generated in the token and never extractable gives
    :attr:`Verdict.NOT_EXTRACTABLE` ("wrapped under KEK <id>, LOCAL=true (generated in the
    HSM, stored wrapped)"): the material was extractable, wrapped, at its generation (only
    the SO can make a KEK trusted: ``docs/keystore.md``). A worse KEK verdict is the version's.
    """
    if placement is Placement.WRAPPED:
        return _judge_wrapped(
            objects, origin=origin, unavailable=unavailable, local=wrapped_local is not False
        )
    if placement is Placement.EXTERNAL:
        return Custody(
            Verdict.UNVERIFIED,
            "held by an external key manager",
            (
                "the material is held outside every token this hsmkms reads (external key "
                "store): its custody rests on the external key manager's own evidence",
            ),
        )
    if unavailable is not None:
        return Custody(Verdict.UNVERIFIED, _TEXT[Verdict.UNVERIFIED], (unavailable,))
    judged = [o for o in objects if o.object_class != "PUBLIC_KEY"]
    if not judged:
        return Custody(Verdict.UNVERIFIED, _TEXT[Verdict.UNVERIFIED], ("no token object to read",))
    missing = [o for o in judged if not o.present]
    if missing:
        return Custody(
            Verdict.MISSING,
            _TEXT[Verdict.MISSING],
            tuple(
                f"token object {o.object_id} ({o.object_class}) is not on the token: the "
                "material is gone and its ciphertexts cannot be decrypted (or, on SoftHSM2, "
                "this process's view of the token is stale: it sees an object another process "
                "has just created only after its next refresh)"
                for o in missing
            ),
        )
    unreported = sorted(
        {name for o in judged for name in CUSTODY_ATTRIBUTES[:7] if o.attributes.get(name) is None}
    )
    now: list[str] = []
    history: list[str] = []
    notes: list[str] = []
    for o in judged:
        a = o.attributes
        if a.get("TOKEN") is False:
            now.append(
                f"CKA_TOKEN false on {o.object_id}: a session object, gone when its session closes"
            )
        if a.get("SENSITIVE") is False:
            now.append(
                f"CKA_SENSITIVE false on {o.object_id}: the token would reveal its "
                "value in plaintext"
            )
        if a.get("EXTRACTABLE") is True:
            now.append(
                f"CKA_EXTRACTABLE true on {o.object_id}: the token would export it, "
                "wrapped under another key"
            )
        if a.get("PRIVATE") is False:
            history.append(
                f"CKA_PRIVATE false on {o.object_id}: a public object, usable by any session "
                "of the token without logging in"
            )
        if a.get("LOCAL") is False:
            imported = " (Origin EXTERNAL: imported key material)" if origin == "EXTERNAL" else ""
            history.append(
                f"CKA_LOCAL false on {o.object_id}: not generated on this token{imported}"
            )
        if a.get("ALWAYS_SENSITIVE") is False:
            history.append(
                f"CKA_ALWAYS_SENSITIVE false on {o.object_id}: it has not always been sensitive"
            )
        if a.get("NEVER_EXTRACTABLE") is False:
            history.append(
                f"CKA_NEVER_EXTRACTABLE false on {o.object_id}: it was extractable at some time"
            )
        if a.get("MODIFIABLE") is True:
            notes.append(
                f"CKA_MODIFIABLE true on {o.object_id}: its attributes can be changed "
                "(never back to extractable or non-sensitive)"
            )
        for name in _WRAPPING:
            if a.get(name) is True and (
                expected_operations is None or name not in expected_operations
            ):
                notes.append(f"CKA_{name} true on {o.object_id}: it can {name.lower()} other keys")
    if origin == "EXTERNAL" and not any("CKA_LOCAL false" in h for h in history) and not now:
        history.append("Origin EXTERNAL, yet the token reports the material as generated on it")
    if now:
        return Custody(
            Verdict.EXTRACTABLE, _TEXT[Verdict.EXTRACTABLE], tuple(now + history), tuple(notes)
        )
    if unreported:
        return Custody(
            Verdict.UNVERIFIED,
            _TEXT[Verdict.UNVERIFIED],
            tuple(f"the token does not report CKA_{name}" for name in unreported) + tuple(history),
            tuple(notes),
        )
    if history:
        text = _TEXT[Verdict.NOT_EXTRACTABLE]
        if any("CKA_LOCAL false" in h for h in history):
            text = "imported into the HSM; not extractable now"
        elif all("CKA_PRIVATE false" in h for h in history):
            text = "generated in the HSM and never extractable, but usable without logging in"
        return Custody(Verdict.NOT_EXTRACTABLE, text, tuple(history), tuple(notes))
    return Custody(
        Verdict.GENERATED_NEVER_EXTRACTABLE,
        _TEXT[Verdict.GENERATED_NEVER_EXTRACTABLE],
        (),
        tuple(notes),
    )


def _judge_wrapped(
    objects: Sequence[ObjectReading], *, origin: str, unavailable: str | None, local: bool
) -> Custody:
    kek = judge(
        objects, origin=origin, expected_operations=frozenset(_WRAPPING), unavailable=unavailable
    )
    kek_ids = [o.object_id for o in objects if o.object_class != "PUBLIC_KEY"]
    kek_id = kek_ids[0] if kek_ids else "?"
    if kek.verdict is not Verdict.GENERATED_NEVER_EXTRACTABLE:
        return Custody(
            kek.verdict,
            kek.text,
            tuple(f"the KEK {kek_id} the material is wrapped under: {r}" for r in kek.reasons),
            kek.notes,
        )
    flag = "true" if local else "false"
    origin_text = "generated in the HSM, stored wrapped" if local else "stored wrapped"
    return Custody(
        Verdict.NOT_EXTRACTABLE,
        f"wrapped under KEK {kek_id}, LOCAL={flag} ({origin_text})",
        (
            "generated in the token as a session object (CKA_SENSITIVE true, CKA_EXTRACTABLE "
            f"true), wrapped there under KEK {kek_id} (CKM_AES_KEY_WRAP_PAD) and destroyed: it "
            "exists outside the token only wrapped, and can be used only through a token "
            "holding the KEK (generated in the HSM, never extractable). CKA_WRAP_WITH_TRUSTED "
            "could not confine it to the KEK: only the SO can set CKA_TRUSTED",
        ),
        kek.notes,
    )
