"""Face processors, occlusion and parser masks, the enhancer and Poisson blending, on the tiny kit.

The tiny detector reports one face at a fixed place; the tiny occluder masks out pure green and nothing
else; the tiny parser lays its regions where the ArcFace template puts them (see their catalogue entries).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from skimage import data

import studio.faces.analysis as analysis
import studio.faces.masks as masks
import studio.faces.upscale as upscale
from studio.config import FACE_REGION_CLASSES, StudioConfig, load_config
from studio.errors import ConfigError, InputError
from studio.faces import detect, load_face_models, refine, refine_models
from studio.faces.detect import embed_faces
from studio.faces.processors import FaceJob
from studio.faces.select import Cast
from studio.geometry import estimate_alignment
from studio.imageio import read_image, read_metadata, write_image
from studio.models.tiny.faces import FIXTURE_FACE_BOX, FIXTURE_FACE_KPS
from studio.models.tiny.processors import OCCLUDER_RGB, parser_class_map
from studio.pipeline import Studio
from studio.request import GenerateRequest
from studio.types import Face, ImageBGR

SIDE = 512


@pytest.fixture
def config(tiny_overrides: list[str], tmp_path: Path) -> StudioConfig:
    return load_config(
        "tiny", overrides=[*tiny_overrides, f"refine.identities_dir={str(tmp_path / 'ids')!r}"]
    )


@pytest.fixture
def studio(config: StudioConfig, tmp_path: Path) -> Studio:
    studio = Studio(config)
    for name, picture in (("anna", data.astronaut()), ("kenji", data.chelsea())):
        photo = tmp_path / f"{name}.png"
        write_image(photo, cv2.resize(picture[:, :, ::-1], (256, 256)))  # RGB -> BGR
        studio.enrol(name, [photo], consent="release #123, 2026-11-01")
    return studio


def _master(tmp_path: Path, occluder: tuple[int, int, int, int] | None = None) -> Path:
    """A 512-px picture (the fixture face in its middle), optionally a green occluder (x0, y0, x1, y1)."""
    image = cv2.resize(data.coffee()[:, :, ::-1], (SIDE, SIDE))  # RGB -> BGR
    if occluder is not None:
        x0, y0, x1, y1 = occluder
        image[y0:y1, x0:x1] = OCCLUDER_RGB[::-1]  # RGB -> BGR
    path = tmp_path / f"master-{occluder}.png"
    write_image(path, image)
    return path


def _refined(studio: Studio, master: Path, **options: Any) -> ImageBGR:
    request = GenerateRequest(prompt="", identity="anna", **options)
    result = studio.refine_files([master], request)
    assert len(result.outputs) == 1, result.statuses
    return read_image(result.outputs[0])


def _face_px(point: tuple[float, float]) -> tuple[int, int]:
    return round(point[0] * SIDE), round(point[1] * SIDE)


# --- occlusion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["alpha", "poisson"])
def test_an_occluder_in_front_of_the_face_is_left_exactly_as_it_was(
    studio: Studio, tmp_path: Path, blend: str
) -> None:
    eye_x, eye_y = _face_px(FIXTURE_FACE_KPS[0])
    box = (eye_x - 40, eye_y - 30, eye_x + 40, eye_y + 30)  # a green "hand" over the left eye
    master = _master(tmp_path, box)
    original = read_image(master)
    covered = _refined(studio, master, occlusion=True, blend=blend)
    bare = _refined(studio, master, occlusion=False, blend=blend)
    x0, y0, x1, y1 = box
    inner = (slice(y0 + 4, y1 - 4), slice(x0 + 4, x1 - 4))  # 4 px clear of the occluder's soft edge
    np.testing.assert_array_equal(covered[inner], original[inner])
    assert (bare[inner] != original[inner]).any()  # without the occlusion mask it is pasted over
    nose_x, nose_y = _face_px(FIXTURE_FACE_KPS[2])
    around_nose = (slice(nose_y - 5, nose_y + 5), slice(nose_x - 5, nose_x + 5))
    assert (covered[around_nose] != original[around_nose]).any()


# --- parser regions -------------------------------------------------------------------------------


def _region_on_canvas(class_ids: tuple[int, ...]) -> np.ndarray:
    """Canvas pixels well inside the tiny parser's regions ``class_ids`` for the fixture face (HxW bool)."""
    landmarks = np.array([_face_px(p) for p in FIXTURE_FACE_KPS], np.float32)
    affine = estimate_alignment(landmarks, 128)
    inside = np.isin(parser_class_map(128), class_ids).astype(np.float32)  # 128x128 crop space
    inside = cv2.erode(inside, np.ones((5, 5), np.uint8))  # clear of the mask's soft edge
    back = cv2.warpAffine(inside, cv2.invertAffineTransform(affine), (SIDE, SIDE))
    return back > 0.99


