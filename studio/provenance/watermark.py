"""The invisible watermark on every output: a 32-bit payload from the recipe id, embedded in the pixels.

Payload (``PAYLOAD_BITS`` = 32, packed MSB first as invisible-watermark packs bytes, so its own
``WatermarkDecoder("bytes", 32)`` reads our marks): bytes 0-2 are the first 6 hex digits of the recipe id
(``recipe_prefix`` finds the audit entry and recipe), byte 3 is their CRC-8/I-432-1 (poly 0x07, xorout
0x55), so a decode can tell a mark from noise: an unmarked picture passes the check with chance 1/256, and
the all-zero and all-one words that flat pictures decode to never pass.

Methods (``WatermarkMethod``; bench/watermark_bench.py measured them and picked the default):

- ``dwtDctSvd`` (the default): invisible-watermark's algorithm, one bit per 4x4 block of the Haar DWT
  approximation band of the U (chroma) channel, bits repeated in raster order over the blocks. It survives
  PNG, JPEG q75 and a resize that is undone, not a crop or a resize that changes the block grid; about
  0.1-0.2 s per 512x768 picture on one CPU core, a few ms at 64x64.
- ``dwtDct``: the same grid with the largest DCT coefficient per block (diffusers' SDXL watermarker). It
  loses bits on many photos even without an attack (the bench: 2 of 6 payloads back after PNG), and JPEG.
- ``rivaGan``: the RivaGAN encoder/decoder ONNX models shipped in the invisible-watermark wheel, run on the
  whole frame (their height and width axes are dynamic) on the ONNX Runtime providers asked for. It survives
  crops and JPEG too but costs seconds per 512x768 picture on a CPU.

Too small: ``Watermarker.embed`` raises ``WatermarkTooSmall`` rather than returning the picture unmarked,
so an output without a mark is always a decision its caller records (the audit entry), never a silent
skip. Limits: the DCT methods need 32 blocks ((H // 8) * (W // 8) >= 32, e.g. 64x32 px; a 64x64 tiny
draft carries 64); rivaGan needs both sides >= 256 px (measured: 94 % of bits at 128 px, 100 % at 256).
``decode`` of a too-small picture returns None.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from studio.config import StudioConfig, WatermarkMethod
from studio.errors import InputError, StudioError
from studio.imageio import planes_to_bgr
from studio.types import ImageBGR

if TYPE_CHECKING:  # onnxruntime loads only when a rivaGan Watermarker is built
    import onnxruntime as ort

logger = logging.getLogger(__name__)

PAYLOAD_BITS = 32
Bits = npt.NDArray[np.uint8]  # (PAYLOAD_BITS,) 0/1, MSB of byte 0 first

_PREFIX_BYTES = 3
_DCT_SCALE = 36.0  # invisible-watermark's default quantisation step on the U channel (both DCT methods)
_DCT_BLOCK = 4  # px of the DWT band per bit block (the library's default)
# A block whose colours clip on the way back to 8-bit BGR can lose its bit; marking the marked picture again
# restores it (the quantised value is re-set from what the picture now holds): at most this many passes.
# Each bit is a majority vote over its blocks, so only a picture with few blocks per bit (a 64x64 tiny
# output has 2) can lose one this way: those are read back; larger ones skip the decode it costs.
_DCT_PASSES = 3
_DCT_CHECKED_BLOCKS_PER_BIT = 16
_RIVA_MIN_SIDE = 256  # px; below it RivaGAN's decoder misses bits on clean pictures
_RIVA_THRESHOLD = 0.0  # the decoder returns logits; invisible-watermark cuts at 0.52, equivalent in practice


class WatermarkTooSmall(StudioError):
    """A picture has too few pixels to carry the 32-bit watermark with the chosen method."""


def payload_for(recipe_id: str) -> bytes:
    """The 4-byte payload of ``recipe_id``: its first 3 bytes (6 hex digits) and their CRC-8."""
    prefix = _recipe_bytes(recipe_id)
    return prefix + bytes([_crc8(prefix)])


def matches(payload: bytes, recipe_id: str) -> bool:
    """Whether a decoded ``payload`` is the mark of ``recipe_id``."""
    return bytes(payload) == payload_for(recipe_id)


def recipe_prefix(payload: bytes) -> str:
    """The 6 hex digits of the recipe id a payload carries (search the audit log or outputs for them)."""
    _check_payload(payload)
    return bytes(payload[:_PREFIX_BYTES]).hex()


def is_valid(payload: bytes) -> bool:
    """Whether 4 bytes carry a correct CRC (a real mark, up to a 1/256 chance)."""
    return len(payload) == PAYLOAD_BITS // 8 and _crc8(payload[:_PREFIX_BYTES]) == payload[_PREFIX_BYTES]


class Watermarker:
    """Embeds and reads the payload with one method; holds the RivaGAN sessions (build once per Studio)."""

    def __init__(
        self, method: WatermarkMethod, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0
    ) -> None:
        self.method: WatermarkMethod = method
        self._sessions: tuple[ort.InferenceSession, ort.InferenceSession] | None = None
        if method == "rivaGan":
            self._sessions = _riva_sessions(providers, threads)
        elif method not in ("dwtDct", "dwtDctSvd"):
            raise InputError(
                f"watermark method {method!r} is unknown; expected dwtDct, dwtDctSvd or rivaGan.",
                fix="set provenance.watermark_method to one of them.",
            )

    @classmethod
    def from_config(cls, config: StudioConfig) -> Watermarker:
        """The watermarker ``config.provenance`` asks for, on the config's ONNX providers and threads."""
        from studio.models.runtime import onnx_providers

        method = config.provenance.watermark_method
        providers = onnx_providers(config.runtime.onnx_providers) if method == "rivaGan" else []
        return cls(method, providers, config.runtime.threads)

    def embed(self, image: ImageBGR, payload: bytes) -> ImageBGR:
        """A new HxWx3 uint8 BGR picture carrying ``payload``; WatermarkTooSmall if it cannot hold it."""
        # 1. check inputs
        _check_image(image)
        _check_payload(payload)
        if not self.fits(image.shape[0], image.shape[1]):
            raise WatermarkTooSmall(
                f"a {image.shape[1]}x{image.shape[0]} px picture is too small for a {self.method} watermark "
                f"({self._minimum()}).",
                fix="render a larger picture, choose another provenance.watermark_method or set "
                "provenance.watermark = false (the audit log records that outputs are unmarked).",
            )
        bits = np.unpackbits(np.frombuffer(bytes(payload), np.uint8))  # (32,) MSB first
        # 2. embed
        if self._sessions is not None:
            return _forward_riva_encode(self._sessions[0], image, bits)
        marked = _embed_dct(image, bits, self.method)
        if _dct_blocks(image.shape[0], image.shape[1]) >= _DCT_CHECKED_BLOCKS_PER_BIT * PAYLOAD_BITS:
            return marked
        for _ in range(_DCT_PASSES - 1):  # 3. check that it reads back; mark again where clipping lost bits
            if np.array_equal(_decode_dct(marked, self.method), bits):
                return marked
            marked = _embed_dct(marked, bits, self.method)
        if not np.array_equal(_decode_dct(marked, self.method), bits):
            logger.warning(
                "the %s watermark does not read back from this %dx%d picture after %d passes (saturated "
                "colours clip its bits); `studio verify` will not find it",
                self.method, image.shape[1], image.shape[0], _DCT_PASSES,
            )  # fmt: skip
        return marked

    def decode(self, image: ImageBGR) -> bytes | None:
        """The payload a picture carries, or None when it has no valid mark (CRC mismatch, too small)."""
        _check_image(image)
        if not self.fits(image.shape[0], image.shape[1]):
            return None
        payload = np.packbits(self.decode_bits(image)).tobytes()
        return payload if is_valid(payload) else None

    def decode_bits(self, image: ImageBGR) -> Bits:
        """The raw 32 bits read from a picture, CRC unchecked (for measuring bit accuracy)."""
        _check_image(image)
        if self._sessions is not None:
            return _forward_riva_decode(self._sessions[1], image)
        return _decode_dct(image, self.method)

    def fits(self, height: int, width: int) -> bool:
        """Whether an HxW picture can carry the payload with this method."""
        if self.method == "rivaGan":
            return min(height, width) >= _RIVA_MIN_SIDE
        return _dct_blocks(height, width) >= PAYLOAD_BITS

    def _minimum(self) -> str:
        if self.method == "rivaGan":
            return f"rivaGan needs both sides >= {_RIVA_MIN_SIDE} px"
        return f"it needs (H // 8) * (W // 8) >= {PAYLOAD_BITS}, e.g. 64x32 px"


