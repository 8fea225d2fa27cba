"""Which face gets which identity: one name with a selection mode, or an explicit slot mapping.

Face indices refer to the stable left-to-right order of :func:`studio.faces.detect.detect_faces`.
An explicit mapping that needs more faces than the picture has swaps nothing: a missing face must never
shift a person onto somebody else's face.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from studio.config import FaceSelect
from studio.errors import InputError
from studio.faces.detect import face_order_key
from studio.faces.identity import validate_name
from studio.types import Face

if TYPE_CHECKING:  # studio.faces.template builds on this module
    from studio.faces.template import Template

logger = logging.getLogger(__name__)

AssignmentStatus = Literal["ok", "no_faces", "too_few_faces", "index_out_of_range"]
FACE_SELECTS: tuple[FaceSelect, ...] = get_args(FaceSelect)

_SLOT = re.compile(r"\s*(-?\d+)\s*=\s*(\S*)\s*")  # "0=anna": face index = identity name
_NO_REFERENCE = "Face selection 'similarity' needs a reference identity to compare faces with."
_SPEC_FIX = "pass one name (anna) or face=name pairs in left-to-right order (0=anna,1=kenji)."


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentitySpec:
    """A parsed --identity value: one ``name`` for the selected faces, or explicit ``slots``."""

    name: str | None = None  # one identity; the selection mode says which faces get it
    slots: tuple[tuple[int, str], ...] = ()  # (face index, identity name), sorted by face index

    @property
    def names(self) -> tuple[str, ...]:
        """The distinct identity names the spec uses, in slot order."""
        names = [self.name] if self.name is not None else [name for _, name in self.slots]
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Cast:
    """Who goes on which face: a parsed --identity, and how a single name picks its faces (or, with a
    template, which template slot each name goes on)."""

    spec: IdentitySpec
    select: FaceSelect | None = None  # None: the config's refine.select
    index: int = 0  # the face for select = "index"
    match: str | None = None  # the reference identity for select = "similarity"
    template: Template | None = None  # slots of a template: spec numbers slots, not faces

    @classmethod
    def parse(
        cls, text: str, *, select: FaceSelect | None = None, index: int = 0, match: str | None = None
    ) -> Cast:
        """``anna`` or ``0=anna,1=kenji``, with the selection options of a single name."""
        if select is not None and select not in FACE_SELECTS:
            choices = ", ".join(FACE_SELECTS)
            raise InputError(f"Face selection {select!r} received.", fix=f"use one of {choices}.")
        if select == "similarity" and match is None:
            raise InputError(_NO_REFERENCE, fix="pass --match NAME with --select similarity.")
        return cls(parse_identity_spec(text), select, index, validate_name(match) if match else None)

    @property
    def text(self) -> str:
        """The canonical --identity text: ``anna`` or ``0=anna,1=kenji``."""
        return self.spec.name or ",".join(f"{i}={name}" for i, name in self.spec.slots)

    @property
    def names(self) -> tuple[str, ...]:
        """Every identity the cast needs (the swapped ones, then the similarity reference)."""
        return tuple(dict.fromkeys((*self.spec.names, *((self.match,) if self.match else ()))))

    @property
    def label(self) -> str:
        """A file-name-safe label: ``anna`` or ``0-anna+1-kenji``."""
        return self.text.replace(",", "+").replace("=", "-")


@dataclass(frozen=True)
class Assignment:
    """The face index -> identity pairs for one picture, and a status line saying what happens."""

    pairs: tuple[tuple[int, str], ...]  # (face index in left-to-right order, identity name)
    status: AssignmentStatus
    message: str


# --- parsing ----------------------------------------------------------------------------------


def parse_identity_spec(spec: str) -> IdentitySpec:
    """Parse ``anna`` or ``0=anna,1=kenji`` (face indices in left-to-right order)."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise InputError(f"Identity spec {spec!r} is empty.", fix=_SPEC_FIX)
    if "=" not in text:
        return IdentitySpec(name=validate_name(text))
    slots: dict[int, str] = {}
    for part in text.split(","):
        match = _SLOT.fullmatch(part)
        if match is None or not match.group(2):
            raise InputError(f"Identity spec {spec!r}: {part.strip()!r} is not face=name.", fix=_SPEC_FIX)
        index, name = int(match.group(1)), validate_name(match.group(2))
        if index < 0:
            raise InputError(f"Identity spec {spec!r}: face index {index} is negative.", fix=_SPEC_FIX)
        if index in slots:
            raise InputError(
                f"Identity spec {spec!r} maps face {index} twice ({slots[index]}, {name}).", fix=_SPEC_FIX
            )
        slots[index] = name
    return IdentitySpec(slots=tuple(sorted(slots.items())))


