"""The only place images enter or leave the studio.

Reading: format whitelist decided by content, pixel cap checked from the header before decoding, forced
full decode (truncated files raise, never grey-fill), EXIF orientation, every mode normalised to HxWx3
uint8 BGR; transparency is composited over white since every later stage works on opaque colour.
Writing: atomic, with A1111's metadata: PNG ``parameters`` tEXt (iTXt if not Latin-1, as A1111) plus the
recipe JSON in iTXt ``studio_recipe``; JPEG/WEBP: ``parameters`` in EXIF UserComment (``UNICODE`` +
UTF-16-BE in a big-endian TIFF block, as A1111/piexif write it), recipe in XMP ``studio:recipe``.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from studio.errors import ConfigError, ImageError, OutputError
from studio.files import atomic_writer
from studio.types import ImageBGR, ImageRGB

logger = logging.getLogger(__name__)

# 40 MP: above 8K UHD (7680x4320 = 33 MP), below Pillow's decompression-bomb thresholds (warning ~89 MP,
# error ~179 MP), so Pillow never refuses what the default cap accepts. Decoded, 40 MP RGB is ~120 MB.
DEFAULT_MAX_PIXELS: int = 40_000_000
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_QUALITY = 95
_PARAMETERS_KEY = "parameters"
_RECIPE_KEY = "studio_recipe"
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Pillow raises all of these for corrupt or truncated data.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_CAP_FIX = "downscale the image, or raise the cap with the config key images.max_pixels"

_XMP_NS = "urn:portrait-studio:xmp:1.0"
_XMP_RECIPE = re.compile(r'studio:recipe="([^"]*)"')
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"

# One `key: value` item of A1111's settings line; a value is a JSON string or runs to the next comma.
_SETTING = re.compile(r'\s*([^\s,:"][^,:"\n]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*?)\s*(?:,|$)')
_KEY = re.compile(r'[^\s,:"](?:[^,:"\r\n]*[^\s,:"])?')
_NEGATIVE = "Negative prompt:"


@dataclass(frozen=True)
class ImageMetadata:
    """Generation metadata stored in an image by :func:`write_image`."""

    parameters: str | None  # A1111 infotext, see format_parameters
    recipe: dict[str, object] | None  # the full studio recipe


def read_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageBGR:
    """Read a PNG/JPEG/WEBP file as an upright, opaque HxWx3 uint8 BGR array."""
    path = Path(path)
    with _open_file(path) as handle, _open_image(handle, path, max_pixels) as image:
        try:
            image.load()  # full decode now: truncated data raises instead of being grey-filled
            upright = ImageOps.exif_transpose(image)
        except _PILLOW_ERRORS as err:
            raise _corrupt(path, image.format, err) from err
        logger.debug("read %s: %s %s %dx%d", path, image.format, image.mode, *image.size)
    return from_pil(upright)


def write_image(
    path: Path,
    image: ImageBGR,
    *,
    parameters: str | None = None,
    recipe: Mapping[str, object] | None = None,
    exclusive: bool = False,
) -> Path:
    """Write a BGR array atomically as PNG/JPEG/WEBP (by extension) with generation metadata.

    ``exclusive``: FileExistsError rather than replacing an existing file (see ``atomic_writer``).
    """
    # 1. check inputs before anything touches the disk
    path = Path(path)
    image_format = _format_for_extension(path)
    picture = to_pil(image)
    options = _save_options(image_format, parameters, _recipe_json(recipe))
    # 2. encode straight into a temp file that replaces `path` only once complete
    try:
        with atomic_writer(path, exclusive=exclusive) as handle:
            picture.save(handle, format=image_format, **options)
    except (FileExistsError, OutputError):
        raise
    except _PILLOW_ERRORS as err:
        raise ImageError(
            f"Could not write {image_format} image {path}: {err}; the previous file (if any) is unchanged.",
            fix="check free disk space and write permission on the folder; keep metadata under 64 KB "
            "for JPEG.",
        ) from err
    logger.debug("wrote %s (%s, %dx%d)", path, image_format, *picture.size)
    return path


def encode_png(
    image: ImageBGR, *, parameters: str | None = None, recipe: Mapping[str, object] | None = None
) -> bytes:
    """The PNG bytes of a BGR array with generation metadata (what ``write_image`` writes, in memory:
    the output sink signs these bytes before they reach the disk)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG", **_save_options("PNG", parameters, _recipe_json(recipe)))
    return buffer.getvalue()


