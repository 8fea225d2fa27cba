"""Slot mapping: --identity specs, selection modes, and all-or-nothing explicit mappings."""

from __future__ import annotations

import numpy as np
import pytest

from studio.errors import InputError
from studio.faces.select import Assignment, IdentitySpec, assign_faces, parse_identity_spec
from studio.types import Face


def _face(x: float, y: float, side: float, score: float = 0.9) -> Face:
    landmarks = np.full((5, 2), (x + side / 2, y + side / 2), np.float32)  # (5, 2) x, y px
    return Face(box=(x, y, x + side, y + side), landmarks=landmarks, score=score)


# three faces in left-to-right order: small, large, medium
FACES = (_face(10, 40, 50), _face(100, 20, 120), _face(300, 30, 80))
ANNA = parse_identity_spec("anna")


# --- parsing ----------------------------------------------------------------------------------


def test_single_name() -> None:
    assert parse_identity_spec(" anna ") == IdentitySpec(name="anna")
    assert ANNA.names == ("anna",)


def test_explicit_mapping_sorted_by_face() -> None:
    spec = parse_identity_spec("2=kenji, 0=anna,1=anna")
    assert spec == IdentitySpec(slots=((0, "anna"), (1, "anna"), (2, "kenji")))
    assert spec.names == ("anna", "kenji")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0=anna,0=kenji", "maps face 0 twice"),
        ("-1=anna", "negative"),
        ("0=anna,,1=kenji", "not face=name"),
        ("x=anna", "not face=name"),
        ("0=", "not face=name"),
        ("0=anna=bob", "not allowed"),
        ("0=../anna", "not allowed"),
        ("anna,kenji", "not allowed"),
        ("1.5=anna", "not face=name"),
    ],
)
def test_bad_specs(text: str, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        parse_identity_spec(text)


# --- single name, by mode ---------------------------------------------------------------------


def test_all_faces() -> None:
    result = assign_faces(FACES, ANNA, "all")
    assert result == Assignment(
        ((0, "anna"), (1, "anna"), (2, "anna")),
        "ok",
        "3 faces found (all): face 0 -> anna, face 1 -> anna, face 2 -> anna",
    )


def test_largest_face() -> None:
    result = assign_faces(FACES, ANNA, "largest")
    assert result.pairs == ((1, "anna"),) and result.status == "ok"
    assert result.message == "3 faces found (largest): face 1 -> anna; faces 0, 2 left as is"


def test_leftmost_face_even_if_given_out_of_order() -> None:
    assert assign_faces(FACES, ANNA, "left-to-right").pairs == ((0, "anna"),)
    shuffled = (FACES[2], FACES[0], FACES[1])
    assert assign_faces(shuffled, ANNA, "left-to-right").pairs == ((1, "anna"),)


def test_index_and_out_of_range() -> None:
    assert assign_faces(FACES, ANNA, "index", index=2).pairs == ((2, "anna"),)
    for bad in (3, -1):
        result = assign_faces(FACES, ANNA, "index", index=bad)
        assert result.pairs == () and result.status == "index_out_of_range"
        assert result.message.endswith("out of range 0-2: nothing swapped")


def test_similarity_picks_the_most_similar_face() -> None:
    cosines = {0: 0.1, 1: 0.2, 2: 0.7}
    assert assign_faces(FACES, ANNA, "similarity", similarity=cosines.__getitem__).pairs == ((2, "anna"),)
    ties = {0: 0.5, 1: float("nan"), 2: 0.5}  # ties go to the earlier face; NaN never wins
    assert assign_faces(FACES, ANNA, "similarity", similarity=ties.__getitem__).pairs == ((0, "anna"),)
    with pytest.raises(InputError, match="reference"):
        assign_faces(FACES, ANNA, "similarity")


def test_unknown_mode_refused() -> None:
    with pytest.raises(InputError, match="largest"):
        assign_faces(FACES, ANNA, "biggest")  # type: ignore[arg-type]


# --- explicit mappings and missing faces ------------------------------------------------------


def test_explicit_mapping_ignores_mode() -> None:
    spec = parse_identity_spec("0=anna,2=kenji")
    for mode in ("all", "largest", "index", "similarity"):
        result = assign_faces(FACES, spec, mode, index=7)
        assert result.pairs == ((0, "anna"), (2, "kenji")) and result.status == "ok"
    assert result.message == "3 faces found: face 0 -> anna, face 2 -> kenji; face 1 left as is"


def test_too_few_faces_swaps_nothing() -> None:
    result = assign_faces(FACES[:2], parse_identity_spec("0=anna,1=kenji,2=li"), "all")
    assert result == Assignment((), "too_few_faces", "2 faces found, mapping needs 3: nothing swapped")
    one = assign_faces(FACES[:1], parse_identity_spec("1=kenji"), "all")
    assert one.pairs == () and one.message == "1 face found, mapping needs 2: nothing swapped"


def test_no_faces() -> None:
    for spec in (ANNA, parse_identity_spec("0=anna")):
        result = assign_faces((), spec, "all")
        assert result == Assignment((), "no_faces", "no faces found: nothing swapped")
