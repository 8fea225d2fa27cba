"""The identity library: enrolled people as validated safetensors files, each with its consent record.

One file per person, ``<folder>/<name>.safetensors``: tensors ``embedding`` (512,) float32 (the L2-normed
mean), ``photo_embeddings`` (K, 512) float32 (one L2-normed row per enrolment photo) and, when the
recognizer has a spatial map before its embedding head, ``face_tokens`` (K, T, C) float32 (the face
adapter's tokens of each photo; files without it load with ``face_tokens=None``); string metadata
``format``, ``version``, ``name``, ``consent``, ``recognizer_sha256``, ``source_sha256`` (a JSON list, one
per row), ``created`` and ``revoked`` (ISO-8601 UTC, "" when not revoked). Files are written atomically and
validated on every load; pickles (and every other format) are refused, never opened.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from studio.adapter.tokens import FaceTokenEncoder
from studio.audit import AuditLog
from studio.config import DetectConfig, EnrolConfig, RefineConfig, StudioConfig
from studio.errors import IdentityError, ImageError
from studio.faces.consent import ConsentTerms, check_use, consent_fields
from studio.faces.detect import (
    align_crops,
    crop_tokens,
    detect_faces,
    embed_crops,
)
from studio.faces.identity_file import (
    ADD_HINT,
    MAX_FILE_BYTES,
    bad_identity_file,
    parse_identity_file,
    serialize_identity,
)
from studio.files import file_stamp, sha256_file, write_bytes_atomic
from studio.imageio import read_image
from studio.types import Identity, ImageBGR

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
NAME_MAX = 64
NAME_RULE = (
    f"1 to {NAME_MAX} characters: letters, digits, '_', '.' or '-', starting with a letter or digit, "
    "not ending in '.', not containing '..', not ending in '.safetensors', and not a device name "
    "reserved on Windows (CON, PRN, AUX, NUL, COM1-COM9, LPT1-LPT9, also with an extension)"
)

_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]")
# Windows opens these devices instead of files, whatever the extension ("nul.anna" is NUL): a library
# folder copied or synced to Windows could neither hold nor read such a file.
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{d}" for d in "123456789"), *(f"LPT{d}" for d in "123456789")}
)
_FOREIGN_SUFFIXES = (".pkl", ".pickle", ".npy", ".npz", ".pt", ".pth", ".bin", ".json")
_FOLDER_MODE = 0o700  # embeddings are biometric data: the library folder is private to its owner
_FILE_MODE = 0o600


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolReport:
    """What an enrolment did: the saved identity, the photos used, those rejected and why, warnings."""

    identity: Identity
    used: tuple[Path, ...]  # in the order of identity.photo_embeddings' rows
    rejected: tuple[tuple[Path, str], ...]  # (photo, reason)
    warnings: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class _Accepted:
    """An enrolment photo that passed the per-photo gates."""

    path: Path
    sha256: str
    crop: ImageBGR  # 112x112x3 uint8 BGR, ArcFace-aligned


# --- names ------------------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid identity name, else raise IdentityError saying why, with the rule."""
    why = name_problem(name)
    if why is None:
        return name
    raise IdentityError(f"Identity name {name!r} is not allowed: {why}.", fix=f"use a name of {NAME_RULE}.")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an identity file on every platform, or None when it can."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not text"
    if not name:
        return "it is empty"
    if len(name) > NAME_MAX:
        return f"it has {len(name)} characters"
    if name.endswith((".", " ")):
        return "it ends in a dot or a space, which Windows drops from file names"
    device = name.split(".", 1)[0].upper()
    if device in _WINDOWS_DEVICES:
        return f"{device} is a device name reserved on Windows, with or without an extension"
    bad = sorted({c for c in name if not _NAME_CHARS.fullmatch(c)})
    if bad:
        return f"it contains {', '.join(map(repr, bad))}"
    if not name[0].isalnum():
        return f"it starts with {name[0]!r}"
    if ".." in name:
        return "it contains '..'"
    if name.lower().endswith(SUFFIX):
        return f"it ends in {SUFFIX!r}"
    return None


# --- the library ------------------------------------------------------------------------------