def read_metadata(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageMetadata:
    """Read back the ``parameters`` text and recipe that :func:`write_image` stored."""
    path = Path(path)
    with _open_file(path) as handle, _open_image(handle, path, max_pixels) as image:
        try:
            if isinstance(image, PngImagePlugin.PngImageFile):
                # .text also finds chunks after the pixel data (may decode the image, hence the cap)
                text = {key: str(value) for key, value in image.text.items()}
                parameters, recipe_text = text.get(_PARAMETERS_KEY), text.get(_RECIPE_KEY)
            else:
                parameters = _read_user_comment(image.getexif())
                recipe_text = _read_xmp_recipe(image.info.get("xmp"))
        except _PILLOW_ERRORS as err:
            raise _corrupt(path, image.format, err) from err
    return ImageMetadata(parameters=parameters, recipe=_parse_recipe(recipe_text, path))


def to_pil(image: ImageBGR) -> Image.Image:
    """Convert an HxWx3 uint8 BGR array to an RGB PIL image (model boundary)."""
    _check_array(image)
    rgb = np.ascontiguousarray(image[:, :, ::-1])  # BGR -> RGB, HxWx3 uint8
    return Image.fromarray(rgb)


def from_pil(image: Image.Image) -> ImageBGR:
    """Convert a PIL image of any mode to a contiguous HxWx3 uint8 BGR array (model boundary)."""
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"Received a {type(image).__name__}, expected a PIL.Image.Image.",
            fix="pass the PIL image itself (e.g. pipeline_output.images[0]).",
        )
    rgb = _normalize_mode(image)  # HxWx3 uint8 RGB
    return np.ascontiguousarray(rgb[:, :, ::-1])  # RGB -> BGR, HxWx3 uint8


def planes_to_bgr(
    planes: npt.NDArray[np.floating], *, low: float = 0.0, high: float = 1.0, rgb: bool = True
) -> ImageBGR:
    """A model's float output planes (3xHxW, RGB unless ``rgb`` is False) in [low, high] -> a C-contiguous
    HxWx3 uint8 BGR picture, rounded (half to even) and saturated (model boundary).

    The arithmetic runs on the contiguous planes and the bytes are laid out once: a picture left as a
    transposed view of the planes costs every later OpenCV call on it a strided copy (about ten times the
    call itself on a 128-px crop)."""
    if planes.ndim != 3 or planes.shape[0] != 3:
        raise ImageError(f"Model output planes of shape {planes.shape}.", fix="pass 3xHxW float planes.")
    scale = 255.0 / (high - low)
    levels = np.multiply(planes, scale) if low == 0.0 else np.multiply(np.subtract(planes, low), scale)
    np.rint(levels, out=levels)
    np.clip(levels, 0, 255, out=levels)
    channels = levels.astype(np.uint8)  # 3xHxW
    picture = np.empty((*channels.shape[1:], 3), dtype=np.uint8)  # HxWx3 BGR
    for column, plane in enumerate((2, 1, 0) if rgb else (0, 1, 2)):  # RGB planes -> B, G, R columns
        picture[:, :, column] = channels[plane]
    return picture


def format_parameters(prompt: str, negative: str, settings: Mapping[str, object]) -> str:
    """Format prompt, negative prompt and settings as A1111 infotext (the PNG ``parameters`` text)."""
    lines = [prompt]
    if negative:
        lines.append(f"{_NEGATIVE} {negative}")
    items = []
    for key, value in settings.items():
        if not _KEY.fullmatch(key):
            raise ImageError(
                f"Setting name {key!r} cannot be written to A1111 parameters.",
                fix="use a name without ',', ':', '\"', newlines or surrounding spaces, e.g. 'CFG scale'.",
            )
        if value is None:
            continue  # A1111 leaves out unset settings
        text = str(value)
        if any(char in text for char in ",:\n\r") or text.startswith('"') or text != text.strip():
            text = json.dumps(text, ensure_ascii=False)  # A1111 quotes values that would break the line
        items.append(f"{key}: {text}")
    if items:
        lines.append(", ".join(items))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Split A1111 infotext into (prompt, negative prompt, settings); inverse of format_parameters."""
    lines = text.replace("\r\n", "\n").split("\n")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()  # trailing blank lines some tools append after the settings
    settings = _parse_settings_line(lines[-1])
    if settings is not None:
        lines.pop()
    for index, line in enumerate(lines):
        if line.startswith(_NEGATIVE):
            first = line[len(_NEGATIVE) :]
            first = first[1:] if first.startswith(" ") else first
            negative = "\n".join([first, *lines[index + 1 :]])
            return "\n".join(lines[:index]), negative, settings or {}
    return "\n".join(lines), "", settings or {}


def _open_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading, turning OS errors into ImageError."""
    try:
        return path.open("rb")
    except OSError as err:
        missing = isinstance(err, FileNotFoundError)
        raise ImageError(
            f"No image at {path}: the file does not exist."
            if missing
            else f"Cannot open {path} for reading: {err.strerror or err}.",
            fix="check the path (relative paths start from the current folder) and that it is a readable "
            "image file, not a folder.",
        ) from err


