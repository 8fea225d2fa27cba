"""Alignment matches insightface; paste-back is exact outside its ROI and never warps the whole frame."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import skimage.data

from studio import geometry
from studio.config import MaskConfig
from studio.errors import InputError
from studio.faces.blend import crop_mask

# Eileen Collins in skimage.data.astronaut() (512x512), measured once on an 8x zoom: pupils, nose tip,
# mouth corners as (x, y) px. Interocular distance ~41 px, so the 128-px crop is about 1:1 with the photo.
ASTRONAUT_LANDMARKS = np.array(
    [[204.5, 101.5], [245.5, 103.5], [224.0, 127.0], [205.5, 141.5], [244.5, 142.5]], dtype=np.float32
)
# Measured with the default ellipse mask: an unmodified 128-px crop pasted back differs from the photo by
# at most 65 levels (hair strands and eyelashes: two bilinear resamplings at ~1:1) and 1.50 on average.
ASTRONAUT_MAX_ERROR = 66
ASTRONAUT_MEAN_ERROR = 1.6


def _astronaut() -> np.ndarray:
    return skimage.data.astronaut()[:, :, ::-1].copy()  # HxWx3 RGB -> BGR (reverse the channel axis)


def _smooth_image(height: int = 512, width: int = 512) -> np.ndarray:
    """A low-frequency synthetic HxWx3 uint8 BGR picture: interpolation is nearly exact on it."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # HxW row and column indices
    channels = [  # B, G, R planes, each HxW
        127 + 100 * np.sin(xx / 60) * np.cos(yy / 80),
        127 + 90 * np.cos((xx + yy) / 90),
        60 + 0.3 * xx + 0.1 * yy,
    ]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)  # 3 x HxW -> HxWx3


def _face_landmarks(centre: tuple[float, float], crop_px: float, degrees: float = 0.0) -> np.ndarray:
    """Landmarks whose 128-px ArcFace crop covers ``crop_px`` canvas px around ``centre``, rotated."""
    template = geometry.arcface_template(128) - 63.5  # (5, 2) x, y relative to the crop centre
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (template @ rotation.T * (crop_px / 128.0) + centre).astype(np.float32)  # (5, 2) x, y


def _landmark_sets() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    mirrored = ASTRONAUT_LANDMARKS.copy()
    mirrored[:, 0] = 512 - mirrored[:, 0]  # a mirror image: the estimator must not reflect
    return [
        ASTRONAUT_LANDMARKS,
        _face_landmarks((300.0, 260.0), 200.0, degrees=30.0),
        _face_landmarks((40.0, 500.0), 90.0, degrees=-75.0),
        (ASTRONAUT_LANDMARKS + rng.normal(0, 3, (5, 2))).astype(np.float32),
        mirrored,
    ]


def _insightface_norm(landmarks: np.ndarray, size: int) -> np.ndarray:
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skimage 0.26 deprecates SimilarityTransform.estimate
        return face_align.estimate_norm(landmarks, size)


def _outside(diff: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = region
    outside = diff.copy()
    outside[y0:y1, x0:x1] = 0
    return outside


@pytest.mark.parametrize("size", [112, 128, 256])
@pytest.mark.parametrize("index", range(5))
def test_alignment_matches_insightface(size: int, index: int) -> None:
    landmarks = _landmark_sets()[index]
    ours = geometry.estimate_alignment(landmarks, size)
    assert ours.shape == (2, 3) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, _insightface_norm(landmarks, size), atol=1e-3)