class IdentityLibrary:
    """A folder of enrolled identities: enrol, load, get, list, revoke, remove."""

    def __init__(self, folder: Path, audit: AuditLog | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.audit = audit  # enrolments, revocations and removals are appended to it
        # name -> ((folder stamp, file stamp), identity): a file read again only when it or the folder changed
        self._loaded: dict[str, tuple[tuple[tuple[int, ...], tuple[int, ...]], Identity]] = {}

    @classmethod
    def for_config(cls, config: StudioConfig) -> IdentityLibrary:
        """The library ``refine.identities_dir`` names, auditing to ``audit.log``."""
        return cls(config.refine.identities_dir, AuditLog(config.audit.log))

    def path_for(self, name: str) -> Path:
        """The file that holds identity ``name``."""
        return self.folder / f"{validate_name(name)}{SUFFIX}"

    def enrol(
        self,
        name: str,
        photos: Sequence[Path],
        *,
        consent: str | ConsentTerms,
        detector: Any,
        recognizer: Any,
        recognizer_sha256: str,
        settings: RefineConfig,  # its detect and enrol sections
        max_pixels: int,
        replace: bool = False,
        token_encoder: FaceTokenEncoder | None = None,
    ) -> EnrolReport:
        """Enrol ``name`` from photos of one person, with its consent record; save it atomically."""
        # 1. check inputs before any model runs
        path = self._check_enrol_target(name, replace)
        terms = consent_fields(consent)
        if not isinstance(recognizer_sha256, str) or not recognizer_sha256:
            raise IdentityError("No recognizer checksum given.", fix="pass the recognizer file's sha256.")
        photos = [photos] if isinstance(photos, str | Path) else list(photos)
        if not photos:
            raise IdentityError(
                f"No photos given to enrol {name!r}.", fix="pass 1 or more photos (3-10 is best)."
            )
        # 2. per-photo gates: readable, one face, large, confident and sharp enough
        accepted, rejected, warnings = _examine_photos(photos, detector, settings, max_pixels)
        # 3. embed every accepted face in one batch (and take its face tokens), drop photos unlike the others
        crops = [a.crop for a in accepted]
        embeddings = embed_crops(crops, recognizer)  # (K, 512) float32
        tokens = crop_tokens(crops, recognizer, embeddings, token_encoder)  # (K, T, C) float32 or None
        outliers = _reject_outliers(embeddings, settings.enrol.outlier)  # row -> reason
        rejected += [(accepted[i].path, reason) for i, reason in sorted(outliers.items())]
        kept = [i for i in range(len(accepted)) if i not in outliers]
        if not kept:
            raise _nothing_left(name, rejected)
        # 4. the identity: mean of the kept embeddings, renormalised; saved atomically
        sources = [accepted[i].sha256 for i in kept]
        kept_tokens = None if tokens is None else tokens[kept]
        identity = _build_identity(name, embeddings[kept], sources, terms, recognizer_sha256, kept_tokens)
        identity = self._save(path, identity)
        self._audit("enrol", identity, consent=terms["consent"], scope=list(identity.scope),
                    expires=identity.expires, evidence_sha256=identity.evidence_sha256,
                    granted_by=identity.granted_by, photos=list(sources))  # fmt: skip
        used = tuple(accepted[i].path for i in kept)
        logger.info("enrolled %r from %d photo(s) (%d rejected) in %s", name, len(used), len(rejected), path)
        return EnrolReport(identity, used, tuple(rejected), tuple(warnings))

    def load(self, name: str) -> Identity:
        """Read and validate identity ``name`` (revoked ones included); a file read before is read again
        only when it or its folder changed (a revocation, a re-enrolment, a new file beside it)."""
        path = self.path_for(name)
        stamp = (file_stamp(self.folder), file_stamp(path))
        kept = self._loaded.get(name)
        if kept is not None and kept[0] == stamp and stamp[1]:
            return kept[1]
        identity = self._read(name, path)
        self._loaded[name] = (stamp, identity)
        return identity

    def _read(self, name: str, path: Path) -> Identity:
        self._refuse_foreign_files(name)
        if not path.is_file():
            raise IdentityError(
                f"No identity {name!r} in the library {self.folder} (expected {path.name}).",
                fix=f"{ADD_HINT}, or check the name with `studio identity list`.",
            )
        if path.stat().st_size > MAX_FILE_BYTES:
            raise bad_identity_file(path, f"{path.stat().st_size} bytes, far more than an identity needs")
        data = path.read_bytes()  # one read: the digest recipes record is of exactly these bytes
        return replace(parse_identity_file(path, name, data), file_sha256=hashlib.sha256(data).hexdigest())

    def get(self, name: str, *, recognizer_sha256: str | None = None, purpose: str | None = None) -> Identity:
        """Identity ``name`` for use: refused if revoked, out of its consent's scope for ``purpose``,
        expired, or made by another recognizer than the given one."""
        identity = self.load(name)
        if identity.revoked:
            raise IdentityError(
                f"Identity {name!r} was revoked on {identity.revoked}; its consent no longer allows use.",
                fix="pick another identity; only a new consent record makes this person usable again "
                "(re-enrol with `studio identity add NAME PHOTO... --consent TEXT --replace`).",
            )
        if recognizer_sha256 is not None and identity.recognizer_sha256 != recognizer_sha256:
            raise IdentityError(
                f"Identity {name!r} was enrolled with recognizer {identity.recognizer_sha256[:12]}…, but "
                f"the studio now uses {recognizer_sha256[:12]}…; their embeddings do not match.",
                fix=f"re-enrol with the current recognizer: {ADD_HINT} --replace.",
            )
        check_use(identity, purpose)
        return identity

    def list(self) -> list[Identity]:
        """Every readable identity, sorted by name, revoked ones included (``revoked`` set)."""
        found = []
        for path in self._files():
            name = path.name[: -len(SUFFIX)]
            try:
                found.append(self.load(name))
            except IdentityError as err:
                logger.warning("skipping %s: %s", path, err)
        return found

    def remove(self, name: str) -> None:
        """Delete identity ``name``'s file."""
        path = self.path_for(name)
        if not path.is_file():
            raise IdentityError(
                f"No identity {name!r} in the library {self.folder}.",
                fix="check the name with `studio identity list`.",
            )
        removed = self.load(name)
        path.unlink()
        self._audit("remove", removed)
        logger.info("removed identity %r (%s)", name, path)

    def revoke(self, name: str) -> Identity:
        """Mark identity ``name`` revoked now (atomic rewrite); it stays listed but cannot be used."""
        identity = self.load(name)
        if identity.revoked:
            logger.info("identity %r was already revoked on %s", name, identity.revoked)
            return identity
        revoked = self._save(self.path_for(name), replace(identity, revoked=_now()))
        self._audit("revoke", revoked, revoked=revoked.revoked)
        logger.info("revoked identity %r on %s", name, revoked.revoked)
        return revoked

    # --- private helpers ---

    def _check_enrol_target(self, name: str, overwrite: bool) -> Path:
        """The file to write for a new identity; refuses existing names unless replacing."""
        path = self.path_for(name)
        if path.exists() and not overwrite:
            raise IdentityError(
                f"Identity {name!r} already exists in {self.folder}.",
                fix="choose another name, or pass --replace to re-enrol it.",
            )
        # case-insensitive file systems (macOS, Windows) would merge "Anna" and "anna"
        clash = [p.name for p in self._files() if p.name.lower() == path.name.lower() and p != path]
        if clash:
            raise IdentityError(
                f"Identity {name!r} differs only in case from {clash[0]}.",
                fix="use the existing name, or a clearly different one.",
            )
        return path

    def _files(self) -> list[Path]:
        """The library's identity files, sorted; none if the folder does not exist yet."""
        return sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []

    def _refuse_foreign_files(self, name: str) -> None:
        """Raise if a non-safetensors file claims this name: pickles are never loaded, nor guessed at."""
        if not self.folder.is_dir():
            return
        wanted = {f"{name}{suffix}".lower() for suffix in _FOREIGN_SUFFIXES}
        for path in sorted(self.folder.iterdir()):
            if path.name.lower() in wanted:
                raise IdentityError(
                    f"Refusing {path}: identities are safetensors only; pickles are never loaded.",
                    fix=f"delete or move {path.name} out of {self.folder}, then {ADD_HINT}.",
                )

    def _save(self, path: Path, identity: Identity) -> Identity:
        """Write ``identity`` to ``path`` atomically, 0600 in a 0700 folder (biometric data); returns it
        with the new file's sha256."""
        data = serialize_identity(identity)
        self.folder.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
        try:
            os.chmod(self.folder, _FOLDER_MODE)  # a folder made before this rule, or by a looser umask
            write_bytes_atomic(path, data, mode=_FILE_MODE)
        except OSError as err:
            raise IdentityError(
                f"Could not write {path}: {err}; the previous file (if any) is unchanged.",
                fix="check free disk space and write permission on the folder.",
            ) from err
        return replace(identity, file_sha256=hashlib.sha256(data).hexdigest())

    def _audit(self, event: str, identity: Identity, **data: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, identities={identity.name: identity.file_sha256}, **data)


# --- enrolment steps --------------------------------------------------------------------------


def _examine_photos(
    photos: Sequence[Path], detector: Any, settings: RefineConfig, max_pixels: int
) -> tuple[list[_Accepted], list[tuple[Path, str]], list[str]]:
    """Run the per-photo gates: (accepted photos, (photo, reason) rejections, warnings)."""
    detect = replace(settings.detect, min_face=1)  # small faces get a reason, not silence
    accepted: list[_Accepted] = []
    rejected: list[tuple[Path, str]] = []
    warnings: list[str] = []
    seen: dict[str, Path] = {}
    for photo in map(Path, photos):
        try:
            image = read_image(photo, max_pixels=max_pixels)
            digest = sha256_file(photo)
        except (ImageError, OSError) as err:
            rejected.append((photo, f"cannot be read: {err}"))
            continue
        if digest in seen:
            rejected.append((photo, f"same file as {seen[digest]}"))
            continue
        seen[digest] = photo
        crop, reason, warning = _examine_face(image, detector, detect, settings.enrol)
        if warning:
            warnings.append(f"{photo}: {warning}")
            logger.warning("%s: %s", photo, warning)
        if reason or crop is None:
            rejected.append((photo, reason or "no face"))
        else:
            accepted.append(_Accepted(photo, digest, crop))
    return accepted, rejected, warnings


def _examine_face(
    image: ImageBGR, detector: Any, detect: DetectConfig, settings: EnrolConfig
) -> tuple[ImageBGR | None, str | None, str | None]:
    """(aligned crop, rejection reason, warning) for one photo's face."""
    faces = detect_faces(image, detector, detect)
    if not faces:
        return None, f"no face found (detector threshold {detect.threshold:g})", None
    face = max(faces, key=lambda f: f.area)  # the first of equal areas, in left-to-right order
    warning = None
    if len(faces) > 1:
        warning = f"{len(faces)} faces found; using the largest ({face.size:.0f} px), expected exactly one"
    if face.size < settings.min_face:
        reason = f"face too small: {face.size:.0f} px < refine.enrol.min_face {settings.min_face} px"
        return None, reason, warning
    if face.score < settings.min_score:
        return None, f"face score {face.score:.2f} < refine.enrol.min_score {settings.min_score:g}", warning
    crop = align_crops(image, [face])[0]  # 112x112x3 uint8 BGR
    sharpness = _sharpness(crop)
    if sharpness < settings.min_sharpness:
        limit = f"refine.enrol.min_sharpness {settings.min_sharpness:g}"
        reason = f"too blurry: sharpness {sharpness:.1f} < {limit}"
        return None, reason, warning
    return crop, None, warning


def _sharpness(crop: ImageBGR) -> float:
    """Variance of the Laplacian of the grey crop: low means blurred."""
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)  # HxW uint8
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _reject_outliers(embeddings: npt.NDArray[np.float32], threshold: float) -> dict[int, str]:
    """Rows to drop, with reasons: with 3 or more rows, each row unlike the normalised mean of the others.

    All rows are judged against the same full set, so photos of several different people are all dropped
    (and enrolment fails) rather than some of them being averaged into one identity.
    """
    if len(embeddings) < 3:
        return {}
    rows = embeddings.astype(np.float64)  # (K, 512)
    others = rows.sum(axis=0, keepdims=True) - rows  # (K, 512): sum of every other row
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
    cosines = np.einsum("kd,kd->k", rows, others)  # (K,) cosine of each row to the others' mean
    return {
        int(i): f"outlier: cosine {cosines[i]:.2f} to the other photos' mean "
        f"< refine.enrol.outlier {threshold:g} "
        "(another person, or a poor photo)"
        for i in np.flatnonzero(cosines < threshold)
    }


