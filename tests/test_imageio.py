"""Tests for studio.imageio: every way an image enters or leaves the studio."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile, PngImagePlugin

from studio import imageio
from studio.errors import ConfigError, ImageError
from studio.imageio import (
    ALLOWED_FORMATS,
    ImageMetadata,
    format_parameters,
    from_pil,
    parse_parameters,
    read_image,
    read_metadata,
    to_pil,
    write_image,
)

A1111_TEXT = (
    "masterpiece, portrait of a woman\nNegative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 6ce0161689"
)


def _gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth HxWx3 uint8 BGR test picture (lossy codecs keep it within a few levels)."""
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    bgr = np.stack([rows + 0 * cols, 0 * rows + cols, (rows + cols) / 2], axis=-1)  # HxWx3 B, G, R
    return bgr.round().astype(np.uint8)


def _noise(height: int = 96, width: int = 128) -> np.ndarray:
    """Incompressible HxWx3 uint8 picture, so half a file is missing real pixel data."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save_pil(path: Path, image: Image.Image, image_format: str, **options: object) -> Path:
    image.save(path, format=image_format, **options)
    return path


# --- formats accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tolerance"), [("a.png", 0.0), ("a.jpg", 3.0), ("a.jpeg", 3.0), ("a.webp", 3.0)]
)
def test_round_trip_every_allowed_format(tmp_path: Path, name: str, tolerance: float) -> None:
    picture = _gradient()
    written = write_image(tmp_path / name, picture)
    assert written == tmp_path / name
    back = read_image(written)
    assert back.shape == picture.shape and back.dtype == np.uint8
    assert back.flags["C_CONTIGUOUS"]
    assert np.abs(back.astype(int) - picture.astype(int)).mean() <= tolerance


def test_colour_order_is_bgr(tmp_path: Path) -> None:
    _save_pil(tmp_path / "red.png", Image.new("RGB", (4, 3), (255, 0, 0)), "PNG")
    assert read_image(tmp_path / "red.png")[0, 0].tolist() == [0, 0, 255]  # B, G, R


def test_multi_picture_jpeg_reads_first_picture(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    path = _save_pil(tmp_path / "camera.jpg", first, "MPO", save_all=True, append_images=[second])
    assert Image.open(path).format == "MPO"
    assert read_image(path)[3, 4].tolist() == pytest.approx([0, 0, 254], abs=3)


def test_format_decided_by_content_not_extension(tmp_path: Path) -> None:
    path = _save_pil(tmp_path / "actually_jpeg.png", to_pil(_gradient()), "JPEG")
    assert read_image(path).shape == (48, 64, 3)


# --- inputs rejected ------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_format", "mode"), [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB")])
def test_other_formats_rejected_naming_detected_and_allowed(
    tmp_path: Path, image_format: str, mode: str
) -> None:
    path = _save_pil(tmp_path / "picture.png", Image.new(mode, (8, 8)), image_format)  # misleading name
    with pytest.raises(ImageError) as caught:
        read_image(path)
    assert f"a {image_format} image" in str(caught.value)
    assert "PNG, JPEG, WEBP" in str(caught.value)


def test_text_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, this is not a picture\n")
    with pytest.raises(ImageError, match="not an image Pillow recognises"):
        read_image(path)


def test_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        read_image(tmp_path / "nope.png")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="Cannot open"):
        read_image(tmp_path)


def test_pixel_cap_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "big.png", _gradient(30, 40))

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded before the cap was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as caught:
        read_image(path, max_pixels=1000)
    message = str(caught.value)
    assert "40x30" in message and "1,200" in message and "1,000" in message
    assert "images.max_pixels" in message


def test_pixel_cap_allows_image_at_the_cap(tmp_path: Path) -> None:
    path = write_image(tmp_path / "ok.png", _gradient(30, 40))
    assert read_image(path, max_pixels=1200).shape == (30, 40, 3)


@pytest.mark.parametrize("bad_cap", [0, -5, 1.5, True])
def test_bad_cap_value(tmp_path: Path, bad_cap: object) -> None:
    path = write_image(tmp_path / "ok.png", _gradient())
    with pytest.raises(ConfigError, match=r"images\.max_pixels"):
        read_image(path, max_pixels=bad_cap)  # type: ignore[arg-type]


def test_pillow_decompression_bomb_error_becomes_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(tmp_path / "bomb.png", _gradient(30, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow errors above 2x this
    with pytest.raises(ImageError, match="decompression bomb"):
        read_image(path)


def test_pillow_decompression_bomb_warning_as_error_becomes_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(tmp_path / "bomb.png", _gradient(30, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px: warning, not error
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="decompression bomb"):
            read_image(path)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.webp"])
def test_truncated_files_rejected(tmp_path: Path, name: str) -> None:
    whole = write_image(tmp_path / name, _noise()).read_bytes()
    cut = tmp_path / f"half_{name}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- orientation and modes ------------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (20, 10), (255, 0, 0))  # 20 wide, 10 high: left red, right blue
    stored.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display rotated 90 degrees clockwise
    path = _save_pil(tmp_path / "rotated.jpg", stored, "JPEG", exif=exif, quality=95)
    upright = read_image(path)
    assert upright.shape == (20, 10, 3)  # transposed
    assert upright[1, 5].tolist() == pytest.approx([0, 0, 254], abs=3)  # top is the red half (BGR)
    assert upright[18, 5].tolist() == pytest.approx([254, 0, 0], abs=3)  # bottom is blue


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save_pil(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    assert Image.open(path).mode == "CMYK"
    pixel = read_image(path)[4, 4]
    assert pixel.tolist() == pytest.approx([0, 0, 255], abs=4)  # red in BGR


def test_sixteen_bit_png_scaled(tmp_path: Path) -> None:
    grey16 = np.array([[0, 65535], [257 * 100, 1000]], dtype=np.uint16)
    path = _save_pil(tmp_path / "deep.png", Image.fromarray(grey16), "PNG")
    assert Image.open(path).mode.startswith("I;16")
    back = read_image(path)
    assert back.shape == (2, 2, 3)
    assert back[:, :, 0].tolist() == [[0, 255], [100, 4]]
    assert (back[:, :, 0] == back[:, :, 2]).all()


def test_mode_i_scaled_like_sixteen_bit() -> None:
    image = Image.fromarray(np.array([[65535, 70000, -5]], dtype=np.int32))  # mode I
    assert from_pil(image)[0, :, 1].tolist() == [255, 255, 0]


def test_palette_with_transparency_over_white(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 1), 1)
    path = _save_pil(tmp_path / "palette.png", palette, "PNG", transparency=0)  # index 0 transparent
    back = read_image(path)
    assert back[0, 0].tolist() == [255, 255, 255]
    assert back[1, 1].tolist() == [0, 255, 0]


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # HxWx4 RGBA
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (10, 20, 30, 255)
    rgba[1, 0] = (0, 0, 0, 128)
    path = _save_pil(tmp_path / "alpha.png", Image.fromarray(rgba), "PNG")
    back = read_image(path)
    assert back[0, 0].tolist() == [255, 255, 255]
    assert back[0, 1].tolist() == [30, 20, 10]  # BGR
    assert back[1, 0].tolist() == [127, 127, 127]


def test_la_image(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (100, 0))
    back = read_image(_save_pil(tmp_path / "la.png", la, "PNG"))
    assert back[0].tolist() == [[100, 100, 100], [255, 255, 255]]


def test_one_bit_image(tmp_path: Path) -> None:
    bits = Image.new("1", (3, 1), 0)
    bits.putpixel((1, 0), 1)
    back = read_image(_save_pil(tmp_path / "bits.png", bits, "PNG"))
    assert back.shape == (1, 3, 3)
    assert back[0, :, 0].tolist() == [0, 255, 0]


def test_non_ascii_path_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "porträt_画像" / "porträt_画像.png"
    write_image(path, _gradient(), parameters="ü")
    assert np.array_equal(read_image(path), _gradient())
    assert read_metadata(path).parameters == "ü"


# --- writing --------------------------------------------------------------------------------------


def test_failed_write_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "out.png", _gradient())
    before = path.read_bytes()

    def broken_encoder(image: Image.Image, handle: io.BufferedWriter, filename: str | bytes) -> None:
        handle.write(b"\x89PNG partial data")
        raise OSError("encoder crashed midway")

    monkeypatch.setitem(Image.SAVE, "PNG", broken_encoder)
    with pytest.raises(ImageError, match="encoder crashed midway"):
        write_image(path, _noise())
    with pytest.raises(ImageError):
        write_image(tmp_path / "new.png", _noise())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp files, no new.png


@pytest.mark.parametrize(
    ("bad", "described"),
    [
        (np.zeros((4, 4), np.uint8), "shape (4, 4)"),
        (np.zeros((4, 4, 4), np.uint8), "shape (4, 4, 4)"),
        (np.zeros((4, 4, 3), np.float32), "dtype float32"),
        (np.zeros((0, 4, 3), np.uint8), "shape (0, 4, 3)"),
        ([[[0, 0, 0]]], "a list"),
    ],
)
def test_bad_arrays_rejected(tmp_path: Path, bad: object, described: str) -> None:
    with pytest.raises(ImageError) as caught:
        write_image(tmp_path / "bad.png", bad)  # type: ignore[arg-type]
    assert described in str(caught.value) and "HxWx3 uint8" in str(caught.value)
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("name", ["out.gif", "out.bmp", "out", "out.tiff"])
def test_unknown_extension_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ImageError) as caught:
        write_image(tmp_path / name, _gradient())
    assert ".png, .jpg, .jpeg, .webp" in str(caught.value)


def test_recipe_that_is_not_json_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="recipe cannot be stored as JSON"):
        write_image(tmp_path / "out.png", _gradient(), recipe={"path": Path("x")})
    with pytest.raises(ImageError, match="recipe cannot be stored as JSON"):
        write_image(tmp_path / "out.png", _gradient(), recipe={"cfg": float("nan")})
    assert not (tmp_path / "out.png").exists()


def test_jpeg_metadata_too_long_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="64 KB"):
        write_image(tmp_path / "out.jpg", _gradient(), parameters="x" * 40_000)
    assert list(tmp_path.iterdir()) == []


# --- metadata -------------------------------------------------------------------------------------

RECIPE: dict[str, object] = {
    "prompt": 'Porträt einer Frau, 水彩画 "soft" <light> & shadow',
    "seed": 42,
    "cfg": 7.5,
    "loras": [{"name": "watercolor", "weight": 0.8}],
    "refine": None,
}


def test_png_metadata_round_trip_in_text_chunks(tmp_path: Path) -> None:
    path = write_image(tmp_path / "meta.png", _gradient(), parameters=A1111_TEXT, recipe=RECIPE)
    assert read_metadata(path) == ImageMetadata(parameters=A1111_TEXT, recipe=RECIPE)
    data = path.read_bytes()
    assert b"tEXtparameters\x00masterpiece" in data  # A1111's tEXt chunk
    assert b"iTXtstudio_recipe\x00" in data


def test_png_non_latin1_parameters_round_trip(tmp_path: Path) -> None:
    text = "肖像画, 油絵\nSteps: 30, Seed: 1"
    path = write_image(tmp_path / "meta.png", _gradient(), parameters=text)
    assert read_metadata(path) == ImageMetadata(parameters=text, recipe=None)


@pytest.mark.parametrize("name", ["meta.jpg", "meta.webp"])
def test_jpeg_webp_metadata_round_trip(tmp_path: Path, name: str) -> None:
    parameters = "Porträt 水彩画\n" + A1111_TEXT.split("\n", 1)[1]
    path = write_image(tmp_path / name, _gradient(), parameters=parameters, recipe=RECIPE)
    assert read_metadata(path) == ImageMetadata(parameters=parameters, recipe=RECIPE)
    # A1111/piexif layout: UNICODE prefix + UTF-16-BE in EXIF UserComment
    raw = Image.open(path).getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert raw[:8] == b"UNICODE\x00" and raw[8:].decode("utf-16-be") == parameters


def test_little_endian_user_comment_read(tmp_path: Path) -> None:
    exif = Image.Exif()  # Pillow writes little-endian TIFF
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\x00" + "Steps: 5".encode(
        "utf-16-le"
    )
    path = _save_pil(tmp_path / "le.jpg", to_pil(_gradient()), "JPEG", exif=exif)
    assert read_metadata(path).parameters == "Steps: 5"


def test_metadata_absent(tmp_path: Path) -> None:
    for name in ("plain.png", "plain.jpg", "plain.webp"):
        assert read_metadata(write_image(tmp_path / name, _gradient())) == ImageMetadata(None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ImageMetadata(None, None).parameters = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("stored", "problem"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON list")])
def test_corrupt_recipe_rejected(tmp_path: Path, stored: str, problem: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("studio_recipe", stored)
    path = _save_pil(tmp_path / "bad.png", to_pil(_gradient()), "PNG", pnginfo=info)
    with pytest.raises(ImageError, match=problem):
        read_metadata(path)


def test_read_metadata_rejects_non_images(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("plain text")
    with pytest.raises(ImageError, match=", ".join(ALLOWED_FORMATS)):
        read_metadata(path)


# --- A1111 parameters text ------------------------------------------------------------------------


def test_format_parameters_matches_a1111() -> None:
    settings = {
        "Steps": 30,
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": 7,
        "Seed": 42,
        "Size": "512x768",
        "Model hash": "6ce0161689",
    }
    text = format_parameters("masterpiece, portrait of a woman", "blurry, lowres", settings)
    assert text == A1111_TEXT


def test_format_parameters_omits_empty_negative_and_none_values() -> None:
    text = format_parameters("a cat", "", {"Steps": 20, "VAE": None, "Seed": 1})
    assert text == "a cat\nSteps: 20, Seed: 1"


def test_format_parameters_quotes_values_like_a1111() -> None:
    text = format_parameters("p", "", {"Lora hashes": "style: abc, face: def", "Note": "a\nb", "Seed": 3})
    assert text.split("\n")[-1] == 'Lora hashes: "style: abc, face: def", Note: "a\\nb", Seed: 3'


def test_format_parameters_rejects_unparseable_key() -> None:
    with pytest.raises(ImageError, match="Setting name"):
        format_parameters("p", "", {"bad: key": 1})


def test_parse_parameters_a1111_text() -> None:
    prompt, negative, settings = parse_parameters(A1111_TEXT)
    assert prompt == "masterpiece, portrait of a woman"
    assert negative == "blurry, lowres"
    assert settings == {
        "Steps": "30",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7",
        "Seed": "42",
        "Size": "512x768",
        "Model hash": "6ce0161689",
    }


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("one line", ""),
        ("first line,\nsecond: line\n(third:1.2), [fourth]", "bad hands,\nextra fingers"),
        ("Porträt, 水彩画", "ぼやけた"),
        ("", "only negative"),
        ("a, b", ""),
    ],
)
def test_parameters_round_trip(prompt: str, negative: str) -> None:
    settings = {
        "Steps": 30,
        "Sampler": "DPM++ 2M Karras",
        "Lora hashes": "style: abc, face: def",
        "Note": 'multi\nline "quoted"',
        "Quoted": '"already"',
        "Padded": " spaced ",
        "Empty": "",
        "Seed": 42,
    }
    text = format_parameters(prompt, negative, settings)
    assert parse_parameters(text) == (prompt, negative, {k: str(v) for k, v in settings.items()})


def test_parse_parameters_without_settings_line() -> None:
    assert parse_parameters("just a prompt, nothing else") == ("just a prompt, nothing else", "", {})


def test_parse_parameters_ignores_trailing_blank_lines_and_crlf() -> None:
    prompt, negative, settings = parse_parameters(A1111_TEXT.replace("\n", "\r\n") + "\r\n\r\n")
    assert (prompt, negative, settings["Seed"]) == (
        "masterpiece, portrait of a woman",
        "blurry, lowres",
        "42",
    )


# --- model boundary -------------------------------------------------------------------------------


def test_to_pil_and_from_pil_swap_channels() -> None:
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 255  # blue in BGR
    picture = to_pil(bgr)
    assert picture.mode == "RGB" and picture.size == (3, 2)
    assert picture.getpixel((0, 0)) == (0, 0, 255)
    back = from_pil(picture)
    assert np.array_equal(back, bgr) and back.flags["C_CONTIGUOUS"]


def test_from_pil_normalises_modes_like_read_image() -> None:
    assert from_pil(Image.new("RGBA", (1, 1), (1, 2, 3, 0)))[0, 0].tolist() == [255, 255, 255]
    assert from_pil(Image.new("L", (1, 1), 9))[0, 0].tolist() == [9, 9, 9]


def test_from_pil_rejects_non_images() -> None:
    with pytest.raises(ImageError, match="ndarray"):
        from_pil(np.zeros((2, 2, 3), np.uint8))  # type: ignore[arg-type]


def test_to_pil_rejects_bad_arrays() -> None:
    with pytest.raises(ImageError, match=r"shape \(2, 2, 4\)"):
        to_pil(np.zeros((2, 2, 4), np.uint8))


def test_module_never_uses_cv2_imread() -> None:
    source = Path(imageio.__file__).read_text(encoding="utf-8")
    assert "imread" not in source and "print(" not in source
    assert json.loads(json.dumps(ALLOWED_FORMATS)) == ["PNG", "JPEG", "WEBP"]


@pytest.mark.parametrize(("low", "rgb"), [(0.0, True), (-1.0, True), (-1.0, False)])
def test_planes_to_bgr_rounds_saturates_and_lays_out_bgr_contiguously(low: float, rgb: bool) -> None:
    rng = np.random.default_rng(3)
    planes = rng.uniform(low - 0.2, 1.2, size=(3, 17, 23)).astype(np.float32)  # 3xHxW, some out of range
    picture = imageio.planes_to_bgr(planes, low=low, rgb=rgb)
    levels = np.clip(np.rint((planes.astype(np.float64) - low) * 255.0 / (1.0 - low)), 0, 255)  # 3xHxW
    expected = levels[::-1] if rgb else levels  # B, G, R planes
    assert picture.shape == (17, 23, 3) and picture.dtype == np.uint8 and picture.flags.c_contiguous
    assert np.abs(picture.astype(np.int16) - expected.transpose(1, 2, 0)).max() <= 1  # float32 vs float64
    assert (picture == expected.transpose(1, 2, 0)).mean() > 0.99
    assert picture.min() == 0 and picture.max() == 255  # saturated, never wrapped
    with pytest.raises(ImageError, match="3xHxW"):
        imageio.planes_to_bgr(planes[:2])
