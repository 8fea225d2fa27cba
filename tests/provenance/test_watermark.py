"""The invisible watermark: payload and CRC, embed/decode round trips through PNG, small pictures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from studio.config import ProvenanceConfig, WatermarkMethod
from studio.errors import InputError
from studio.imageio import read_image, write_image
from studio.provenance.watermark import (
    PAYLOAD_BITS,
    Watermarker,
    WatermarkTooSmall,
    is_valid,
    matches,
    payload_for,
    recipe_prefix,
)
from studio.types import ImageBGR

DEFAULT: WatermarkMethod = ProvenanceConfig().watermark_method
RECIPE_ID = hashlib.sha256(b"a recipe").hexdigest()
DCT_METHODS: tuple[WatermarkMethod, ...] = ("dwtDct", "dwtDctSvd")


def picture(name: str, width: int, height: int) -> ImageBGR:
    """A scikit-image sample photo resized to width x height, as HxWx3 uint8 BGR."""
    rgb = getattr(data, name)()  # HxWx3 uint8 RGB
    return np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)[:, :, ::-1])


def png_round_trip(image: ImageBGR, tmp_path: Path) -> ImageBGR:
    """The picture as it comes back from a PNG file the studio wrote."""
    return read_image(write_image(tmp_path / "marked.png", image))


def psnr(a: ImageBGR, b: ImageBGR) -> float:
    """Peak signal-to-noise ratio in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def riva() -> Watermarker:
    """One RivaGAN watermarker (two ONNX sessions) for the module."""
    return Watermarker("rivaGan", ["CPUExecutionProvider"], threads=1)


def watermarker(method: WatermarkMethod, riva: Watermarker) -> Watermarker:
    return riva if method == "rivaGan" else Watermarker(method)


# -- payload ------------------------------------------------------------------------------------------


def test_payload_carries_the_recipe_prefix_and_its_crc() -> None:
    payload = payload_for(RECIPE_ID)
    assert len(payload) * 8 == PAYLOAD_BITS
    assert recipe_prefix(payload) == RECIPE_ID[:6]
    assert matches(payload, RECIPE_ID) and is_valid(payload)
    assert not matches(payload, hashlib.sha256(b"another recipe").hexdigest())
    corrupted = bytes([payload[0] ^ 0x01]) + payload[1:]  # any single-bit error breaks the CRC
    assert not is_valid(corrupted)


def test_random_words_pass_the_crc_about_once_in_256() -> None:
    words = np.random.default_rng(0).integers(0, 256, (20_000, 4), dtype=np.uint8)
    accepted = sum(is_valid(w.tobytes()) for w in words)
    assert 40 < accepted < 120  # 20000 / 256 = 78
    assert not is_valid(bytes(4)) and not is_valid(b"\xff" * 4)  # what flat pictures decode to
    other = hashlib.sha256(b"other").hexdigest()
    assert not any(matches(w.tobytes(), other) for w in words[:1000])


def test_bad_recipe_ids_and_payloads_are_input_errors() -> None:
    with pytest.raises(InputError, match="hex digits"):
        payload_for("xyz123")
    with pytest.raises(InputError, match="4 bytes"):
        recipe_prefix(b"\x00\x01")


# -- embed / decode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*DCT_METHODS, "rivaGan"])
def test_mark_survives_a_png_round_trip(method: WatermarkMethod, riva: Watermarker, tmp_path: Path) -> None:
    side = 256 if method == "rivaGan" else 512  # rivaGan's smallest size: a 512 px frame costs seconds on CPU
    # astronaut: dwtDct loses bits on many photos even unattacked (coffee, chelsea; see the bench)
    image = picture("astronaut", side, side)
    before = image.copy()
    marked = watermarker(method, riva).embed(image, payload_for(RECIPE_ID))
    assert marked.shape == image.shape and marked.dtype == np.uint8
    assert np.array_equal(image, before)  # a new array: the input is untouched
    decoded = watermarker(method, riva).decode(png_round_trip(marked, tmp_path))
    assert decoded is not None and matches(decoded, RECIPE_ID)