def _open_image(handle: BinaryIO, path: Path, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the image by content and check the pixel cap from its header; nothing is decoded."""
    _check_max_pixels(max_pixels)
    try:
        image = Image.open(handle, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _not_allowed(path, _describe_content(handle)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(
            f"{path} was refused by Pillow as a possible decompression bomb ({err}); "
            f"the studio cap is {max_pixels:,} pixels.",
            fix=_CAP_FIX + " (Pillow's own limit cannot be lifted from the studio config).",
        ) from err
    except _PILLOW_ERRORS as err:
        raise _corrupt(path, None, err) from err
    # cameras write multi-picture JPEGs that Pillow calls "MPO"; the first picture is a plain JPEG
    detected = "JPEG" if image.format == "MPO" else image.format
    width, height = image.size
    if detected not in ALLOWED_FORMATS or width * height > max_pixels:
        image.close()
        if detected not in ALLOWED_FORMATS:
            raise _not_allowed(path, f"a {image.format} image")
        raise ImageError(
            f"{path} is {width}x{height} = {width * height:,} pixels, over the cap of {max_pixels:,} pixels.",
            fix=_CAP_FIX + f" to at least {width * height}.",
        )
    return image


def _check_max_pixels(max_pixels: int) -> None:
    """Reject a nonsensical pixel cap."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(
            f"images.max_pixels is {max_pixels!r}, expected a positive whole number of pixels.",
            fix=f"set images.max_pixels to e.g. {DEFAULT_MAX_PIXELS}.",
        )


def _describe_content(handle: BinaryIO) -> str:
    """Name what a file holds, for the error message only (nothing beyond the header is parsed)."""
    handle.seek(0)
    head = handle.read(16)
    if not head:
        return "an empty file"
    try:
        with Image.open(handle) as other:
            return f"a {other.format} image"
    except Exception:  # only naming the content for a message: any failure means "unknown"
        return f"not an image Pillow recognises (it starts with {head[:8]!r})"


def _not_allowed(path: Path, what: str) -> ImageError:
    """Error for content outside the format whitelist."""
    return ImageError(
        f"{path} is {what}; the studio reads only {', '.join(ALLOWED_FORMATS)} (decided by content, "
        "not by the extension).",
        fix='convert it to PNG, e.g. `python -c "from PIL import Image; '
        "Image.open('in.gif').convert('RGB').save('out.png')\"`.",
    )


def _corrupt(path: Path, image_format: str | None, err: BaseException) -> ImageError:
    """Error for data Pillow cannot decode: truncated downloads, broken files."""
    return ImageError(
        f"{path} looks like a {image_format or 'image'} file but could not be decoded ({err}); "
        "it is probably truncated or corrupt.",
        fix="re-download or re-export the image; partial files are never accepted.",
    )


def _normalize_mode(image: Image.Image) -> ImageRGB:
    """Any Pillow mode -> HxWx3 uint8 RGB: 16-bit scaled, palette expanded, alpha over white."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        image = _sixteen_bit_to_l(image)  # transparency of 16-bit greyscale is dropped
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_over_white(image)
    if image.mode != "RGB":
        logger.debug("converting %s image to RGB", mode)
        image = image.convert("RGB")  # CMYK, L, 1, P, YCbCr, ... -> RGB
    return np.asarray(image, dtype=np.uint8)  # HxWx3 uint8 RGB


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale (0..65535, also mode I) linearly to 8-bit L (0..255)."""
    values = np.asarray(image).astype(np.int64)  # HxW, one grey value per pixel
    scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
    logger.debug("scaled %s greyscale to 8 bits", image.mode)
    return Image.fromarray(scaled.astype(np.uint8))  # HxW uint8 -> mode L


def _composite_over_white(image: Image.Image) -> ImageRGB:
    """Flatten transparency (alpha channel or palette/tRNS key) over a white background."""
    logger.debug("compositing %s image with transparency over white", image.mode)
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint32)  # HxWx4 RGBA
    rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
    flat = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return flat.astype(np.uint8)  # HxWx3 uint8 RGB


def _check_array(image: object) -> None:
    """Raise ImageError unless ``image`` is a non-empty HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray):
        received = f"a {type(image).__name__}"
    elif image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        received = f"an array of shape {image.shape} and dtype {image.dtype}"
    else:
        return
    raise ImageError(
        f"Received {received}; expected an HxWx3 uint8 BGR array.",
        fix="greyscale: cv2.cvtColor(img, cv2.COLOR_GRAY2BGR); BGRA: img[:, :, :3]; "
        "float 0..1: (img * 255).round().clip(0, 255).astype(np.uint8).",
    )


def _format_for_extension(path: Path) -> str:
    """Pillow format name for ``path``'s extension."""
    image_format = _EXTENSIONS.get(path.suffix.lower())
    if image_format is None:
        raise ImageError(
            f"Cannot write {path}: extension {path.suffix or '(none)'!r} is not an image format the "
            f"studio writes; expected one of {', '.join(_EXTENSIONS)}.",
            fix="name the output e.g. portrait.png (lossless, keeps the recipe) or portrait.jpg.",
        )
    return image_format