def test_parser_regions_limit_the_swap_to_the_chosen_regions(studio: Studio, tmp_path: Path) -> None:
    master = _master(tmp_path)
    original = read_image(master).astype(int)
    nose_only = np.abs(_refined(studio, master, regions=("nose",)).astype(int) - original).max(axis=2) > 0
    whole = np.abs(_refined(studio, master).astype(int) - original).max(axis=2) > 0
    nose, eyes = _region_on_canvas((FACE_REGION_CLASSES["nose"],)), _region_on_canvas((4, 5))
    assert nose.sum() > 50 and eyes.sum() > 50
    assert nose_only[nose].mean() > 0.9 and whole[nose].mean() > 0.9
    assert not nose_only[eyes].any() and whole[eyes].mean() > 0.9  # eyes are not nose: untouched
    assert 0 < nose_only.sum() < whole.sum() / 3


def test_unknown_region_or_processor_is_a_one_line_error(config: StudioConfig) -> None:
    with pytest.raises(InputError, match="regions"):
        GenerateRequest(prompt="", regions=("ears",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="processors"):
        load_config("tiny", overrides=["refine.processors=['swap', 'blur']"])


# --- enhancer -------------------------------------------------------------------------------------


def test_enhancer_runs_after_the_swap_and_its_blend_and_fidelity_matter(
    studio: Studio, tmp_path: Path
) -> None:
    master = _master(tmp_path)
    swapped = _refined(studio, master, processors=("swap",))
    enhanced = _refined(studio, master, processors=("swap", "enhance"))
    assert (enhanced != swapped).any()
    fx0, fy0, fx1, fy1 = (round(v * SIDE) for v in FIXTURE_FACE_BOX)
    outside = np.ones((SIDE, SIDE), bool)
    outside[fy0 - 80 : fy1 + 80, fx0 - 80 : fx1 + 80] = False
    np.testing.assert_array_equal(enhanced[outside], swapped[outside])  # the face's region only
    off = _with_enhance(studio, blend=0.0)
    np.testing.assert_array_equal(_refined(off, master, processors=("swap", "enhance")), swapped)
    codeformer = [
        _refined(_with_enhance(studio, model="tiny-codeformer", fidelity=f), master, processors=("enhance",))
        for f in (0.0, 1.0)
    ]
    assert (codeformer[0] != codeformer[1]).any()


def _with_enhance(studio: Studio, **changes: Any) -> Studio:
    refine_config = studio.config.refine
    enhance = replace(refine_config.enhance, **changes)
    return Studio(replace(studio.config, refine=replace(refine_config, enhance=enhance)), cache=studio.cache)


def test_the_recipe_records_each_processors_time_and_reproduces(studio: Studio, tmp_path: Path) -> None:
    master = _master(tmp_path)
    request = GenerateRequest(prompt="", identity="anna", processors=("swap", "enhance"), blend="poisson")
    result = studio.refine_files([master], request)
    again = studio.reproduce(result.outputs[0])
    assert again.identical, again.differences
    stored = read_metadata(result.outputs[0]).recipe
    assert set(stored["refine"]["timings_ms"]) >= {"detect", "swap", "enhance", "qa"}
    assert stored["request"]["processors"] == ["swap", "enhance"] and stored["request"]["blend"] == "poisson"


# --- Poisson blending -----------------------------------------------------------------------------


def test_poisson_blend_differs_from_alpha_inside_the_face_only(studio: Studio, tmp_path: Path) -> None:
    master = _master(tmp_path)
    original = read_image(master)
    alpha, poisson = (_refined(studio, master, blend=mode) for mode in ("alpha", "poisson"))
    assert (alpha != poisson).any()
    fx0, fy0, fx1, fy1 = (round(v * SIDE) for v in FIXTURE_FACE_BOX)
    outside = np.ones((SIDE, SIDE), bool)
    outside[fy0 - 60 : fy1 + 60, fx0 - 60 : fx1 + 60] = False
    np.testing.assert_array_equal(poisson[outside], original[outside])


# --- one pass per picture: batches, shared analysis ------------------------------------------------


def _grid_faces(count: int) -> tuple[Face, ...]:
    faces = []
    for i in range(count):
        x, y = (i % 4) * 256.0, (i // 4) * 256.0
        landmarks = np.array([[x + 256 * px, y + 256 * py] for px, py in FIXTURE_FACE_KPS], np.float32)
        faces.append(Face(box=(x + 77, y + 56, x + 179, y + 184), landmarks=landmarks, score=0.99))
    return tuple(faces)


def test_all_faces_of_a_picture_go_through_each_processor_in_one_batch(
    studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(studio.config, refine=replace(studio.config.refine, upscale="on"))
    models = load_face_models(refine_models(config, studio.catalogue), config, studio.cache)
    monkeypatch.setattr(analysis, "detect_faces", lambda image, detector, settings: _grid_faces(4))
    batches: list[int] = []
    forward = upscale._forward_rrdbnet

    def counted(runner: Any, crops: list[ImageBGR]) -> list[ImageBGR]:
        batches.append(len(crops))
        return forward(runner, crops)

    monkeypatch.setattr(upscale, "_forward_rrdbnet", counted)
    picture = cv2.resize(data.astronaut()[:, :, ::-1], (1024, 256))
    identities = {"anna": studio.identities.get("anna")}
    result = refine(
        picture, Cast.parse("anna", select="all"), identities, models, config.refine, studio.cache
    )
    assert result.status in ("ok", "failed_qa") and len(result.qa) == 4 and all(result.upscaled)
    assert batches == [4]  # four same-size swapped crops, one Real-ESRGAN call


def test_upscale_many_equals_one_by_one(studio: Studio) -> None:
    config = replace(studio.config, refine=replace(studio.config.refine, upscale="on"))
    upscaler = load_face_models(refine_models(config, studio.catalogue), config, studio.cache).upscaler
    assert upscaler is not None
    rng = np.random.default_rng(0)
    crops = [
        cv2.GaussianBlur(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), (0, 0), 2) for _ in range(3)
    ]
    crops.append(crops[0][:64, :64].copy())  # another size: its own batch
    together = upscaler.upscale_many(crops)
    for crop, big in zip(crops, together, strict=True):
        assert big.shape == (crop.shape[0] * upscaler.scale, crop.shape[1] * upscaler.scale, 3)
        assert np.abs(big.astype(int) - upscaler.upscale(crop)).max() <= 1


def test_identities_on_one_picture_share_its_analysis_and_masks(
    studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    forward = masks._forward_mask_model

    def counted(model: masks.MaskModel, blob: np.ndarray) -> np.ndarray:
        calls.append(model.name)
        return forward(model, blob)

    monkeypatch.setattr(masks, "_forward_mask_model", counted)
    mask = replace(studio.config.refine.mask, occlusion=True, regions=("skin", "nose"))
    config = replace(studio.config, refine=replace(studio.config.refine, mask=mask))
    shared = Studio(config, cache=studio.cache)
    picture = read_image(_master(tmp_path))
    first, second = (shared.refine(picture, name) for name in ("anna", "kenji"))
    assert first.status == second.status == "ok"
    assert (first.image != second.image).any()
    assert sorted(calls) == ["tiny-bisenet", "tiny-xseg"]  # once per face and crop size, not per identity


def test_a_picture_is_aligned_once_per_face_and_crop_layout(
    studio: Studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layouts: list[tuple[int, str]] = []

    def counted(landmarks: np.ndarray, size: int, template: str = "arcface") -> np.ndarray:
        layouts.append((size, template))
        return estimate_alignment(landmarks, size, template)  # type: ignore[arg-type]

    for module in (analysis, detect):
        monkeypatch.setattr(module, "estimate_alignment", counted)
    picture = read_image(_master(tmp_path))
    picture[0, 0] ^= 1  # pixels no earlier test analysed
    first, second = (studio.refine(picture, name) for name in ("anna", "kenji"))
    assert first.status == second.status == "ok"
    # the 112-px ArcFace crop (embedding, then every QA crop) and the swapper's 128-px crop: once each
    assert sorted(layouts) == [(112, "arcface"), (128, "arcface")]
    models = load_face_models(refine_models(studio.config, studio.catalogue), studio.config, studio.cache)
    kept = analysis.analyse_picture(
        picture, models.detector, models.recognizer, models.recognizer_sha256, studio.config.refine.detect,
        studio.cache,
    )  # fmt: skip
    assert len(kept.faces) == 1 and len(layouts) == 2  # the analysis the refines shared
    np.testing.assert_array_equal(kept.embeddings, embed_faces(picture, kept.faces, models.recognizer))


# --- a processor is a plug-in -----------------------------------------------------------------------


class _Invert:
    """A processor defined outside the studio: inverts each face crop."""

    name = "invert"
    template = "arcface"
    size = 128
    colour_match = False
    strength = 1.0

    def __init__(self) -> None:
        self.seen: list[int] = []

    def process(self, crops: list[ImageBGR], jobs: list[FaceJob]) -> list[ImageBGR]:
        self.seen.append(len(crops))
        return [255 - crop for crop in crops]


def test_a_new_processor_plugs_in_without_touching_the_others(studio: Studio, tmp_path: Path) -> None:
    models = load_face_models(refine_models(studio.config, studio.catalogue), studio.config, studio.cache)
    custom = _Invert()
    chained = replace(models, processors=(*models.processors, custom))
    picture = read_image(_master(tmp_path))
    identities = {"anna": studio.identities.get("anna")}
    plain = refine(picture, Cast.parse("anna"), identities, models, studio.config.refine, studio.cache)
    inverted = refine(picture, Cast.parse("anna"), identities, chained, studio.config.refine, studio.cache)
    assert custom.seen == [1] and "invert" in inverted.timings
    nose_x, nose_y = _face_px(FIXTURE_FACE_KPS[2])
    assert np.abs(inverted.image[nose_y, nose_x].astype(int) + plain.image[nose_y, nose_x] - 255).max() <= 2
