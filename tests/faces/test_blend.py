"""Crop-space masks, Reinhard colour matching (YCbCr) and the blend that pastes a swapped face back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from studio import geometry
from studio.config import MaskConfig
from studio.errors import ConfigError, InputError
from studio.faces.blend import blend_face, colour_stats, crop_mask, match_colour

# Eileen Collins' pupils, nose tip, mouth corners in skimage.data.astronaut(), (x, y) px; see test_geometry.
ASTRONAUT_LANDMARKS = np.array(
    [[204.5, 101.5], [245.5, 103.5], [224.0, 127.0], [205.5, 141.5], [244.5, 142.5]], dtype=np.float32
)


def _astronaut() -> np.ndarray:
    return skimage.data.astronaut()[:, :, ::-1].copy()  # HxWx3 RGB -> BGR (reverse the channel axis)


def _smooth_image() -> np.ndarray:
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)  # HxW row and column indices
    planes = [127 + 100 * np.sin(xx / 60) * np.cos(yy / 80), 127 + 90 * np.cos((xx + yy) / 90), 60 + 0.3 * xx]
    return np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)  # 3 x HxW -> HxWx3 BGR


def _face_crop(image: np.ndarray, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    affine = geometry.estimate_alignment(ASTRONAUT_LANDMARKS, size)
    return geometry.warp_to_crop(image, affine, size), affine


def _lab_stats(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_BGR2LAB).reshape(-1, 3)  # HxWx3 -> (H*W, 3)
    weights = mask.reshape(-1).astype(np.float64)  # HxW -> (H*W,)
    mean = weights @ lab / weights.sum()
    return mean, np.sqrt(weights @ (lab - mean) ** 2 / weights.sum())


# crop_mask


@pytest.mark.parametrize("size", [112, 128, 256, 512])
@pytest.mark.parametrize("settings", [MaskConfig(), MaskConfig("box"), MaskConfig("ellipse", 0.1, 0.3)])
def test_crop_mask_is_zero_on_the_border_and_one_in_the_centre(size: int, settings: MaskConfig) -> None:
    mask = crop_mask(size, settings)
    assert mask.shape == (size, size) and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1]):
        assert not edge.any()
    centre = size // 2
    assert (mask[centre - 1 : centre + 1, centre - 1 : centre + 1] == 1.0).all()


@pytest.mark.parametrize("shape", ["box", "ellipse"])
def test_crop_mask_feathers_monotonically(shape: str) -> None:
    mask = crop_mask(128, MaskConfig(shape=shape, blur=0.2))  # type: ignore[arg-type]
    for ray in (mask[64, :65], mask[:65, 64], np.diagonal(mask)[:65], mask[64, 127:62:-1]):
        assert (np.diff(ray) >= 0).all()
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 1000  # a real feather, not a hard edge


def test_crop_mask_shapes_padding_and_blur_differ() -> None:
    ellipse, box = crop_mask(128, MaskConfig("ellipse")), crop_mask(128, MaskConfig("box"))
    assert box[20, 20] == 1.0 and ellipse[20, 20] == 0.0  # the ellipse leaves the corners out
    assert np.abs(box - ellipse).mean() > 0.1
    assert ellipse[64, 5] == 0.0 and ellipse[5, 64] > 0.0  # the oval is narrower than tall
    padded = crop_mask(128, MaskConfig("box", padding=0.2))
    assert not padded[:, :26].any() and not padded[:26].any() and padded[64, 64] == 1.0
    hard, soft = crop_mask(128, MaskConfig("box", blur=0.0)), crop_mask(128, MaskConfig("box", blur=0.3))
    assert hard[1:-1, 1:-1].min() == 1.0 and soft[1:-1, 1:-1].mean() < 0.85


def test_crop_mask_is_cached_and_read_only() -> None:
    first = crop_mask(128, MaskConfig())
    assert crop_mask(128, MaskConfig(shape="ellipse", padding=0.0, blur=0.1)) is first
    assert crop_mask(256, MaskConfig()) is not first
    with pytest.raises(ValueError, match="read-only"):
        first[64, 64] = 0.0


@pytest.mark.parametrize(
    "kwargs", [{"shape": "circle"}, {"padding": 0.5}, {"padding": -0.1}, {"blur": 0.6}, {"blur": -0.01}]
)
def test_mask_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"refine.mask.{next(iter(kwargs))} has value"):
        MaskConfig(**kwargs)  # type: ignore[arg-type]


def test_crop_mask_rejects_a_crop_with_no_face_area() -> None:
    with pytest.raises(InputError):
        crop_mask(16, MaskConfig(padding=0.45))


# match_colour


def _shifted(image: np.ndarray, shift: tuple[float, float, float], scale: float) -> np.ndarray:
    lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_BGR2LAB)  # HxWx3 BGR -> L, a, b float32
    lab = (lab - lab.mean(axis=(0, 1))) * scale + lab.mean(axis=(0, 1)) + np.float32(shift)
    bgr = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)  # HxWx3 L, a, b -> B, G, R float in [0, 1]
    return np.clip(np.rint(bgr * 255), 0, 255).astype(np.uint8)


def test_match_colour_brings_source_to_target_statistics() -> None:
    target, _ = _face_crop(_astronaut())
    source = _shifted(target, (-12.0, 9.0, -7.0), 0.7)
    mask = crop_mask(128, MaskConfig())
    before_mean, before_std = _lab_stats(source, mask)
    target_mean, target_std = _lab_stats(target, mask)
    assert np.abs(before_mean - target_mean).max() > 6 and np.abs(before_std - target_std).max() > 3
    matched = match_colour(source, target, mask)
    assert matched.shape == source.shape and matched.dtype == np.uint8
    matched_mean, matched_std = _ycc_stats(matched, mask)  # the statistics it moves: exact in YCbCr
    goal_mean, goal_std = _ycc_stats(target, mask)
    assert np.abs(matched_mean - goal_mean).max() < 0.5 and np.abs(matched_std - goal_std).max() < 0.5
    # and perceptually: the LAB statistics land on the target's too
    after_mean, after_std = _lab_stats(matched, mask)
    assert np.abs(after_mean - target_mean).max() < 1.0
    assert np.abs(after_std - target_std).max() < 1.0
    # structure kept: the transfer is affine per channel, so luminance stays perfectly correlated
    source_l = cv2.cvtColor(source, cv2.COLOR_BGR2LAB)[:, :, 0].ravel().astype(np.float64)  # HxW L plane
    matched_l = cv2.cvtColor(matched, cv2.COLOR_BGR2LAB)[:, :, 0].ravel().astype(np.float64)
    assert np.corrcoef(source_l, matched_l)[0, 1] > 0.995


# BT.601 full-range YCbCr (JPEG's), written out plainly: Y, Cb, Cr from R, G, B
def _ycc_float64(image: np.ndarray) -> np.ndarray:
    b, g, r = (image[:, :, k].astype(np.float64) for k in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, (b - y) * 0.564 + 128, (r - y) * 0.713 + 128], axis=-1)  # HxWx3 Y, Cb, Cr


def _bgr_float64(ycc: np.ndarray) -> np.ndarray:
    y, cb, cr = ycc[:, :, 0], ycc[:, :, 1] - 128, ycc[:, :, 2] - 128
    r, b = y + cr / 0.713, y + cb / 0.564
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.stack([b, g, r], axis=-1)  # HxWx3 B, G, R


def _ycc_stats(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ycc = _ycc_float64(image).reshape(-1, 3)  # HxWx3 -> (H*W, 3)
    weights = mask.reshape(-1).astype(np.float64)  # HxW -> (H*W,)
    mean = weights @ ycc / weights.sum()
    return mean, np.sqrt(weights @ (ycc - mean) ** 2 / weights.sum())


def _reinhard_float64(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reinhard transfer in YCbCr written plainly in float64, pixel by pixel (test oracle for the closed-form
    colour matrix)."""
    (source_mean, source_std), (target_mean, target_std) = (_ycc_stats(i, mask) for i in (source, target))
    ratio = np.clip(target_std / source_std, 0.25, 4.0)
    matched = (_ycc_float64(source) - source_mean) * ratio + target_mean  # HxWx3 Y, Cb, Cr
    return np.clip(np.rint(_bgr_float64(matched)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("shift", "scale"), [((-12.0, 9.0, -7.0), 0.7), ((20.0, -15.0, 10.0), 1.6)])
def test_match_colour_is_within_a_level_of_a_float64_ycbcr_transfer(
    shift: tuple[float, float, float], scale: float
) -> None:
    target, _ = _face_crop(_astronaut())
    source = _shifted(target, shift, scale)
    for mask in (crop_mask(128, MaskConfig()), crop_mask(128, MaskConfig("box", 0.1, 0.3))):
        matched = match_colour(source, target, mask)
        assert np.abs(matched.astype(np.int16) - _reinhard_float64(source, target, mask)).max() <= 1


def test_match_colour_weights_by_the_mask() -> None:
    target = np.zeros((64, 64, 3), np.uint8)
    target[:, :32] = (40, 60, 200)  # left half red-ish: the only part inside the mask
    target[:, 32:] = (200, 200, 200)
    source = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0
    matched = match_colour(source, target, mask)
    assert np.abs(matched.astype(np.int16) - (40, 60, 200)).max() <= 2  # flat source: shifted, not scaled


def test_match_colour_with_an_empty_mask_returns_the_source() -> None:
    target, _ = _face_crop(_astronaut())
    source = _shifted(target, (5.0, 5.0, 5.0), 1.0)
    matched = match_colour(source, target, np.zeros((128, 128), np.float32))
    assert matched is not source
    np.testing.assert_array_equal(matched, source)


def test_match_colour_rejects_mismatched_sizes() -> None:
    crop = np.zeros((128, 128, 3), np.uint8)
    with pytest.raises(InputError):
        match_colour(crop, crop[:64, :64], np.ones((128, 128), np.float32))
    with pytest.raises(InputError):
        match_colour(crop, crop, np.ones((64, 64), np.float32))


# blend_face


def test_blend_face_with_an_unchanged_face_changes_almost_nothing() -> None:
    image = _smooth_image()
    crop, affine = _face_crop(image)
    blended = blend_face(image, crop, affine, MaskConfig(), original_crop=crop)
    assert np.abs(blended.astype(np.int16) - image).max() <= 2
    plain = geometry.paste_back(image, crop, affine, crop_mask(128, MaskConfig()))
    assert np.abs(blended.astype(np.int16) - plain).max() <= 1  # identity colour match is a no-op


def test_blend_face_colour_matches_a_tinted_swap() -> None:
    image = _astronaut()
    crop, affine = _face_crop(image)
    tinted = _shifted(crop, (8.0, -10.0, 15.0), 1.0)
    x0, y0, x1, y1 = geometry.crop_region(affine, 128, image.shape[:2])

    def roi_error(result: np.ndarray) -> float:
        return float(np.abs(result[y0:y1, x0:x1].astype(np.int16) - image[y0:y1, x0:x1]).mean())

    raw = blend_face(image, tinted, affine, MaskConfig(), original_crop=crop, colour_match=False)
    matched = blend_face(image, tinted, affine, MaskConfig(), original_crop=crop)
    assert roi_error(raw) > 5.0 and roi_error(matched) < 2.5
    assert np.array_equal(blend_face(image, tinted, affine, MaskConfig()), raw)  # no reference, no match


def test_blend_face_mask_leaves_masked_out_pixels_untouched_alpha_and_poisson() -> None:
    image = _astronaut()
    crop, affine = _face_crop(image)
    mask = np.array(crop_mask(crop.shape[0], MaskConfig()))
    mask[:, : crop.shape[1] // 2] = 0.0  # the left half of the face is hidden (an occluder)
    swapped = np.full_like(crop, 255)
    for poisson in (False, True):
        blended = blend_face(image, swapped, affine, MaskConfig(), mask=mask, poisson=poisson)
        hidden = np.zeros(crop.shape[:2], np.float32)
        hidden[:, : crop.shape[1] // 2 - 1] = 1.0  # a px inside the hidden half, clear of the bilinear edge
        reach = cv2.warpAffine(hidden, cv2.invertAffineTransform(affine), image.shape[1::-1]) > 0.999
        assert reach.sum() > 1000
        np.testing.assert_array_equal(blended[reach], image[reach])
        assert (blended != image).any(axis=2).sum() > 1000  # the visible half changed
    with pytest.raises(InputError):
        blend_face(image, swapped, affine, MaskConfig(), mask=mask[:64])


def test_blend_face_strength_mixes_and_zero_changes_nothing() -> None:
    image = _smooth_image()
    crop, affine = _face_crop(image)
    swapped = np.full_like(crop, 255)
    full = blend_face(image, swapped, affine, MaskConfig(), colour_match=False).astype(int)
    half = blend_face(image, swapped, affine, MaskConfig(), colour_match=False, strength=0.5).astype(int)
    np.testing.assert_array_equal(blend_face(image, swapped, affine, MaskConfig(), strength=0.0), image)
    changed = full != image
    assert np.abs(half - (image + full) / 2)[changed].max() <= 1.0
    with pytest.raises(InputError):
        blend_face(image, swapped, affine, MaskConfig(), strength=1.5)


def test_blend_face_poisson_takes_the_canvas_colours_at_the_edge() -> None:
    image = _smooth_image()
    crop, affine = _face_crop(image)
    flat = np.full_like(crop, 250)  # a flat bright face: Poisson keeps its (zero) gradients, not its colour
    alpha = blend_face(image, flat, affine, MaskConfig(), colour_match=False)
    poisson = blend_face(image, flat, affine, MaskConfig(), colour_match=False, poisson=True)
    centre = tuple(
        int(v) for v in cv2.transform(np.array([[[63.5, 63.5]]]), cv2.invertAffineTransform(affine))[0, 0]
    )
    assert alpha[centre[1], centre[0]].min() >= 240
    assert np.abs(poisson[centre[1], centre[0]].astype(int) - image[centre[1], centre[0]]).max() < 60


def test_precomputed_colour_stats_match_the_reference_crop() -> None:
    image = _astronaut()
    crop, _ = _face_crop(image)
    tinted = np.clip(crop.astype(int) + np.array([40, -20, 10]), 0, 255).astype(np.uint8)
    mask = crop_mask(crop.shape[0], MaskConfig())
    np.testing.assert_array_equal(
        match_colour(tinted, crop, mask), match_colour(tinted, colour_stats(crop, mask), mask)
    )
    assert colour_stats(crop, np.zeros_like(mask)) is None


def test_blend_face_pastes_an_upscaled_crop() -> None:
    image = _smooth_image()
    crop, affine = _face_crop(image)
    upscaled = cv2.resize(crop, (512, 512), interpolation=cv2.INTER_CUBIC)
    blended = blend_face(
        image, upscaled, geometry.rescale_affine(affine, 4), MaskConfig(), original_crop=crop
    )
    assert np.abs(blended.astype(np.int16) - image).max() <= 3
    region = geometry.crop_region(geometry.rescale_affine(affine, 4), 512, image.shape[:2])
    assert region == pytest.approx(geometry.crop_region(affine, 128, image.shape[:2]), abs=1)


def test_blend_face_in_place_changes_and_returns_the_callers_canvas() -> None:
    image = _astronaut()
    crop, affine = _face_crop(image)
    tinted = _shifted(crop, (8.0, -10.0, 15.0), 1.0)
    copied = blend_face(image, tinted, affine, MaskConfig(), original_crop=crop)
    target = image.copy()
    returned = blend_face(target, tinted, affine, MaskConfig(), original_crop=crop, inplace=True)
    assert returned is target and copied is not image
    np.testing.assert_array_equal(returned, copied)
    assert not np.array_equal(copied, image)


def test_blend_face_rejects_a_non_square_crop() -> None:
    image = _smooth_image()
    crop, affine = _face_crop(image)
    with pytest.raises(InputError):
        blend_face(image, crop[:, :100], affine, MaskConfig())