# -- invisible-watermark's DCT methods -----------------------------------------------------------------
#
# Wrapped here, in one place, rather than called through imwatermark.WatermarkEncoder.encode, because:
# 1. encode refuses pictures under 256x256 px, a conservative guard: the algorithms need only 32 blocks,
#    and a tiny 64x64 draft decodes exactly after a PNG round trip;
# 2. the library writes the inverse DWT's floats into a uint8 array (truncated, and wrapped past 0 / 255:
#    saturated colours turn into speckles and lose their bits): we round and clip;
# 3. the library hands the detail bands back to idwt2 as (V, H, D) instead of (H, V, D), which changes
#    the picture beyond the mark (lower PSNR) without touching the approximation band the mark lives in.
# The per-block algorithm (``encode_frame``) and the decoder are the library's own, unchanged, so marks
# stay readable by invisible-watermark's WatermarkDecoder and the other way round.


def _dct_blocks(height: int, width: int) -> int:
    """The 4x4 blocks of the half-size DWT band an HxW picture has: each carries one payload bit."""
    return (height // 8) * (width // 8)


def _dct_embedder(method: WatermarkMethod, bits: Bits | None) -> Any:
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd
    from imwatermark.maxDct import EmbedMaxDct

    kind = EmbedMaxDct if method == "dwtDct" else EmbedDwtDctSvd
    watermarks = [] if bits is None else [int(b) for b in bits]
    return kind(watermarks, wmLen=PAYLOAD_BITS, scales=[0, _DCT_SCALE, 0], block=_DCT_BLOCK)


def _embed_dct(image: ImageBGR, bits: Bits, method: WatermarkMethod) -> ImageBGR:
    import cv2
    import pywt

    height, width = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4  # whole 2x2 DWT cells of 4x4 blocks
    yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV)  # HxWx3 uint8 Y, U, V
    u = yuv[:height, :width, 1].astype(np.float64)  # the library marks U only (its Y and V scales are 0)
    approx, details = pywt.dwt2(u, "haar")  # (H/2)x(W/2) approximation; (H, V, D) detail bands
    _dct_embedder(method, bits).encode_frame(approx, _DCT_SCALE)  # in place, one bit per 4x4 block
    marked = pywt.idwt2((approx, details), "haar")
    yuv[:height, :width, 1] = np.clip(np.rint(marked), 0, 255).astype(np.uint8)
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)  # HxWx3 uint8 BGR


