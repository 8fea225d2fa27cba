"""Multi-person templates: the library file format, slot matching and casts checked against slots."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from studio.errors import TemplateError
from studio.faces.select import parse_identity_spec
from studio.faces.template import (
    Template,
    TemplateLibrary,
    assign_template,
    check_template_cast,
    match_slots,
)
from studio.faces.template_file import Slot, serialize_template
from studio.imageio import write_image
from studio.types import Face

RECOGNIZER = "ab" * 32
WIDTH, HEIGHT = 800, 400
RNG = np.random.default_rng(7)


def _unit(rows: int) -> np.ndarray:
    """``rows`` random L2-normed embeddings (N, 512) float32: strangers to each other (cosine ~0)."""
    raw = RNG.normal(size=(rows, 512))
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


def _face(cx: float, cy: float, side: float = 80.0) -> Face:
    landmarks = np.full((5, 2), (cx, cy), np.float32)  # (5, 2) x, y px
    half = side / 2
    return Face(box=(cx - half, cy - half, cx + half, cy + half), landmarks=landmarks, score=0.9)


# three people on an 800x400 master, left to right
MASTER_FACES = (_face(150, 200), _face(400, 180), _face(650, 210))
MASTER_EMBEDDINGS = _unit(3)


def _template(faces: tuple[Face, ...] = MASTER_FACES, embeddings: np.ndarray = MASTER_EMBEDDINGS) -> Template:
    slots = tuple(Slot(i, f.box, f.landmarks, embeddings[i]) for i, f in enumerate(faces))
    return Template("trio", "trio.master.png", "0" * 64, WIDTH, HEIGHT, slots, RECOGNIZER, "2026-01-01")


@pytest.fixture
def master(tmp_path: Path) -> Path:
    path = tmp_path / "master.png"
    write_image(path, np.full((HEIGHT, WIDTH, 3), 90, np.uint8))
    return path


@pytest.fixture
def library(tmp_path: Path) -> TemplateLibrary:
    return TemplateLibrary(tmp_path / "templates")


def _add(library: TemplateLibrary, master: Path, name: str = "trio", replace: bool = False) -> Template:
    return library.add(name, master, MASTER_FACES, MASTER_EMBEDDINGS, size=(WIDTH, HEIGHT),
                       recognizer_sha256=RECOGNIZER, replace=replace)  # fmt: skip


# --- the library ------------------------------------------------------------------------------


def test_library_round_trip(library: TemplateLibrary, master: Path) -> None:
    added = _add(library, master)
    loaded = library.load("trio")
    assert loaded.file_sha256 == added.file_sha256 != ""
    assert (loaded.name, loaded.width, loaded.height, loaded.recognizer_sha256) == (
        "trio",
        WIDTH,
        HEIGHT,
        RECOGNIZER,
    )
    assert [s.index for s in loaded.slots] == [0, 1, 2]
    assert [s.box for s in loaded.slots] == [f.box for f in MASTER_FACES]
    assert np.array_equal(np.stack([s.embedding for s in loaded.slots]), MASTER_EMBEDDINGS)
    assert loaded.slots[0].landmarks.shape == (5, 2)
    copy = library.image_path(loaded)
    assert copy.read_bytes() == master.read_bytes() and copy.parent == library.folder  # a copy, not a link
    assert stat.S_IMODE(library.path_for("trio").stat().st_mode) == 0o600
    assert stat.S_IMODE(library.folder.stat().st_mode) == 0o700
    assert [t.name for t in library.list()] == ["trio"]
    with pytest.raises(TemplateError, match="already exists"):
        _add(library, master)
    assert _add(library, master, replace=True).slots[2].box == MASTER_FACES[2].box
    library.remove("trio")
    assert library.list() == [] and not copy.exists()


def test_names_and_unknown_templates(library: TemplateLibrary, master: Path) -> None:
    with pytest.raises(TemplateError, match=r"Template name '\.\./evil' is not allowed"):
        _add(library, master, name="../evil")
    _add(library, master, name="duo")
    with pytest.raises(TemplateError, match="did you mean 'duo'"):
        library.load("dou")
    with pytest.raises(TemplateError, match="No template 'dou'"):
        library.remove("dou")


def test_a_damaged_template_is_refused_on_load(library: TemplateLibrary, master: Path) -> None:
    template = _add(library, master)
    path = library.path_for("trio")
    bad_rows = MASTER_EMBEDDINGS * 2.0  # not L2-normed
    slots = tuple(Slot(s.index, s.box, s.landmarks, bad_rows[s.index]) for s in template.slots)
    path.write_bytes(serialize_template(Template(**{**vars(template), "slots": slots})))
    with pytest.raises(TemplateError, match="not L2-normed"):
        library.load("trio")
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(TemplateError, match="is invalid: not a safetensors file"):
        library.load("trio")
    assert library.list() == []  # skipped, with a warning
    _add(library, master, replace=True)
    library.image_path(template).write_bytes(b"another picture")
    with pytest.raises(TemplateError, match="changed since it was added"):
        library.load("trio")


# --- matching slots to faces ------------------------------------------------------------------


def test_matching_ignores_detection_order() -> None:
    template = _template()
    order = [2, 0, 1]  # a detector that lists the faces in another order
    faces = [MASTER_FACES[i] for i in order]
    matched = match_slots(template, faces, MASTER_EMBEDDINGS[order], (WIDTH, HEIGHT))
    assert matched == (1, 2, 0)  # slot k -> the position of master face k in the shuffled list


def test_matching_survives_a_resized_and_slightly_moved_picture() -> None:
    template = _template()
    scale, shift = 0.5, (12.0, -9.0)  # half size, nudged by a few px
    faces = [
        _face(f.box[0] * scale + 20 + shift[0], f.box[1] * scale + 20 + shift[1], 40) for f in MASTER_FACES
    ]
    strangers = _unit(3)  # drafts from the master show other people: position alone decides
    assert match_slots(template, faces, strangers, (WIDTH // 2, HEIGHT // 2)) == (0, 1, 2)


def test_embedding_breaks_a_position_tie() -> None:
    slots = (_face(300, 200), _face(500, 200))
    people = _unit(2)
    template = _template(slots, people)
    between = [_face(400, 150), _face(400, 250)]  # each as far from both slots
    assert match_slots(template, between, people[[1, 0]], (WIDTH, HEIGHT)) == (1, 0)
    assert match_slots(template, between, people, (WIDTH, HEIGHT)) == (0, 1)


def test_a_slot_without_a_face_swaps_nothing() -> None:
    template = _template()
    spec = parse_identity_spec("0=anna,1=kenji,2=mei")
    faces = [MASTER_FACES[0], MASTER_FACES[2], _face(400, 30)]  # the middle person left; a face far above
    rows = MASTER_EMBEDDINGS[[0, 2, 1]]  # even their own face: too far from the slot to be them
    assert match_slots(template, faces, rows, (WIDTH, HEIGHT)) == (0, None, 1)
    assignment = assign_template(template, faces, rows, (WIDTH, HEIGHT), spec)
    assert assignment.status == "too_few_faces" and assignment.pairs == ()
    assert (
        assignment.message == "3 faces found, template 'trio' has no face at slot 1 (kenji): nothing swapped"
    )
    none = assign_template(template, [], np.zeros((0, 512), np.float32), (WIDTH, HEIGHT), spec)
    assert none.status == "no_faces" and none.pairs == ()


def test_assignment_pairs_are_in_detection_order() -> None:
    template = _template()
    faces = [MASTER_FACES[i] for i in (1, 2, 0)] + [_face(780, 380, 30)]  # plus a bystander in a corner
    rows = np.concatenate([MASTER_EMBEDDINGS[[1, 2, 0]], _unit(1)])
    assignment = assign_template(
        template, faces, rows, (WIDTH, HEIGHT), parse_identity_spec("0=anna,1=kenji,2=mei")
    )
    assert assignment.status == "ok"
    assert assignment.pairs == ((0, "kenji"), (1, "mei"), (2, "anna"))
    assert assignment.message.endswith("slot 2 = face 1 -> mei; face 3 left as is")


# --- casts on templates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cast", "problem"),
    [
        ("0=anna,1=kenji", "Template 'trio' has 3 slots but the cast maps 2: 0=anna,1=kenji."),
        ("0=a,1=b,2=c,3=d", "Template 'trio' has 3 slots but the cast maps 4: 0=a,1=b,2=c,3=d."),
        ("0=a,1=b,5=c", "Template 'trio' has slots 0-2; the cast 0=a,1=b,5=c names slot 5."),
        ("anna", "the cast 'anna' is a single name, not slot=name pairs"),
    ],
)
def test_casts_must_map_every_slot_once(cast: str, problem: str) -> None:
    with pytest.raises(TemplateError) as caught:
        check_template_cast(_template(), parse_identity_spec(cast))
    assert problem in str(caught.value) and "Fix: map every slot once" in str(caught.value)
    assert "\n" not in str(caught.value)
