"""Identity QA: cosine similarity and the pass/fail verdict per swapped face."""

from __future__ import annotations

import numpy as np
import pytest

from studio.errors import InputError
from studio.faces.quality import FaceQA, SwapEmbeddings, assess, similarity


def _unit(index: int, size: int = 512) -> np.ndarray:
    vector = np.zeros(size, np.float32)  # (512,)
    vector[index] = 1.0
    return vector


def test_similarity_of_identical_and_orthogonal_embeddings() -> None:
    vector = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    assert similarity(vector, vector) == pytest.approx(1.0, abs=1e-6)
    assert similarity(vector, 3.0 * vector) == pytest.approx(1.0, abs=1e-6)  # normed first
    assert similarity(vector, -vector) == pytest.approx(-1.0, abs=1e-6)
    assert similarity(_unit(0), _unit(1)) == pytest.approx(0.0, abs=1e-9)
    mixed = (_unit(0) + _unit(1)) / np.sqrt(2)
    assert similarity(_unit(0), mixed) == pytest.approx(np.sqrt(0.5), abs=1e-6)


def test_similarity_rejects_bad_embeddings() -> None:
    with pytest.raises(InputError, match="zero"):
        similarity(np.zeros(512, np.float32), _unit(0))
    with pytest.raises(InputError, match="shapes"):
        similarity(_unit(0, 128), _unit(0))
    with pytest.raises(InputError, match="finite"):
        similarity(np.full(512, np.nan, np.float32), _unit(0))


def test_assess_reports_after_before_and_the_threshold() -> None:
    identity = _unit(0)
    close = (0.8 * _unit(0) + 0.6 * _unit(1)).astype(np.float32)  # cosine 0.8 to the identity
    far = (0.3 * _unit(0) + np.sqrt(1 - 0.09) * _unit(2)).astype(np.float32)  # cosine 0.3
    swaps = [
        SwapEmbeddings(0, "alice", identity, before=_unit(3), after=close),
        SwapEmbeddings(2, "bob", identity, before=close, after=far),
    ]
    verdicts = assess(swaps, min_similarity=0.5)
    assert [v.face_index for v in verdicts] == [0, 2]
    assert [v.identity for v in verdicts] == ["alice", "bob"]
    assert verdicts[0].similarity_after == pytest.approx(0.8, abs=1e-6)
    assert verdicts[0].similarity_before == pytest.approx(0.0, abs=1e-6)
    assert verdicts[1].similarity_after == pytest.approx(0.3, abs=1e-6)
    assert verdicts[1].similarity_before == pytest.approx(0.8, abs=1e-6)
    assert [v.passed for v in verdicts] == [True, False]
    assert all(isinstance(v, FaceQA) for v in verdicts)
    # the threshold is inclusive, and 0 (the default) passes any face not pointing away from its identity
    exact = SwapEmbeddings(5, "carol", identity, before=identity, after=identity)  # cosine exactly 1
    assert assess([exact], min_similarity=1.0)[0].passed
    assert all(v.passed for v in assess(swaps, min_similarity=0.0))
    assert not any(v.passed for v in assess(swaps, min_similarity=0.9))


def test_assess_rejects_a_threshold_outside_the_cosine_range() -> None:
    with pytest.raises(InputError, match="Minimum similarity"):
        assess([], min_similarity=1.5)
