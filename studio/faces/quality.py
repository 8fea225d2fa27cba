"""Identity QA: how close each swapped face came to its identity, measured with ArcFace embeddings.

No models run here: the caller embeds the original and the result faces (with the catalogued recognizer)
and passes the embeddings in, so this module is pure arithmetic and trivially testable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from studio.errors import InputError
from studio.types import Embedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SwapEmbeddings:
    """The ArcFace embeddings around one swapped face: its identity's, and the face's before and after."""

    face_index: int  # the face's index among the faces detected on the draft
    identity: str  # the identity's name
    identity_embedding: Embedding  # (512,) float32
    before: Embedding  # (512,) float32: the original face on the draft
    after: Embedding  # (512,) float32: the same face on the refined picture


@dataclass(frozen=True)
class FaceQA:
    """The QA verdict for one swapped face."""

    face_index: int
    identity: str
    similarity_after: float  # cosine of the result face to the identity, -1..1
    similarity_before: float  # cosine of the original face to the identity, -1..1 (the baseline)
    passed: bool  # similarity_after >= the configured minimum


def similarity(a: Embedding, b: Embedding) -> float:
    """Cosine similarity of two embeddings, each L2-normalised first (-1..1)."""
    first, second = _normed(a, "first"), _normed(b, "second")
    if first.shape != second.shape:
        raise InputError(
            f"Embeddings of shapes {first.shape} and {second.shape} compared.",
            fix="compare embeddings made by the same recognizer.",
        )
    return float(np.clip(first @ second, -1.0, 1.0))


def assess(swaps: Sequence[SwapEmbeddings], *, min_similarity: float) -> list[FaceQA]:
    """One verdict per swapped face: similarity to its identity after and before, and pass/fail."""
    if not -1.0 <= min_similarity <= 1.0:
        raise InputError(f"Minimum similarity {min_similarity} received.", fix="use a value in [-1, 1].")
    verdicts = []
    for swap in swaps:
        after = similarity(swap.after, swap.identity_embedding)
        before = similarity(swap.before, swap.identity_embedding)
        verdict = FaceQA(swap.face_index, swap.identity, after, before, passed=after >= min_similarity)
        if not verdict.passed:
            logger.warning(
                "face %d: similarity to %s is %.3f after the swap (%.3f before), below %.3f",
                swap.face_index,
                swap.identity,
                after,
                before,
                min_similarity,
            )
        verdicts.append(verdict)
    return verdicts


def _normed(embedding: Embedding, name: str) -> np.ndarray:
    """The embedding as a flat float64 unit vector, or InputError."""
    vector = np.asarray(embedding, dtype=np.float64).reshape(-1)  # (512,) or any (D,) layout, flattened
    norm = float(np.linalg.norm(vector))
    if vector.size == 0 or not np.isfinite(vector).all() or norm < 1e-12:
        raise InputError(
            f"The {name} embedding (shape {np.shape(embedding)}) is empty, zero or not finite.",
            fix="pass an ArcFace embedding of a detected face.",
        )
    return vector / norm