def _recipe_json(recipe: Mapping[str, object] | None) -> str | None:
    """Serialise the recipe as strict JSON (no NaN), or explain why it cannot be."""
    if recipe is None:
        return None
    try:
        return json.dumps(dict(recipe), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ImageError(
            f"The recipe cannot be stored as JSON: {err}.",
            fix="keep recipe values to str, int, finite float, bool, None, lists and dicts.",
        ) from err


def _save_options(image_format: str, parameters: str | None, recipe: str | None) -> dict[str, object]:
    """Pillow save() keyword arguments: quality and metadata for one format."""
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_text(_PARAMETERS_KEY, parameters)  # tEXt; iTXt if not Latin-1, as in A1111
        if recipe is not None:
            info.add_itxt(_RECIPE_KEY, recipe)
        return {"pnginfo": info}
    options: dict[str, object] = {"quality": _QUALITY}
    if parameters is not None:
        options["exif"] = _exif_user_comment(parameters)
    if recipe is not None:
        options["xmp"] = _xmp_packet(recipe)
    return options


def _exif_user_comment(text: str) -> bytes:
    """An EXIF block holding only UserComment = text, laid out as piexif/A1111 write it."""
    payload = _UNICODE_PREFIX + text.encode("utf-16-be")
    # big-endian TIFF: header, IFD0 (1 entry: pointer to Exif IFD at 26), Exif IFD (1 entry at 44)
    header = b"MM\x00\x2a" + struct.pack(">I", 8)
    ifd0 = struct.pack(">HHHIII", 1, ExifTags.IFD.Exif, 4, 1, 26, 0)
    exif_ifd = struct.pack(">HHHIII", 1, ExifTags.Base.UserComment, 7, len(payload), 44, 0)
    return b"Exif\x00\x00" + header + ifd0 + exif_ifd + payload


def _read_user_comment(exif: Image.Exif) -> str | None:
    """Decode EXIF UserComment (UNICODE, ASCII or undefined character code)."""
    raw = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(raw, str) or raw is None:
        return raw
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix == _UNICODE_PREFIX:
        # A1111/piexif write UTF-16-BE whatever the TIFF byte order; ASCII-range text tells BE (00 xx) from LE
        even_zeros, odd_zeros = body[0::2].count(0), body[1::2].count(0)
        big = even_zeros > odd_zeros or (even_zeros == odd_zeros and exif.endian != "<")
        return body.decode("utf-16-be" if big else "utf-16-le", errors="replace").rstrip("\x00")
    encoding = {_ASCII_PREFIX: "ascii", b"JIS\x00\x00\x00\x00\x00": "shift_jis"}.get(prefix, "utf-8")
    return body.decode(encoding, errors="replace").rstrip("\x00")


def _xmp_packet(recipe: str) -> bytes:
    """A minimal XMP packet carrying the recipe JSON as the ``studio:recipe`` attribute."""
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:studio="{_XMP_NS}" '
        f'studio:recipe="{html.escape(recipe, quote=True)}"/></rdf:RDF></x:xmpmeta>'
    ).encode()


def _read_xmp_recipe(xmp: object) -> str | None:
    """The ``studio:recipe`` attribute of an XMP packet, found without parsing untrusted XML."""
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", errors="replace")
    if not isinstance(xmp, str):
        return None
    match = _XMP_RECIPE.search(xmp)
    return html.unescape(match.group(1)) if match else None


def _parse_recipe(text: str | None, path: Path) -> dict[str, object] | None:
    """Decode the stored recipe JSON; it must be a JSON object."""
    if text is None:
        return None
    try:
        recipe = json.loads(text)
        problem = "" if isinstance(recipe, dict) else f"a JSON {type(recipe).__name__}, expected an object"
    except json.JSONDecodeError as err:
        problem = f"not valid JSON ({err})"
    if problem:
        raise ImageError(
            f"The studio recipe stored in {path} is {problem}.",
            fix="the metadata was damaged or edited; re-create the recipe or use the 'parameters' text.",
        )
    return recipe


def _parse_settings_line(line: str) -> dict[str, str] | None:
    """Parse `key: value, key: value` completely, or return None if ``line`` is not a settings line."""
    settings: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _SETTING.match(line, position)
        if match is None or match.end() == position:
            return None
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):  # A1111 keeps malformed quotes as written
                value = str(json.loads(value))
        settings[key] = value
        position = match.end()
    return settings or None
