"""Swapping: latent and aligned crop match insightface; refine_face changes the face region only."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import skimage.data
from onnx import numpy_helper

from studio import geometry
from studio.config import MaskConfig, RefineConfig
from studio.errors import ConfigError, InputError
from studio.faces import blend, swap
from studio.faces.blend import blend_face
from studio.faces.swap import cached_latent, identity_latent, refine_face, swap_crop
from studio.models.cache import ModelCache
from studio.models.runtime import load_insightface_model
from studio.types import Face

CPU = ["CPUExecutionProvider"]
# Eileen Collins' pupils, nose tip, mouth corners in skimage.data.astronaut(), (x, y) px; see test_geometry.
ASTRONAUT_LANDMARKS = np.array(
    [[204.5, 101.5], [245.5, 103.5], [224.0, 127.0], [205.5, 141.5], [244.5, 142.5]], dtype=np.float32
)


class CountingSession:
    """An ORT session stand-in that counts run() calls and forwards everything to the real one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def swapper(tiny_kit: Path) -> Any:
    return load_insightface_model(tiny_kit / "insightface" / "tiny_inswapper.onnx", CPU)


@pytest.fixture(scope="module")
def identity_swapper(tiny_kit: Path) -> Any:
    return load_insightface_model(tiny_kit / "insightface" / "tiny_inswapper_identity.onnx", CPU)


def _counting(model: Any) -> Any:
    counted = copy.copy(model)  # shallow: shares emap and the real session
    counted.session = CountingSession(model.session)
    return counted


