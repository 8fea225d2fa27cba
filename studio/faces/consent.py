"""Consent terms: what a person agreed to (scope, expiry, evidence, who granted it), checked on every use.

An identity is used only for a purpose its consent's scope names (``consent.purpose`` in the config: e.g.
ads, concept-art, internal) and only until its expiry date (the last day of allowed use, UTC). Identities
enrolled before scopes existed (identity file version 1) carry no scope: any purpose, no expiry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from studio.errors import IdentityError
from studio.files import sha256_file
from studio.types import Identity

DEFAULT_SCOPE = ("internal",)
_PURPOSE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_RE_ENROL = (
    "record a new consent: re-enrol with `studio identity add NAME PHOTO... --consent ... --scope ... "
)
_RE_ENROL += "--replace`"


@dataclass(frozen=True)
class ConsentTerms:
    """A consent as given at enrolment."""

    record: str  # where the consent is kept, e.g. "model release #123, 2026-11-01"
    scope: tuple[str, ...] = DEFAULT_SCOPE  # purposes it allows
    expires: str | None = None  # ISO date, the last day of allowed use
    evidence: Path | None = None  # the signed release document (only its sha256 is kept)
    granted_by: str = ""  # who granted or recorded it


def consent_fields(terms: str | ConsentTerms) -> dict[str, Any]:
    """The Identity fields of ``terms`` (a plain string is a record with the default scope), checked."""
    if not isinstance(terms, ConsentTerms):
        terms = ConsentTerms(terms)  # type: ignore[arg-type]  # a record alone (checked just below)
    record = terms.record.strip() if isinstance(terms.record, str) else ""
    if not record:
        raise IdentityError(
            f"Consent record {terms.record!r} received; enrolment needs the person's consent on record.",
            fix='pass --consent with where the consent is kept, e.g. "model release #123, 2026-01-05".',
        )
    scope = tuple(dict.fromkeys(s.strip().lower() for s in terms.scope if s.strip()))
    bad = [s for s in scope if not _PURPOSE.match(s)]
    if not scope or bad:
        raise IdentityError(
            f"Consent scope {list(terms.scope)!r} received.",
            fix="name one or more purposes of lowercase letters, digits, - or _, e.g. --scope ads,internal.",
        )
    expires = None if terms.expires in (None, "") else _date(str(terms.expires)).isoformat()
    evidence = ""
    if terms.evidence is not None:
        path = Path(terms.evidence)
        if not path.is_file():
            raise IdentityError(f"Consent evidence {path} does not exist.", fix="pass the release document.")
        evidence = sha256_file(path)
    return {
        "consent": record,
        "scope": scope,
        "expires": expires,
        "evidence_sha256": evidence,
        "granted_by": terms.granted_by.strip(),
    }


def check_use(identity: Identity, purpose: str | None, today: date | None = None) -> None:
    """Refuse (IdentityError, saying which) an identity whose consent is out of scope or expired."""
    if purpose is not None and identity.scope and purpose not in identity.scope:
        raise IdentityError(
            f"Identity {identity.name!r} may be used for {', '.join(identity.scope)} (its consent's scope), "
            f"not for {purpose!r} (consent.purpose).",
            fix=f"set consent.purpose to a purpose in that scope, pick another identity, or {_RE_ENROL}.",
        )
    if identity.expires is not None and (today or datetime.now(UTC).date()) > _date(identity.expires):
        raise IdentityError(
            f"Identity {identity.name!r}'s consent expired on {identity.expires}.",
            fix=f"pick another identity, or {_RE_ENROL} with a new --expires.",
        )


def scope_list(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"ads, concept-art"`` → ("ads", "concept-art")."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(s.strip() for s in items if s.strip())


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as err:
        raise IdentityError(f"Consent expiry {text!r} is not a date.", fix="use YYYY-MM-DD.") from err
