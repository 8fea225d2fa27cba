"""The QA gate every output passes, in single runs and campaigns alike, and the re-roll seeds.

An output passes when every face the cast names was found and swapped, each swapped face's identity
similarity is at least ``refine.min_similarity``, and the content check passes. The content check is one
interface (an image in, the reasons it fails out); until a real checker is installed the studio runs
:func:`no_content_check`, a placeholder that passes everything and says so in every run's notes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from studio.results import Draft, Refined
from studio.safety import content_verdict
from studio.types import ImageBGR

ContentCheck = Callable[[ImageBGR], tuple[str, ...]]  # HxWx3 uint8 BGR -> reasons it fails (() = passes)

NO_CONTENT_CHECK_NOTE = "content check: none installed (a placeholder that passes every image)"
_MAX_SEED = 2**32 - 1


def no_content_check(image: ImageBGR) -> tuple[str, ...]:
    """The placeholder content check: passes every image (see NO_CONTENT_CHECK_NOTE)."""
    return ()


@dataclass(frozen=True)
class Verdict:
    """Whether an output passed the gate, and every reason it did not."""

    passed: bool
    reasons: tuple[str, ...] = ()
    similarities: tuple[float, ...] = ()  # one per swapped face, in face order
    blocked: bool = False  # the content check failed: the picture is never written
    scores: Mapping[str, float] = field(default_factory=dict)  # the content check's scores per class


def gate(result: Draft | Refined, content_check: ContentCheck = no_content_check) -> Verdict:
    """The QA verdict for ``result``: faces found and swapped, similarity, content."""
    reasons: list[str] = []
    similarities: tuple[float, ...] = ()
    if isinstance(result, Refined):
        similarities = tuple(round(q.similarity_after, 4) for q in result.qa)
        if not result.changed:
            reasons.append(f"faces: {result.message}")
        reasons += [
            f"face {q.face_index} similarity {q.similarity_after:.3f} to {q.identity} is below the minimum"
            for q in result.qa
            if not q.passed
        ]
    content = content_verdict(content_check, result.image)
    reasons += [f"content: {reason}" for reason in content.reasons]
    return Verdict(not reasons, tuple(reasons), similarities, not content.passed, dict(content.scores))


def content_gate(picture: Draft, content_check: ContentCheck = no_content_check) -> Verdict:
    """The content check alone: run on a draft before refine, so no refine is spent on a blocked one."""
    content = content_verdict(content_check, picture.image)
    reasons = tuple(f"content: {reason}" for reason in content.reasons)
    return Verdict(content.passed, reasons, (), not content.passed, dict(content.scores))


def reroll_seed(key: str, attempt: int) -> int:
    """The seed of re-roll ``attempt`` (1, 2, ...) of output ``key``: fixed by both, never random."""
    digest = hashlib.sha256(f"{key}:reroll:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (_MAX_SEED + 1)
