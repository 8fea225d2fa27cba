"""Consent terms (scope, expiry, evidence, grantor) and the audit of every enrolment, revocation, removal."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from studio.audit import AuditLog
from studio.errors import IdentityError
from studio.faces.consent import ConsentTerms, check_use, consent_fields
from studio.faces.identity import IdentityLibrary
from studio.files import sha256_file
from studio.types import Identity


def _identity(**terms: object) -> Identity:
    unit = np.ones(512, np.float32) / np.sqrt(512)
    base = Identity(
        "anna", unit, unit[None], "release #7", "r" * 64, ("s" * 64,), "2026-01-05T10:00:00+00:00"
    )
    return replace(base, **terms)  # type: ignore[arg-type]


def test_use_outside_the_scope_or_after_expiry_is_refused_saying_which() -> None:
    scoped = _identity(scope=("ads", "internal"), expires="2026-12-31")
    check_use(scoped, "ads", today=date(2026, 12, 31))  # the last day is allowed
    with pytest.raises(IdentityError, match=r"may be used for ads, internal .* not for 'concept-art'"):
        check_use(scoped, "concept-art", today=date(2026, 6, 1))
    with pytest.raises(IdentityError, match="consent expired on 2026-12-31"):
        check_use(scoped, "ads", today=date(2027, 1, 1))
    check_use(_identity(), "anything")  # a version-1 identity: no scope, no expiry


def test_terms_are_checked_and_evidence_kept_as_a_hash(tmp_path: Path) -> None:
    release = tmp_path / "release.pdf"
    release.write_bytes(b"%PDF signed release")
    fields = consent_fields(
        ConsentTerms(" release #9 ", ("Ads", "ads", "internal"), "2027-03-01", release, "legal")
    )
    assert fields == {
        "consent": "release #9", "scope": ("ads", "internal"), "expires": "2027-03-01",
        "evidence_sha256": sha256_file(release), "granted_by": "legal",
    }  # fmt: skip
    for bad, problem in [
        (ConsentTerms(" "), "consent on record"),
        (ConsentTerms("r", ()), "scope"),
        (ConsentTerms("r", ("ads!",)), "scope"),
        (ConsentTerms("r", expires="next year"), "not a date"),
        (ConsentTerms("r", evidence=tmp_path / "missing.pdf"), "does not exist"),
    ]:
        with pytest.raises(IdentityError, match=problem):
            consent_fields(bad)


def test_revoke_and_remove_are_audited_with_hashes_only(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    library = IdentityLibrary(tmp_path / "ids", log)
    saved = library._save(library.path_for("anna"), _identity(scope=("ads",)))
    library.folder.chmod(0o755)  # a folder made by a looser umask is tightened on the next write
    revoked = library.revoke("anna")
    assert library.folder.stat().st_mode & 0o777 == 0o700
    library.remove("anna")
    events = [(e.event, e.identities) for e in log.entries()]
    assert events == [("revoke", {"anna": revoked.file_sha256}), ("remove", {"anna": revoked.file_sha256})]
    assert saved.file_sha256 != revoked.file_sha256 and log.verify().ok
    text = log.path.read_text()
    assert "embedding" not in text and "0.04419" not in text  # never biometrics