def _embedding(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(512).astype(np.float32)  # (512,)
    return vector / np.linalg.norm(vector)


def _face(centre: tuple[float, float], size: float) -> Face:
    """A synthetic face of ``size`` px: the ArcFace template scaled so its 112-px crop spans the face."""
    landmarks = (geometry.ARCFACE_TEMPLATE - 56.0) * (size / 112.0) + np.asarray(centre, np.float32)
    cx, cy = centre
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    return Face(box=box, landmarks=landmarks.astype(np.float32), score=0.9)


def _smooth_image(height: int = 512, width: int = 512) -> np.ndarray:
    """A low-frequency synthetic HxWx3 uint8 BGR picture: interpolation is nearly exact on it."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # HxW row and column indices
    channels = [  # B, G, R planes, each HxW
        127 + 100 * np.sin(xx / 60) * np.cos(yy / 80),
        127 + 90 * np.cos((xx + yy) / 90),
        60 + 0.3 * xx + 0.1 * yy,
    ]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)  # 3 x HxW -> HxWx3


def _astronaut() -> np.ndarray:
    return skimage.data.astronaut()[:, :, ::-1].copy()  # HxWx3 RGB -> BGR (reverse the channel axis)


def _outside(image: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = region
    keep = np.ones(image.shape[:2], dtype=bool)  # HxW
    keep[y0:y1, x0:x1] = False
    return image[keep]  # (N, 3) pixels outside the region


def _settings(colour_match: bool, upscale: str = "off") -> RefineConfig:
    return RefineConfig(mask=MaskConfig(), colour_match=colour_match, upscale=upscale)  # type: ignore[arg-type]


# identity_latent / cached_latent


def test_identity_latent_is_what_inswapper_get_computes(swapper: Any, tiny_kit: Path) -> None:
    raw = np.random.default_rng(3).standard_normal(512).astype(np.float32) * 7.0  # not normed
    # INSwapper.get's three lines, with insightface's normed_embedding (embedding / its norm)
    normed_embedding = raw / np.linalg.norm(raw)
    expected = normed_embedding.reshape((1, -1))
    expected = np.dot(expected, swapper.emap)
    expected /= np.linalg.norm(expected)
    latent = identity_latent(raw, swapper.emap)
    assert latent.shape == (1, 512) and latent.dtype == np.float32
    np.testing.assert_allclose(latent, expected, rtol=0, atol=1e-6)
    # emap is the graph's last initializer
    graph = onnx.load(str(tiny_kit / "insightface" / "tiny_inswapper.onnx")).graph
    np.testing.assert_array_equal(swapper.emap, numpy_helper.to_array(graph.initializer[-1]))


def test_identity_latent_rejects_bad_embeddings(swapper: Any) -> None:
    with pytest.raises(InputError, match="shape"):
        identity_latent(np.ones(128, np.float32), swapper.emap)
    with pytest.raises(InputError, match="zeros"):
        identity_latent(np.zeros(512, np.float32), swapper.emap)


def test_cached_latent_computes_once_per_identity_and_model(
    swapper: Any, identity_swapper: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = swap.identity_latent

    def counting(embedding: np.ndarray, emap: np.ndarray) -> np.ndarray:
        calls.append(1)
        return real(embedding, emap)

    monkeypatch.setattr(swap, "identity_latent", counting)
    cache = ModelCache()
    alice, bob = _embedding(1), _embedding(2)
    first = cached_latent(cache, "alice", alice, swapper)
    for _ in range(3):
        assert cached_latent(cache, "alice", alice, swapper) is first
    assert len(calls) == 1
    other = cached_latent(cache, "bob", bob, swapper)
    cached_latent(cache, "alice", alice, identity_swapper)  # another model file: another latent
    cached_latent(cache, "bob", bob, swapper)
    assert len(calls) == 3
    assert not np.allclose(first, other)
    assert not first.flags.writeable  # the cached array cannot be changed by a caller


# swap_crop


def test_swap_crop_original_is_insightfaces_norm_crop2(swapper: Any) -> None:
    from insightface.utils import face_align

    image = _astronaut()
    face = Face(box=(180, 70, 270, 170), landmarks=ASTRONAUT_LANDMARKS, score=0.9)
    latent = identity_latent(_embedding(1), swapper.emap)
    swapped, original, affine = swap_crop(image, face, latent, swapper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs, matrix = face_align.norm_crop2(image, ASTRONAUT_LANDMARKS, 128)
    assert original.shape == swapped.shape == (128, 128, 3)
    assert original.dtype == swapped.dtype == np.uint8
    assert np.abs(original.astype(np.int16) - theirs).max() <= 1
    np.testing.assert_allclose(affine, matrix, atol=1e-4)


def test_swap_crop_matches_inswapper_get_without_paste_back(swapper: Any) -> None:
    image = _astronaut()
    embedding = _embedding(5)
    target = SimpleNamespace(kps=ASTRONAUT_LANDMARKS)
    source = SimpleNamespace(normed_embedding=embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs, _ = swapper.get(image, target, source, paste_back=False)
    face = Face(box=(180, 70, 270, 170), landmarks=ASTRONAUT_LANDMARKS, score=0.9)
    ours, _, _ = swap_crop(image, face, identity_latent(embedding, swapper.emap), swapper)
    # insightface truncates 255*x to uint8, we round (+1 at most), on crops that may differ by one level
    difference = np.abs(ours.astype(np.int16) - theirs)
    assert difference.max() <= 2 and difference.mean() < 1.0


def test_identity_swapper_returns_the_crop_exactly(identity_swapper: Any) -> None:
    image = _astronaut()
    face = Face(box=(180, 70, 270, 170), landmarks=ASTRONAUT_LANDMARKS, score=0.9)
    swapped, original, _ = swap_crop(
        image, face, identity_latent(_embedding(1), identity_swapper.emap), identity_swapper
    )
    np.testing.assert_array_equal(swapped, original)  # rounding, not truncation, keeps every level


def test_swap_crop_rejects_bad_inputs(swapper: Any) -> None:
    face = _face((256, 256), 200)
    latent = identity_latent(_embedding(1), swapper.emap)
    with pytest.raises(InputError, match="HxWx3 uint8"):
        swap_crop(np.zeros((64, 64), np.uint8), face, latent, swapper)
    with pytest.raises(InputError, match="latent"):
        swap_crop(_smooth_image(), face, latent[:, :100], swapper)


# refine_face


@pytest.mark.parametrize("colour_match", [False, True])
def test_identity_swap_changes_nothing_outside_and_little_inside(
    identity_swapper: Any, colour_match: bool
) -> None:
    canvas = _smooth_image()
    before = canvas.copy()
    face = _face((250, 260), 220)
    latent = identity_latent(_embedding(1), identity_swapper.emap)
    result, stats = refine_face(canvas, face, latent, identity_swapper, _settings(colour_match))
    np.testing.assert_array_equal(canvas, before)  # not in place: the caller's canvas is untouched
    affine = geometry.estimate_alignment(face.landmarks, 128)
    region = geometry.crop_region(affine, 128, canvas.shape[:2])
    np.testing.assert_array_equal(_outside(result, region), _outside(canvas, region))
    x0, y0, x1, y1 = region
    inside = np.abs(result[y0:y1, x0:x1].astype(np.int16) - canvas[y0:y1, x0:x1])
    assert inside.max() <= 2
    assert not stats.upscaled and stats.crop_size == 128
    assert set(stats.timings) == {"swap", "upscale", "blend"} and stats.timings["upscale"] == 0.0


def test_real_swap_changes_the_face_region(swapper: Any) -> None:
    canvas = _smooth_image()
    face = _face((250, 260), 220)
    latent = identity_latent(_embedding(1), swapper.emap)
    # colour match off: the tiny swapper only shifts colours, which matching would largely undo
    result, _ = refine_face(canvas, face, latent, swapper, _settings(False))
    affine = geometry.estimate_alignment(face.landmarks, 128)
    region = geometry.crop_region(affine, 128, canvas.shape[:2])
    np.testing.assert_array_equal(_outside(result, region), _outside(canvas, region))
    centre = (slice(230, 290), slice(220, 280))  # rows, columns at the face centre, mask = 1 there
    change = np.abs(result[centre].astype(np.int16) - canvas[centre])
    assert change.mean() > 3.0


def test_swapper_is_called_once_per_face(swapper: Any) -> None:
    counted = _counting(swapper)
    canvas = _smooth_image(512, 768)
    faces = [_face((200, 250), 180), _face((560, 260), 200)]
    latent = identity_latent(_embedding(1), swapper.emap)
    for face in faces:
        canvas, _ = refine_face(canvas, face, latent, counted, _settings(True))
    assert counted.session.calls == len(faces)


def test_inplace_matches_a_copy_and_blend_face_on_the_whole_canvas(swapper: Any) -> None:
    canvas = _astronaut()
    face = Face(box=(180, 70, 270, 170), landmarks=ASTRONAUT_LANDMARKS, score=0.9)
    latent = identity_latent(_embedding(2), swapper.emap)
    settings = _settings(True)
    copied, _ = refine_face(canvas, face, latent, swapper, settings)
    crop, original, affine = swap_crop(canvas, face, latent, swapper)
    whole = blend_face(canvas, crop, affine, settings.mask, original_crop=original, colour_match=True)
    target = canvas.copy()
    returned, _ = refine_face(target, face, latent, swapper, settings, inplace=True)
    assert returned is target
    np.testing.assert_array_equal(copied, target)
    assert np.abs(copied.astype(np.int16) - whole).max() <= 1
    assert not np.array_equal(copied, canvas)


def test_inplace_refine_works_on_the_mask_region_alone(swapper: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[tuple[int, int]] = []
    real_warp = geometry.cv2.warpAffine

    def counting_warp(src, matrix, dsize, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(tuple(dsize))
        return real_warp(src, matrix, dsize, *args, **kwargs)

    monkeypatch.setattr(geometry.cv2, "warpAffine", counting_warp)
    canvas = _smooth_image(2048, 2048)
    before = canvas.copy()
    face = _face((1000, 1100), 350)
    latent = identity_latent(_embedding(1), swapper.emap)
    returned, _ = refine_face(canvas, face, latent, swapper, _settings(False), inplace=True)
    assert returned is canvas
    affine = geometry.estimate_alignment(face.landmarks, 128)
    region = geometry.mask_region(affine, blend.crop_mask(128, MaskConfig()), canvas.shape[:2])
    x0, y0, x1, y1 = region
    # the aligned crop, then the crop and its mask into the mask's region: no full-frame warp
    assert sizes == [(128, 128), (x1 - x0, y1 - y0), (x1 - x0, y1 - y0)]
    np.testing.assert_array_equal(_outside(canvas, region), _outside(before, region))
    assert not np.array_equal(canvas[y0:y1, x0:x1], before[y0:y1, x0:x1])


def test_face_off_the_canvas_edge_is_clipped(swapper: Any) -> None:
    canvas = _smooth_image(256, 256)
    face = _face((20, 240), 160)  # most of the crop lies outside the picture
    latent = identity_latent(_embedding(1), swapper.emap)
    result, _ = refine_face(canvas, face, latent, swapper, _settings(True))
    assert result.shape == canvas.shape and result.dtype == np.uint8


def test_refine_settings_are_the_config_section() -> None:
    with pytest.raises(ConfigError, match=r"refine.upscale has value 'sometimes'"):
        RefineConfig(upscale="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"refine.mask.padding has value 0.5"):
        MaskConfig(padding=0.5)


def test_upscale_on_without_an_upscaler_is_an_error(swapper: Any) -> None:
    latent = identity_latent(_embedding(1), swapper.emap)
    with pytest.raises(InputError, match="no upscaler"):
        refine_face(_smooth_image(), _face((256, 256), 200), latent, swapper, _settings(True, "on"))