def test_tiny_draft_size_carries_the_default_mark(tmp_path: Path) -> None:
    marker = Watermarker(DEFAULT)
    for name in ("astronaut", "coffee", "chelsea"):
        image = picture(name, 64, 64)  # the tiny profile's output size, under imwatermark's 256x256 guard
        decoded = marker.decode(png_round_trip(marker.embed(image, payload_for(RECIPE_ID)), tmp_path))
        assert decoded is not None and recipe_prefix(decoded) == RECIPE_ID[:6]


def test_default_marks_read_back_from_saturated_colours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pure 0 / 255 colours clip the marked U channel on the way back to 8-bit BGR: one pass loses bits
    # (every payload below, without the read-back check), marking the marked picture again restores them
    noise = np.random.default_rng(3).choice([0, 255], (64, 64, 3)).astype(np.uint8)
    marker = Watermarker(DEFAULT)
    for k in range(8):
        recipe_id = hashlib.sha256(f"recipe {k}".encode()).hexdigest()
        decoded = marker.decode(png_round_trip(marker.embed(noise, payload_for(recipe_id)), tmp_path))
        assert decoded is not None and matches(decoded, recipe_id)
    # flat saturated blocks cannot carry a bit at all: said in a warning, never silently
    blocks = np.kron(np.random.default_rng(3).choice([0, 255], (16, 16, 3)), np.ones((4, 4, 1)))
    marker.embed(blocks.astype(np.uint8), payload_for(RECIPE_ID))
    assert "does not read back" in caplog.text


def test_default_mark_is_invisible() -> None:
    image = picture("coffee", 512, 768)
    marked = Watermarker(DEFAULT).embed(image, payload_for(RECIPE_ID))
    assert psnr(image, marked) > 35.0


def test_marks_are_readable_by_invisible_watermark_itself() -> None:
    from imwatermark import WatermarkDecoder

    image = picture("chelsea", 320, 256)
    marked = Watermarker("dwtDctSvd").embed(image, payload_for(RECIPE_ID))
    assert WatermarkDecoder("bytes", PAYLOAD_BITS).decode(marked, "dwtDctSvd") == payload_for(RECIPE_ID)


@pytest.mark.parametrize("method", DCT_METHODS)
def test_unmarked_pictures_decode_to_none(method: WatermarkMethod) -> None:
    marker = Watermarker(method)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        assert marker.decode(picture(name, 256, 256)) is None
    flat = np.full((128, 128, 3), 128, np.uint8)
    assert marker.decode(flat) is None


def test_too_small_pictures_raise_and_decode_to_none(riva: Watermarker) -> None:
    payload = payload_for(RECIPE_ID)
    with pytest.raises(WatermarkTooSmall, match="24x24 px"):
        Watermarker(DEFAULT).embed(np.zeros((24, 24, 3), np.uint8), payload)
    with pytest.raises(WatermarkTooSmall, match="rivaGan needs"):
        riva.embed(picture("astronaut", 64, 64), payload)
    assert Watermarker(DEFAULT).decode(np.zeros((24, 24, 3), np.uint8)) is None
    assert Watermarker("dwtDctSvd").fits(32, 64) and not Watermarker("dwtDctSvd").fits(32, 56)


def test_bad_inputs_are_input_errors() -> None:
    marker = Watermarker(DEFAULT)
    with pytest.raises(InputError, match="HxWx3 uint8"):
        marker.embed(np.zeros((64, 64), np.uint8), payload_for(RECIPE_ID))
    with pytest.raises(InputError, match="4 bytes"):
        marker.embed(np.zeros((64, 64, 3), np.uint8), b"abc")
    with pytest.raises(InputError, match="unknown"):
        Watermarker("lsb")  # type: ignore[arg-type]
