"""Multi-person templates: a master picture whose faces are numbered slots, and casts mapped onto them.

``studio template add duo master.png`` stores the master (its bytes copied into the library) and one slot
per face found in it (box, landmarks, embedding). ``--template duo --cast 0=anna,1=kenji`` then puts anna
on slot 0 and kenji on slot 1 of every picture made from the master: a picture's faces are matched to the
slots by position (box centres relative to the picture, so a resized picture still matches) and by
embedding, one to one, never by detection order. A slot with no face near it swaps nothing at all.

Library layout: ``<folder>/<name>.safetensors`` (see :mod:`studio.faces.template_file`) and the master
``<folder>/<name>.master.<png|jpg|jpeg|webp>``; 0600 files in a 0700 folder (the embeddings are biometric).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from studio.config import StudioConfig
from studio.errors import TemplateError
from studio.faces.identity import NAME_RULE, name_problem
from studio.faces.select import Assignment, IdentitySpec
from studio.faces.template_file import (
    ADD_HINT,
    EMBEDDING_SIZE,
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    MAX_SLOTS,
    Slot,
    Template,
    bad_template_file,
    master_name,
    parse_template_file,
    serialize_template,
)
from studio.files import file_stamp, sha256_file, write_bytes_atomic
from studio.types import Face

__all__ = [
    "Slot",
    "Template",
    "TemplateLibrary",
    "assign_template",
    "check_template_cast",
    "check_template_recognizer",
    "match_slots",
    "validate_template_name",
]

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
MAX_SLOT_DISTANCE = 0.25  # a face whose centre is further from a slot's (in picture widths/heights) is not it
EMBEDDING_WEIGHT = 0.5  # cost of cosine 0 (a stranger) vs 1 (the slot's own face): half the distance limit
_UNREACHABLE = 1e6  # a pair beyond the distance limit: more than every reachable pair's cost together
_FOLDER_MODE = 0o700  # slot embeddings are biometric data, as identities are
_FILE_MODE = 0o600
_CAST_FIX = "map every slot once: --cast 0=anna,1=kenji (slots: `studio template show NAME`)"


# --- names ------------------------------------------------------------------------------------


def validate_template_name(name: str) -> str:
    """Return ``name`` if it can name a template (the identity name rules), else raise TemplateError."""
    why = name_problem(name)
    if why is None:
        return name
    raise TemplateError(f"Template name {name!r} is not allowed: {why}.", fix=f"use a name of {NAME_RULE}.")


# --- the library ------------------------------------------------------------------------------


class TemplateLibrary:
    """A folder of templates: add, load, list, remove."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).expanduser()
        # name -> (stamps of folder, file and master; template): read and hashed again only after a change
        self._loaded: dict[str, tuple[tuple[tuple[int, ...], ...], Template]] = {}

    @classmethod
    def for_config(cls, config: StudioConfig) -> TemplateLibrary:
        """The library ``refine.templates_dir`` names."""
        return cls(config.refine.templates_dir)

    def path_for(self, name: str) -> Path:
        """The file that holds template ``name``."""
        return self.folder / f"{validate_template_name(name)}{SUFFIX}"

    def image_path(self, template: Template) -> Path:
        """The master picture of ``template`` in the library."""
        return self.folder / template.image

    def add(
        self,
        name: str,
        image: Path,
        faces: Sequence[Face],
        embeddings: npt.NDArray[np.float32],  # (N, 512) L2-normed, one row per face
        *,
        size: tuple[int, int],  # the master's width, height in px (upright, as read)
        recognizer_sha256: str,
        replace: bool = False,
    ) -> Template:
        """Store ``image`` as template ``name`` with one slot per face (in the faces' order); atomically."""
        # 1. check inputs before anything is written
        path, image = self._check_target(name, replace), Path(image)
        slots = _slots_of(image, faces, embeddings)
        # 2. the record, validated exactly as a load would before anything is written
        data = image.read_bytes()
        master = master_name(name, image.suffix)
        template = Template(
            name=name,
            image=master,
            image_sha256=hashlib.sha256(data).hexdigest(),
            width=size[0],
            height=size[1],
            slots=slots,
            recognizer_sha256=recognizer_sha256,
            created=_now(),
        )
        record = serialize_template(template)
        parse_template_file(path, name, record)
        # 3. the master first, then the template file: a template file never names a master not yet there
        self._write(self.folder / master, data)
        self._write(path, record)
        for other in {master_name(name, s) for s in IMAGE_SUFFIXES} - {master}:  # a replaced one's old format
            (self.folder / other).unlink(missing_ok=True)
        logger.info("added template %r with %d slot(s) in %s", name, len(slots), path)
        return dataclasses.replace(template, file_sha256=hashlib.sha256(record).hexdigest())

    def load(self, name: str) -> Template:
        """Read and validate template ``name``, and check its master picture is there, unchanged; a template
        read before is read (its master hashed) again only when the folder, the file or the master changed."""
        path = self.path_for(name)
        kept = self._loaded.get(name)
        if kept is not None and kept[0] == self._stamps(path, kept[1]):
            return kept[1]
        template = self._read(name, path)
        self._loaded[name] = (self._stamps(path, template), template)
        return template

    def _stamps(self, path: Path, template: Template) -> tuple[tuple[int, ...], ...]:
        return file_stamp(self.folder), file_stamp(path), file_stamp(self.image_path(template))

    def _read(self, name: str, path: Path) -> Template:
        if not path.is_file():
            raise TemplateError(
                f"No template {name!r} in the library {self.folder}.", fix=self._unknown_fix(name)
            )
        if path.stat().st_size > MAX_FILE_BYTES:
            raise bad_template_file(path, f"{path.stat().st_size} bytes, far more than a template needs")
        data = path.read_bytes()  # one read: the digest recipes record is of exactly these bytes
        template = parse_template_file(path, name, data)
        master = self.image_path(template)
        if not master.is_file():
            raise bad_template_file(path, f"its master picture {master} is missing")
        if sha256_file(master) != template.image_sha256:
            raise bad_template_file(path, f"its master picture {master} changed since it was added")
        return dataclasses.replace(template, file_sha256=hashlib.sha256(data).hexdigest())

    def list(self) -> list[Template]:
        """Every readable template, sorted by name (unreadable ones are logged and skipped)."""
        found = []
        for path in self._files():
            try:
                found.append(self.load(path.name[: -len(SUFFIX)]))
            except TemplateError as err:
                logger.warning("skipping %s: %s", path, err)
        return found

    def remove(self, name: str) -> None:
        """Delete template ``name``: its file, then its master picture."""
        path = self.path_for(name)
        if not path.is_file():
            raise TemplateError(
                f"No template {name!r} in the library {self.folder}.", fix=self._unknown_fix(name)
            )
        path.unlink()
        for suffix in IMAGE_SUFFIXES:
            (self.folder / master_name(name, suffix)).unlink(missing_ok=True)
        logger.info("removed template %r (%s)", name, path)

    # --- private helpers ---

    def _check_target(self, name: str, overwrite: bool) -> Path:
        """The file to write for a new template; refuses existing names unless replacing."""
        path = self.path_for(name)
        if path.exists() and not overwrite:
            raise TemplateError(
                f"Template {name!r} already exists in {self.folder}.",
                fix="choose another name, or pass --replace to replace it.",
            )
        # case-insensitive file systems (macOS, Windows) would merge "Duo" and "duo"
        clash = [p.name for p in self._files() if p.name.lower() == path.name.lower() and p != path]
        if clash:
            raise TemplateError(
                f"Template {name!r} differs only in case from {clash[0]}.",
                fix="use the existing name, or a clearly different one.",
            )
        return path

    def _files(self) -> list[Path]:
        """The library's template files, sorted; none if the folder does not exist yet."""
        return sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []

    def _unknown_fix(self, name: str) -> str:
        """The fix for an unknown name: the closest known one, or how to add it."""
        known = [p.name[: -len(SUFFIX)] for p in self._files()]
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            return f"did you mean {close[0]!r}? (see `studio template list`)"
        return "add it with `studio template add NAME IMAGE`, or check the name with `studio template list`."

    def _write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically, 0600 in a 0700 folder."""
        try:
            self.folder.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
            os.chmod(self.folder, _FOLDER_MODE)  # a folder made before this rule, or by a looser umask
            write_bytes_atomic(path, data, mode=_FILE_MODE)
        except OSError as err:
            raise TemplateError(
                f"Could not write {path}: {err}; the previous file (if any) is unchanged.",
                fix="check free disk space and write permission on the folder.",
            ) from err


# --- casts on templates -----------------------------------------------------------------------


def check_template_cast(template: Template, spec: IdentitySpec) -> None:
    """Refuse (TemplateError) a cast that does not map every slot of ``template`` exactly once."""
    count, name = len(template.slots), template.name
    if spec.name is not None or not spec.slots:
        raise TemplateError(
            f"Template {name!r} has {_slots(count)}; the cast {spec.name!r} is a single name, "
            "not slot=name pairs.",
            fix=_CAST_FIX + ".",
        )
    text = ",".join(f"{i}={who}" for i, who in spec.slots)
    if len(spec.slots) != count:
        raise TemplateError(
            f"Template {name!r} has {_slots(count)} but the cast maps {len(spec.slots)}: {text}.",
            fix=_CAST_FIX + ".",
        )
    unknown = [i for i, _ in spec.slots if i >= count]
    if unknown:
        raise TemplateError(
            f"Template {name!r} has slots 0-{count - 1}; the cast {text} names slot {unknown[0]}.",
            fix=_CAST_FIX + ".",
        )


def check_template_recognizer(template: Template, recognizer_sha256: str) -> None:
    """Refuse a template whose slot embeddings another recognizer made: they would not compare."""
    if template.recognizer_sha256 != recognizer_sha256:
        raise TemplateError(
            f"Template {template.name!r} was added with recognizer {template.recognizer_sha256[:12]}…, but "
            f"the studio now uses {recognizer_sha256[:12]}…; their embeddings do not match.",
            fix=f"{ADD_HINT} (the current recognizer embeds its slots again).",
        )


def match_slots(
    template: Template,
    faces: Sequence[Face],
    embeddings: npt.NDArray[np.float32],  # (N, 512) L2-normed, one row per face
    image_size: tuple[int, int],  # the picture's width, height in px
) -> tuple[int | None, ...]:
    """The face (index into ``faces``) that is each slot, in slot order; None for a slot no face is near.

    One to one, of least total cost: the distance between box centres in picture-relative units (over
    MAX_SLOT_DISTANCE) plus EMBEDDING_WEIGHT × (1 − cosine) to the slot's face. Pairs further apart than
    MAX_SLOT_DISTANCE never match, so a missing face leaves its slot empty instead of taking a neighbour.
    """
    if not faces:
        return (None,) * len(template.slots)
    # 1. costs (S, N): relative centre distance, and how unlike the slot's face each face is
    width, height = image_size
    slot_xy = np.array(
        [(x / template.width, y / template.height) for x, y in (s.centre for s in template.slots)]
    )
    face_xy = np.array(
        [((f.box[0] + f.box[2]) / 2 / width, (f.box[1] + f.box[3]) / 2 / height) for f in faces]
    )
    distance = np.linalg.norm(slot_xy[:, None, :] - face_xy[None, :, :], axis=2)  # (S, N)
    slot_rows = np.stack([s.embedding for s in template.slots]).astype(np.float64)  # (S, 512)
    cosine = slot_rows @ np.asarray(embeddings, np.float64).T  # (S, N)
    cost = distance / MAX_SLOT_DISTANCE + EMBEDDING_WEIGHT * (1.0 - cosine)
    cost[distance > MAX_SLOT_DISTANCE] = _UNREACHABLE
    # 2. the one-to-one assignment of least total cost; a pair beyond the limit is no match
    from scipy.optimize import linear_sum_assignment  # scipy comes with insightface; imported when used

    matched: list[int | None] = [None] * len(template.slots)
    for slot, face in zip(*linear_sum_assignment(cost), strict=True):
        if cost[slot, face] < _UNREACHABLE:
            matched[int(slot)] = int(face)
    return tuple(matched)


def assign_template(
    template: Template,
    faces: Sequence[Face],
    embeddings: npt.NDArray[np.float32],  # (N, 512) L2-normed, one row per face
    image_size: tuple[int, int],  # the picture's width, height in px
    spec: IdentitySpec,
) -> Assignment:
    """Pair faces with identities through the template's slots: all slots of the cast, or nothing."""
    check_template_cast(template, spec)
    found = f"{len(faces)} face{'' if len(faces) == 1 else 's'} found"
    if not faces:
        return Assignment((), "no_faces", "no faces found: nothing swapped")
    matched = match_slots(template, faces, embeddings, image_size)
    missing = [f"slot {slot} ({who})" for slot, who in spec.slots if matched[slot] is None]
    if missing:
        message = f"{found}, template {template.name!r} has no face at {', '.join(missing)}: nothing swapped"
        logger.warning(message)
        return Assignment((), "too_few_faces", message)
    pairs = tuple(sorted((matched[slot], who) for slot, who in spec.slots))  # type: ignore[type-var]
    text = ", ".join(f"slot {slot} = face {matched[slot]} -> {who}" for slot, who in spec.slots)
    untouched = sorted(set(range(len(faces))) - {i for i, _ in pairs})
    if untouched:
        text += f"; face{'s' if len(untouched) > 1 else ''} {', '.join(map(str, untouched))} left as is"
    return Assignment(pairs, "ok", f"{found}, template {template.name!r}: {text}")


def _slots_of(image: Path, faces: Sequence[Face], embeddings: npt.NDArray[np.float32]) -> tuple[Slot, ...]:
    """The slots of a new template: one per face, in the faces' order; TemplateError if they cannot be."""
    if image.suffix.lower() not in IMAGE_SUFFIXES:
        raise TemplateError(f"Master picture {image} is not PNG, JPEG or WEBP.", fix="convert it first.")
    if not faces:
        raise TemplateError(
            f"No face found in {image}: a template needs one.", fix="use a picture with faces."
        )
    rows = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, 512)
    if rows.shape != (len(faces), EMBEDDING_SIZE) or len(faces) > MAX_SLOTS:
        raise TemplateError(
            f"{len(faces)} faces with embeddings {rows.shape} received.",
            fix=f"give one (512,) embedding per face, at most {MAX_SLOTS} faces.",
        )
    return tuple(
        Slot(i, face.box, np.asarray(face.landmarks, np.float32).reshape(5, 2), rows[i])  # (5, 2) x, y px
        for i, face in enumerate(faces)
    )


def _slots(count: int) -> str:
    return f"{count} slot{'' if count == 1 else 's'}"


def _now() -> str:
    """The current time, ISO-8601 UTC to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")