# --- assignment -------------------------------------------------------------------------------


def assign_faces(
    faces: Sequence[Face],
    spec: IdentitySpec,
    mode: FaceSelect,
    *,
    index: int = 0,
    similarity: Callable[[int], float] | None = None,
) -> Assignment:
    """Pair faces with identities: an explicit mapping, or one name on the faces ``mode`` selects."""
    if mode not in FACE_SELECTS:
        raise InputError(f"Face selection {mode!r} received.", fix=f"use one of {', '.join(FACE_SELECTS)}.")
    if mode == "similarity" and spec.slots == () and similarity is None:
        raise InputError(_NO_REFERENCE, fix="pass a similarity function, or choose another selection mode.")
    found = f"{len(faces)} face{'' if len(faces) == 1 else 's'} found"
    if not faces:
        return Assignment((), "no_faces", "no faces found: nothing swapped")
    if spec.slots:
        return _assign_slots(faces, spec.slots, found)
    if spec.name is None:
        raise InputError("Identity spec names nobody.", fix=_SPEC_FIX)
    if mode == "index" and not 0 <= index < len(faces):
        message = f"{found}, face index {index} is out of range 0-{len(faces) - 1}: nothing swapped"
        return Assignment((), "index_out_of_range", message)
    chosen = _select(faces, mode, index, similarity)
    pairs = tuple((i, spec.name) for i in chosen)
    return Assignment(pairs, "ok", f"{found} ({mode}): {_describe(pairs, len(faces))}")


def _assign_slots(faces: Sequence[Face], slots: tuple[tuple[int, str], ...], found: str) -> Assignment:
    """The explicit mapping, all or nothing."""
    needed = max(i for i, _ in slots) + 1
    if len(faces) < needed:
        message = f"{found}, mapping needs {needed}: nothing swapped"
        logger.warning(message)
        return Assignment((), "too_few_faces", message)
    return Assignment(slots, "ok", f"{found}: {_describe(slots, len(faces))}")


def _select(
    faces: Sequence[Face], mode: FaceSelect, index: int, similarity: Callable[[int], float] | None
) -> list[int]:
    """Indices of the faces one identity goes on, by selection mode (ties: the earlier face)."""
    order = range(len(faces))
    if mode == "all":
        return list(order)
    if mode == "largest":
        return [max(order, key=lambda i: (faces[i].area, -i))]
    if mode == "left-to-right":
        return [min(order, key=lambda i: (face_order_key(faces[i]), i))]
    if mode == "index":
        return [index]
    if similarity is None:
        raise InputError(_NO_REFERENCE, fix="pass a similarity function, or choose another selection mode.")
    scores = [float(similarity(i)) for i in order]
    return [max(order, key=lambda i: (scores[i] if math.isfinite(scores[i]) else -math.inf, -i))]


def _describe(pairs: Sequence[tuple[int, str]], count: int) -> str:
    """``face 0 -> anna, face 2 -> kenji; face 1 left as is``."""
    text = ", ".join(f"face {i} -> {name}" for i, name in pairs)
    untouched = sorted(set(range(count)) - {i for i, _ in pairs})
    if untouched:
        text += f"; face{'s' if len(untouched) > 1 else ''} {', '.join(map(str, untouched))} left as is"
    return text