def _nothing_left(name: str, rejected: Sequence[tuple[Path, str]]) -> IdentityError:
    """The error for an enrolment where every photo was rejected, listing each photo's reason."""
    reasons = "; ".join(f"{path}: {reason}" for path, reason in rejected)
    return IdentityError(
        f"No usable photo to enrol {name!r}: {reasons}.",
        fix="use sharp, well-lit photos showing one face of at least refine.enrol.min_face px.",
    )


def _build_identity(
    name: str,
    embeddings: npt.NDArray[np.float32],
    sources: Sequence[str],
    terms: dict[str, Any],
    recognizer: str,
    tokens: npt.NDArray[np.float32] | None = None,
) -> Identity:
    """The Identity record: the kept rows, their renormalised mean and their face tokens (if any)."""
    mean = embeddings.astype(np.float64).mean(axis=0)  # (512,)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise IdentityError(
            f"The photos of {name!r} cancel out (mean embedding is zero).", fix="use photos of one person."
        )
    return Identity(
        name=name,
        embedding=(mean / norm).astype(np.float32),  # (512,) float32, L2-normed
        photo_embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),  # (K, 512) float32
        recognizer_sha256=recognizer,
        source_sha256=tuple(sources),
        created=_now(),
        face_tokens=tokens,  # (K, T, C) float32 face-adapter tokens, or None
        **terms,  # consent, scope, expires, evidence_sha256, granted_by
    )


def _now() -> str:
    """The current time, ISO-8601 UTC to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")