def _decode_dct(image: ImageBGR, method: WatermarkMethod) -> Bits:
    if _dct_blocks(image.shape[0], image.shape[1]) < PAYLOAD_BITS:
        return np.zeros(PAYLOAD_BITS, np.uint8)  # no block for some bits: nothing to read
    scores = _dct_embedder(method, None).decode(image)  # (32,) bool, majority over each bit's blocks
    return np.asarray(scores, np.uint8)


# -- RivaGAN ONNX models -----------------------------------------------------------------------------
#
# imwatermark's RivaWatermark keeps its sessions in class attributes on ONNX Runtime's default providers
# and imports torch for the tensor shuffling; we run the same two wheel files on the providers asked for.


def _riva_sessions(
    providers: Sequence[str], threads: int
) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    from studio.models.runtime import create_session

    folder = _imwatermark_dir()
    requested = list(providers) or ["CPUExecutionProvider"]
    encoder = create_session(folder / "rivagan_encoder.onnx", requested, threads)
    decoder = create_session(folder / "rivagan_decoder.onnx", requested, threads)
    return encoder, decoder


def _imwatermark_dir() -> Path:
    spec = importlib.util.find_spec("imwatermark")
    if spec is None or spec.origin is None:
        raise StudioError(
            "the rivaGan watermark needs the invisible-watermark package, which is not installed.",
            fix="install portrait-studio's dependencies (uv sync) or choose provenance.watermark_method "
            '= "dwtDctSvd".',
        )
    return Path(spec.origin).parent


def _prepare_riva_frame(image: ImageBGR) -> npt.NDArray[np.float32]:
    frame = image.astype(np.float32) / 127.5 - 1.0  # HxWx3 BGR in [-1, 1] (imwatermark feeds BGR too)
    return np.ascontiguousarray(frame.transpose(2, 0, 1)[None, :, None])  # 1x3x1xHxW: batch, C, time, H, W


def _forward_riva_encode(session: ort.InferenceSession, image: ImageBGR, bits: Bits) -> ImageBGR:
    data = bits.astype(np.float32)[None]  # 1x32
    (out,) = session.run(None, {"frame": _prepare_riva_frame(image), "data": data})  # 1x3x1xHxW
    return planes_to_bgr(out[0, :, 0], low=-1.0, rgb=False)  # 3xHxW BGR in [-1, 1] -> HxWx3 uint8 BGR


def _forward_riva_decode(session: ort.InferenceSession, image: ImageBGR) -> Bits:
    (logits,) = session.run(None, {"frame": _prepare_riva_frame(image)})  # 1x32
    return (logits[0] > _RIVA_THRESHOLD).astype(np.uint8)


# -- payload helpers ---------------------------------------------------------------------------------


def _recipe_bytes(recipe_id: str) -> bytes:
    digits = recipe_id[: 2 * _PREFIX_BYTES]
    try:
        if len(digits) < 2 * _PREFIX_BYTES:
            raise ValueError(digits)
        return bytes.fromhex(digits)
    except ValueError:
        raise InputError(
            f"recipe id {recipe_id!r} does not start with {2 * _PREFIX_BYTES} hex digits.",
            fix="pass Recipe.id (a sha256 hex digest).",
        ) from None


def _crc8(data: bytes) -> int:
    crc = 0  # CRC-8/I-432-1: poly 0x07, init 0x00, no reflection, xorout 0x55
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


def _check_payload(payload: bytes) -> None:
    if not isinstance(payload, bytes | bytearray) or len(payload) != PAYLOAD_BITS // 8:
        raise InputError(
            f"a watermark payload must be {PAYLOAD_BITS // 8} bytes; got {payload!r}.",
            fix="make it with payload_for(recipe.id).",
        )


def _check_image(image: ImageBGR) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise InputError(
            f"the watermark needs an HxWx3 uint8 BGR picture; got {type(image).__name__} {shape} "
            f"{getattr(image, 'dtype', '')}.",
            fix="pass the output image as studio.imageio reads it.",
        )