@pytest.mark.parametrize("size", [112, 128])
def test_warp_to_crop_matches_norm_crop(size: int) -> None:
    from insightface.utils import face_align

    image = _astronaut()
    ours = geometry.warp_to_crop(image, geometry.estimate_alignment(ASTRONAUT_LANDMARKS, size), size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = face_align.norm_crop(image, ASTRONAUT_LANDMARKS, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(np.int16) - theirs).max() <= 1


def test_template_is_insightfaces() -> None:
    from insightface.utils import face_align

    np.testing.assert_array_equal(geometry.ARCFACE_TEMPLATE, face_align.arcface_dst)
    # the template landmarks themselves align to the 128-px template: a pure 8-px shift right
    np.testing.assert_allclose(
        geometry.estimate_alignment(geometry.ARCFACE_TEMPLATE, 128), [[1, 0, 8], [0, 1, 0]], atol=1e-5
    )


def test_bad_landmarks_raise() -> None:
    with pytest.raises(InputError):
        geometry.estimate_alignment(np.zeros((4, 2), np.float32), 128)
    with pytest.raises(InputError):
        geometry.estimate_alignment(np.full((5, 2), 10.0, np.float32), 128)
    with pytest.raises(InputError):
        geometry.estimate_alignment(np.full((5, 2), np.nan, np.float32), 128)


@pytest.mark.parametrize("size", [112, 128, 256])
def test_unmodified_paste_round_trip_on_astronaut(size: int) -> None:
    image = _astronaut()
    affine = geometry.estimate_alignment(ASTRONAUT_LANDMARKS, size)
    crop = geometry.warp_to_crop(image, affine, size)
    pasted = geometry.paste_back(image, crop, affine, crop_mask(size, MaskConfig()))
    region = geometry.crop_region(affine, size, image.shape[:2])
    diff = np.abs(pasted.astype(np.int16) - image)  # HxWx3 int16 absolute error
    assert not _outside(diff, region).any()
    assert pasted is not image and diff.max() <= ASTRONAUT_MAX_ERROR
    x0, y0, x1, y1 = region
    assert diff[y0:y1, x0:x1].mean() <= ASTRONAUT_MEAN_ERROR


@pytest.mark.parametrize("size", [112, 128, 256])
def test_unmodified_paste_round_trip_on_smooth_image(size: int) -> None:
    image = _smooth_image()
    for landmarks in (_landmark_sets()[i] for i in (0, 1, 3)):  # faces well inside the canvas
        affine = geometry.estimate_alignment(landmarks, size)
        crop = geometry.warp_to_crop(image, affine, size)
        pasted = geometry.paste_back(image, crop, affine, crop_mask(size, MaskConfig()))
        diff = np.abs(pasted.astype(np.int16) - image)
        assert not _outside(diff, geometry.crop_region(affine, size, image.shape[:2])).any()
        assert diff.max() <= 2


def _full_frame_reference(canvas: np.ndarray, crop: np.ndarray, affine: np.ndarray, mask: np.ndarray):
    """insightface-style paste: warp crop and mask over the whole frame (test oracle only)."""
    inverse = cv2.invertAffineTransform(affine)
    size = (canvas.shape[1], canvas.shape[0])  # (width, height)
    warped = cv2.warpAffine(crop, inverse, size, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    weight = cv2.warpAffine(mask, inverse, size)[:, :, None]  # HxW -> HxWx1 over B, G, R
    blended = canvas * (1 - weight) + warped * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("centre", "crop_px", "degrees"),
    [
        ((256.0, 256.0), 300.0, 35.0),  # rotated face
        ((20.0, 30.0), 260.0, 0.0),  # touches the top-left corner: ROI clipped
        ((500.0, 250.0), 200.0, -60.0),  # half off the right edge, rotated
        ((-400.0, 100.0), 150.0, 0.0),  # entirely off the canvas
    ],
)
def test_paste_changes_only_the_roi(centre: tuple[float, float], crop_px: float, degrees: float) -> None:
    image = _astronaut()
    affine = geometry.estimate_alignment(_face_landmarks(centre, crop_px, degrees), 128)
    crop = 255 - geometry.warp_to_crop(_smooth_image(), affine, 128)  # clearly different content
    crop[:] = np.where(crop.sum(axis=2, keepdims=True) == 765, 40, crop)  # off-canvas black -> visible
    mask = crop_mask(128, MaskConfig(shape="box", blur=0.05))
    pasted = geometry.paste_back(image, crop, affine, mask)
    region = geometry.crop_region(affine, 128, image.shape[:2])
    x0, y0, x1, y1 = region
    assert 0 <= x0 <= x1 <= 512 and 0 <= y0 <= y1 <= 512
    diff = np.abs(pasted.astype(np.int16) - image)
    assert not _outside(diff, region).any()
    # the ROI paste equals a whole-frame paste, pixel for pixel (within fixed-point rounding)
    assert np.abs(pasted.astype(np.int16) - _full_frame_reference(image, crop, affine, mask)).max() <= 1
    if x1 > x0:
        assert (diff.max(axis=2) > 20).sum() > 0.2 * (x1 - x0) * (y1 - y0)


def test_crop_region_is_tight_and_clipped() -> None:
    affine = geometry.estimate_alignment(_face_landmarks((256.0, 256.0), 300.0, 45.0), 128)
    sharp_box = crop_mask(128, MaskConfig(shape="box", blur=0.0))  # > 0 on all but the border pixels
    footprint = cv2.warpAffine(sharp_box, cv2.invertAffineTransform(affine), (512, 512))  # HxW full frame
    ys, xs = np.nonzero(footprint)  # every canvas pixel a paste can change
    x0, y0, x1, y1 = geometry.crop_region(affine, 128, (512, 512), pad=0)
    assert x0 <= xs.min() and y0 <= ys.min() and x1 > xs.max() and y1 > ys.max()
    assert xs.min() - x0 <= 3 and ys.min() - y0 <= 3 and x1 - xs.max() <= 4 and y1 - ys.max() <= 4
    assert (x1 - x0) == pytest.approx(300 * np.sqrt(2), abs=5)  # a square turned 45 degrees
    wide = geometry.crop_region(affine, 128, (10_000, 10_000))
    clipped = geometry.crop_region(affine, 128, (200, 300))  # (height, width)
    assert clipped == (wide[0], wide[1], 300, 200)
    assert geometry.crop_region(affine, 128, (40, 40)) == (40, 40, 40, 40)  # face entirely below-right


def test_paste_back_never_warps_the_whole_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[tuple[int, int]] = []
    real_warp = cv2.warpAffine

    def counting_warp(src, matrix, dsize, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(tuple(dsize))
        return real_warp(src, matrix, dsize, *args, **kwargs)

    monkeypatch.setattr(geometry.cv2, "warpAffine", counting_warp)
    rois = []
    for side in (1024, 4096):
        canvas = np.zeros((side, side, 3), np.uint8)
        affine = geometry.estimate_alignment(_face_landmarks((side / 2, side / 2), 350.0, 20.0), 128)
        crop = np.full((128, 128, 3), 200, np.uint8)
        mask = crop_mask(128, MaskConfig())
        sizes.clear()
        pasted = geometry.paste_back(canvas, crop, affine, mask)
        x0, y0, x1, y1 = geometry.mask_region(affine, mask, canvas.shape[:2])
        assert sizes == [(x1 - x0, y1 - y0)] * 2  # the crop and its mask, each warped into the ROI only
        assert pasted[y0:y1, x0:x1].any() and not _outside(pasted, (x0, y0, x1, y1)).any()
        rois.append((x1 - x0, y1 - y0))
    assert rois[0] == rois[1] and max(rois[0]) < 350 * 1.4  # work follows the face, not the canvas


@pytest.mark.parametrize("settings", [MaskConfig(), MaskConfig("box", 0.1, 0.05), MaskConfig("ellipse", 0.2)])
@pytest.mark.parametrize("index", range(5))
def test_mask_region_holds_every_pixel_a_paste_can_change(settings: MaskConfig, index: int) -> None:
    affine = geometry.estimate_alignment(_landmark_sets()[index], 128)
    mask = crop_mask(128, settings)
    footprint = cv2.warpAffine(mask, cv2.invertAffineTransform(affine), (512, 512))  # HxW full frame
    ys, xs = np.nonzero(footprint)  # every canvas pixel a paste through this mask can change
    x0, y0, x1, y1 = geometry.mask_region(affine, mask, (512, 512))
    square = geometry.crop_region(affine, 128, (512, 512))
    assert square[0] <= x0 <= x1 <= square[2] and square[1] <= y0 <= y1 <= square[3]  # never beyond the crop
    if len(xs):
        assert x0 <= xs.min() and y0 <= ys.min() and x1 > xs.max() and y1 > ys.max()


def test_mask_region_follows_the_mask_not_the_crop_square() -> None:
    affine = geometry.estimate_alignment(_face_landmarks((256.0, 256.0), 300.0), 128)
    square = geometry.crop_region(affine, 128, (512, 512))
    oval = geometry.mask_region(affine, crop_mask(128, MaskConfig()), (512, 512))
    assert (oval[2] - oval[0]) < 0.9 * (square[2] - square[0])  # an upright oval spans 85% of the width
    assert geometry.mask_region(affine, np.zeros((128, 128), np.float32), (512, 512)) == (0, 0, 0, 0)
    # a mask nonzero on the crop's border reaches one crop px (here ~2.3 canvas px) beyond the square
    full = geometry.mask_region(affine, np.ones((128, 128), np.float32), (512, 512))
    assert full[0] < square[0] and full[2] > square[2]


def test_paste_back_matches_a_whole_frame_paste_with_a_mask_nonzero_to_its_edge() -> None:
    image = _astronaut()
    affine = geometry.estimate_alignment(_face_landmarks((256.0, 240.0), 260.0, 15.0), 128)
    crop = 255 - geometry.warp_to_crop(_smooth_image(), affine, 128)
    mask = np.ones((128, 128), np.float32)  # weight right up to the crop's edge: bilinear reaches past it
    pasted = geometry.paste_back(image, crop, affine, mask)
    reference = _full_frame_reference(image, crop, affine, mask)
    assert np.abs(pasted.astype(np.int16) - reference).max() <= 1
    assert not _outside(
        np.abs(pasted.astype(np.int16) - image), geometry.mask_region(affine, mask, (512, 512))
    ).any()


def test_paste_back_is_byte_identical_to_a_three_channel_warp_and_blend() -> None:
    # the crop is warped with a padding alpha plane (OpenCV vectorises 4 channels only): same bytes as 3
    image = _astronaut()
    for landmarks in _landmark_sets():
        affine = geometry.estimate_alignment(landmarks, 128)
        crop = 255 - geometry.warp_to_crop(_smooth_image(), affine, 128)
        mask = crop_mask(128, MaskConfig())
        x0, y0, x1, y1 = geometry.mask_region(affine, mask, image.shape[:2])
        to_roi = cv2.invertAffineTransform(affine)
        to_roi[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)  # (width, height)
        warped = cv2.warpAffine(crop, to_roi, size, borderMode=cv2.BORDER_REPLICATE)  # 3 channels
        weight = cv2.warpAffine(mask, to_roi, size, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        expected = image.copy()
        expected[y0:y1, x0:x1] = cv2.blendLinear(warped, image[y0:y1, x0:x1], weight, 1.0 - weight)
        np.testing.assert_array_equal(geometry.paste_back(image, crop, affine, mask), expected)


def test_paste_back_in_place_changes_and_returns_the_callers_canvas() -> None:
    image = _astronaut()
    crop, affine = _face_crop_of(image)
    swapped = 255 - crop
    mask = crop_mask(128, MaskConfig())
    copied = geometry.paste_back(image, swapped, affine, mask)
    target = image.copy()
    returned = geometry.paste_back(target, swapped, affine, mask, inplace=True)
    assert returned is target and copied is not image
    np.testing.assert_array_equal(returned, copied)
    assert not np.array_equal(copied, image)
    untouched = image.copy()
    empty = np.zeros((128, 128), np.float32)
    assert geometry.paste_back(untouched, swapped, affine, empty, inplace=True) is untouched
    np.testing.assert_array_equal(untouched, image)  # an all-zero mask changes nothing


def _face_crop_of(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine = geometry.estimate_alignment(ASTRONAUT_LANDMARKS, 128)
    return geometry.warp_to_crop(image, affine, 128), affine


def test_rescale_affine_matches_an_upscaled_crop() -> None:
    # A linear ramp survives bilinear warps and resizes exactly, so any misplacement shows as an offset.
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)
    ramp = np.stack([3 * xx + 2 * yy, 5 * xx, 7 * yy], axis=-1)  # HxWx3 float32, three planes stacked last
    affine = geometry.estimate_alignment(ASTRONAUT_LANDMARKS, 128)
    upscaled = cv2.resize(
        geometry.warp_to_crop(ramp, affine, 128), (512, 512), interpolation=cv2.INTER_LINEAR
    )
    inner = (slice(16, -16), slice(16, -16))
    exact = geometry.warp_to_crop(ramp, geometry.rescale_affine(affine, 4), 512)
    naive = geometry.warp_to_crop(ramp, affine * 4, 512)
    assert np.abs(exact - upscaled)[inner].max() < 0.05
    assert np.abs(naive - upscaled)[inner].max() > 1.0


def test_paste_back_rejects_mismatched_inputs() -> None:
    canvas = np.zeros((64, 64, 3), np.uint8)
    crop = np.zeros((32, 32, 3), np.uint8)
    affine = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    with pytest.raises(InputError):
        geometry.paste_back(canvas, crop, affine, np.ones((16, 16), np.float32))
    with pytest.raises(InputError):
        geometry.paste_back(canvas, crop[:, :20], affine, np.ones((32, 20), np.float32))
    with pytest.raises(InputError):
        geometry.paste_back(canvas, crop, np.zeros((2, 3)), np.ones((32, 32), np.float32))
