"""``verify``: what an image says about itself — C2PA credentials, watermark, recipe, audit entry.

Every check reads the file as it is: the C2PA state (trusted, valid-untrusted, invalid, absent, with the
reason), the watermark (decoded, and whether it names the file's own recipe), the recipe, and the audit
entry recorded for exactly these bytes. The audit head the manifest names must still be in the log: a
log whose tail was cut is caught by any later output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from studio.audit import AuditEntry, AuditLog
from studio.config import StudioConfig
from studio.errors import ConfigError, StudioError
from studio.imageio import read_image, read_metadata
from studio.provenance.c2pa import Credentials, read_credentials
from studio.provenance.watermark import Watermarker, matches, recipe_prefix
from studio.recipe import Recipe

TRUSTED = ("trusted", "valid-untrusted")


@dataclass(frozen=True)
class Verification:
    """One image's provenance, check by check."""

    path: Path
    credentials: Credentials
    watermark: str  # what the watermark check found, in words
    watermarked: bool  # a mark that names this file's recipe
    recipe: Recipe | None
    audit: AuditEntry | None  # the output entry recorded for these exact bytes
    audit_problem: str | None = None  # e.g. the manifest's audit head is not in the log

    @property
    def signed(self) -> bool:
        """Valid Content Credentials (trusted or not)."""
        return self.credentials.state in TRUSTED

    @property
    def ok(self) -> bool:
        """Signed, watermarked and audited, with an intact audit log."""
        return self.signed and self.watermarked and self.audit is not None and self.audit_problem is None


def verify_image(path: Path, config: StudioConfig, log: AuditLog | None = None) -> Verification:
    """Check ``path`` against its credentials, watermark, recipe and the audit log."""
    path = Path(path)
    data = path.read_bytes()
    credentials = read_credentials(data, _trust_anchors(config))
    recipe = _recipe(path, config)
    watermark, watermarked = _watermark(path, config, recipe)
    log = log or AuditLog(config.audit.log)
    digest = hashlib.sha256(data).hexdigest()
    entry = next((e for e in log.entries() if e.event == "output" and e.data.get("sha256") == digest), None)
    problem = None
    head = ((credentials.manifest or {}).get("recipe") or {}).get("audit_head")
    if head and not log.contains(head):
        problem = (
            f"the audit log {log.path} lacks entry {head[:12]}… that this image's credentials name "
            "(the log was cut, replaced or is another machine's)"
        )
    return Verification(path, credentials, watermark, watermarked, recipe, entry, problem)


def _trust_anchors(config: StudioConfig) -> bytes | None:
    path = config.provenance.trust_anchors
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"provenance.trust_anchors {path} cannot be read ({err.strerror}).",
            fix="point it at a PEM file of root certificates, or unset it.",
        ) from err


def _recipe(path: Path, config: StudioConfig) -> Recipe | None:
    meta = read_metadata(path, max_pixels=config.images.max_pixels)
    try:
        return Recipe.from_dict(meta.recipe, str(path)) if meta.recipe else None
    except StudioError:
        return None


def _watermark(path: Path, config: StudioConfig, recipe: Recipe | None) -> tuple[str, bool]:
    method = config.provenance.watermark_method
    payload = Watermarker.from_config(config).decode(read_image(path, max_pixels=config.images.max_pixels))
    if payload is None:
        return f"no {method} watermark found", False
    if recipe is None:
        return f"{method} watermark of recipe {recipe_prefix(payload)}… (the file carries no recipe)", False
    if matches(payload, recipe.id):
        return f"{method} watermark of this file's recipe ({recipe_prefix(payload)}…)", True
    return f"{method} watermark of another recipe ({recipe_prefix(payload)}…, file: {recipe.id[:6]}…)", False
