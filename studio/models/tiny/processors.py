"""Tiny stand-ins for FaceFusion's face processors, in the real ONNX layouts. Fixtures, not real models.

Each file has the inputs and outputs (names, ranks, layouts, dtypes) of the FaceFusion 3.x file it replaces,
so one loading and pre/post-processing path serves both; the ``*_IO`` dicts are the catalogue ``io`` facts,
the same for the real and the tiny entry (``mean``/``std`` apply to pixels scaled to 0..1):

- ``write_occluder`` -> like ``xseg_1.onnx``: ``input`` float32 [N,256,256,3] NHWC BGR 0..1 ->
  ``output`` float32 [N,256,256,1], 1 = face, 0 = occluded. A FIXTURE: it reports as occluded exactly the
  pixels of the occluder colour (0..255 terms: G >= 200, R <= 60, B <= 60; see ``OCCLUDER_RGB``) and 1
  everywhere else, whatever the picture shows.
- ``write_face_parser`` -> like ``bisenet_resnet_34.onnx``: ``input`` float32 [N,3,512,512] NCHW RGB
  (ImageNet mean/std) -> ``output`` float32 [N,19,512,512] class logits (plus BiSeNet's two auxiliary
  heads). A FIXTURE: the logits come from fixed geometry in the crop, not from its content, so the argmax is
  ``parser_class_map``: background outside a face ellipse, skin inside, and eyebrows, eyes, nose, upper lip,
  mouth and lower lip where the ``arcface_128`` template (the crop FaceFusion parses) puts them.
- ``write_gfpgan`` -> like ``gfpgan_1.4.onnx``: ``input`` float32 [1,3,512,512] RGB -1..1 -> ``output``
  the same shape and range: the input plus a small, seeded, content-dependent change (a random conv net).
- ``write_codeformer`` -> like ``codeformer.onnx``: (``input`` as GFPGAN, ``weight`` float64 [1]) ->
  ``output``; the change scales with ``1 - 0.8 * weight``, so weight 1 stays closer to the input.

Graphs are built with ``onnx.helper`` from seeded numpy (no BLAS/LAPACK), so files are byte-identical for a
given seed. Only graph-level arithmetic happens here; nothing is loaded or run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from studio.config import FACE_REGION_CLASSES
from studio.models.tiny.faces import _Graph, _he, _make_model, _write

logger = logging.getLogger(__name__)

# --- catalogue io facts, shared by the real FaceFusion files and their twins --------------------------

XSEG_SIZE = 256
PARSER_SIZE = 512
ENHANCER_SIZE = 512
PARSER_CLASSES = 19  # CelebAMask-HQ labels
PARSER_REGION_IDS = FACE_REGION_CLASSES  # region name -> CelebAMask-HQ class index (studio.config)

XSEG_IO: dict[str, Any] = {
    "input": "input",
    "output": "output",
    "layout": "NHWC",
    "channels": "BGR",
    "size": XSEG_SIZE,
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
    "template": "arcface_128",  # no template of its own: it masks the swapper's arcface_128 crop
    "output_range": [0.0, 1.0],  # 1 = face, 0 = occluded
}
BISENET_IO: dict[str, Any] = {
    "input": "input",
    "output": "output",
    "layout": "NCHW",
    "channels": "RGB",
    "size": PARSER_SIZE,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "template": "arcface_128",
    "classes": PARSER_CLASSES,
    "regions": dict(PARSER_REGION_IDS),
}
GFPGAN_IO: dict[str, Any] = {
    "input": "input",
    "output": "output",
    "layout": "NCHW",
    "channels": "RGB",
    "size": ENHANCER_SIZE,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "template": "ffhq_512",
    "output_range": [-1.0, 1.0],
}
CODEFORMER_IO: dict[str, Any] = {
    **GFPGAN_IO,
    "weight_input": "weight",
    "weight_dtype": "float64",
    "weight_shape": [1],
}

# --- occluder (xseg_1 signature) ----------------------------------------------------------------------

OCCLUDER_RGB: tuple[int, int, int] = (0, 255, 0)  # paint this to occlude
OCCLUDER_MIN_GREEN = 200  # a pixel is occluded when G >= 200 and R <= 60 and B <= 60 (0..255 levels)
OCCLUDER_MAX_RED = 60
OCCLUDER_MAX_BLUE = 60
_STEP = 4.0  # ramp steepness in levels: whole levels land exactly on 0 or 1

OccluderFixture = Literal["green", "none"]


def occluded(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Where the occluder fixture reports occlusion, for an HxWx3 uint8 RGB picture."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return (g >= OCCLUDER_MIN_GREEN) & (r <= OCCLUDER_MAX_RED) & (b <= OCCLUDER_MAX_BLUE)


def _make_occluder_graph(fixture: OccluderFixture) -> onnx.ModelProto:
    """XSeg-shaped graph: 1 - [G >= 200] * [R <= 60] * [B <= 60], as steep clipped ramps."""
    g = _Graph()
    x = "input"  # [N,256,256,3] NHWC, BGR, 0..1
    zero, one = g.const(0.0), g.const(1.0)

    def channel(index: int) -> str:
        starts, ends, axes = (g.const([v], np.int64) for v in (index, index + 1, 3))
        return g.op("Slice", x, starts, ends, axes)  # [N,256,256,1]

    blue, green, red = channel(0), channel(1), channel(2)
    if fixture == "none":
        out = g.op("Add", g.op("Mul", green, zero), one, out="output")  # exactly 1: never occluded
    else:
        gain = g.const(_STEP * 255.0)

        def ramp(value: str, level: float, sign: float) -> str:
            """1 when sign * (value*255 - level) >= 0.25 level, 0 when <= -0.25 level."""
            signed = g.op("Mul", g.op("Sub", value, g.const(level / 255.0)), g.const(sign))
            return g.op("Clip", g.op("Mul", signed, gain), zero, one)

        is_green = ramp(green, OCCLUDER_MIN_GREEN - 0.5, 1.0)
        no_red = ramp(red, OCCLUDER_MAX_RED + 0.5, -1.0)
        no_blue = ramp(blue, OCCLUDER_MAX_BLUE + 0.5, -1.0)
        occluder = g.op("Mul", g.op("Mul", is_green, no_red), no_blue)  # [N,256,256,1], 1 = occluder
        out = g.op("Sub", one, occluder, out="output")
    size = XSEG_SIZE
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", size, size, 3])]
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", size, size, 1])]
    return _make_model(g, "tiny_xseg_fixture", inputs, outputs)


def write_occluder(path: Path, *, seed: int = 0, fixture: OccluderFixture = "green") -> None:
    """Write the XSeg-shaped occluder fixture; ``fixture="none"`` never reports occlusion."""
    # The fixture has no random weights: ``seed`` is accepted for a uniform kit API and changes nothing.
    del seed
    if fixture not in ("green", "none"):
        raise ValueError(f"occluder fixture {fixture!r} is not 'green' or 'none'")
    _write(path, _make_occluder_graph(fixture), f"occluder ({fixture})")


# --- face parser (bisenet_resnet_34 signature) --------------------------------------------------------

# FaceFusion's arcface_128 warp template, fractions of the crop: left eye, right eye, nose tip,
# left and right mouth corner (left = smaller x). FaceFusion parses the swapper's arcface_128 crop.
ARCFACE_128: tuple[tuple[float, float], ...] = (
    (0.36167656, 0.40387734),
    (0.63696719, 0.40235469),
    (0.50019687, 0.56044219),
    (0.38710391, 0.72160547),
    (0.61507734, 0.72034453),
)


@dataclass(frozen=True)
class ParserRegion:
    """One fixture region in crop fractions: an axis-aligned ellipse or rectangle of half-sizes rx, ry."""

    name: str
    class_id: int
    shape: Literal["ellipse", "rect"]
    cx: float
    cy: float
    rx: float
    ry: float

    def contains(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Whether crop-fraction points lie inside (computed in float32, as the graph does)."""
        dx = (np.asarray(x, np.float32) - np.float32(self.cx)) / np.float32(self.rx)
        dy = (np.asarray(y, np.float32) - np.float32(self.cy)) / np.float32(self.ry)
        if self.shape == "ellipse":
            return np.asarray(dx * dx + dy * dy <= 1)
        return np.asarray(np.maximum(np.abs(dx), np.abs(dy)) <= 1)


def _parser_layout() -> tuple[ParserRegion, tuple[ParserRegion, ...]]:
    """The face ellipse and the feature regions, placed from the arcface_128 landmarks."""
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = ARCFACE_128
    eyes = rx - lx  # inter-ocular distance, ~0.275 of the crop
    mx, my, half_mouth = (mlx + mrx) / 2, (mly + mry) / 2, (mrx - mlx) / 2
    ids = PARSER_REGION_IDS
    brow_up, brow = 0.3 * eyes, (0.3 * eyes, 0.06 * eyes)  # eyebrows: how far above the eye, half-sizes
    face = ParserRegion("skin", ids["skin"], "ellipse", 0.5, 0.56, 0.34, 0.43)
    features = (
        ParserRegion("left-eyebrow", ids["left-eyebrow"], "rect", lx, ly - brow_up, *brow),
        ParserRegion("right-eyebrow", ids["right-eyebrow"], "rect", rx, ry - brow_up, *brow),
        ParserRegion("left-eye", ids["left-eye"], "ellipse", lx, ly, 0.25 * eyes, 0.1 * eyes),
        ParserRegion("right-eye", ids["right-eye"], "ellipse", rx, ry, 0.25 * eyes, 0.1 * eyes),
        ParserRegion("nose", ids["nose"], "ellipse", nx, ny - 0.25 * eyes, 0.17 * eyes, 0.3 * eyes),
        ParserRegion("upper-lip", ids["upper-lip"], "rect", mx, my - 0.0225, half_mouth, 0.012),
        ParserRegion("mouth", ids["mouth"], "rect", mx, my, 0.85 * half_mouth, 0.009),
        ParserRegion("lower-lip", ids["lower-lip"], "rect", mx, my + 0.0275, half_mouth, 0.016),
    )
    return face, features


PARSER_FACE, PARSER_FEATURES = _parser_layout()
PARSER_REGIONS: tuple[ParserRegion, ...] = (PARSER_FACE, *PARSER_FEATURES)
_BACKGROUND_LOGIT, _SKIN_LOGIT, _FEATURE_LOGIT = 0.5, 1.0, 2.0  # features never overlap each other


def parser_class_at(x: float, y: float) -> int:
    """The fixture's class at crop fractions (x, y): a feature, else skin in the face ellipse, else 0."""
    for region in PARSER_FEATURES:
        if region.contains(x, y):
            return region.class_id
    return PARSER_FACE.class_id if PARSER_FACE.contains(x, y) else 0


def parser_class_map(size: int = PARSER_SIZE) -> npt.NDArray[np.int64]:
    """The fixture's argmax map at ``size`` px (pixel centres), as ``parser_class_at`` everywhere."""
    centres = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    xs, ys = centres[None, :], centres[:, None]
    classes = np.where(PARSER_FACE.contains(xs, ys), PARSER_FACE.class_id, 0).astype(np.int64)
    for region in PARSER_FEATURES:
        classes[region.contains(xs, ys)] = region.class_id
    return classes


def _make_parser_graph() -> onnx.ModelProto:
    """BiSeNet-shaped graph: per-class inside tests against fixed regions, weighted into logits."""
    g = _Graph()
    x = "input"  # [N,3,512,512] RGB, ImageNet mean/std; only its batch size is used
    size = PARSER_SIZE
    # per-class region parameters [19,1,1]: class 0 covers everything, unused classes have weight 0
    params = np.zeros((5, PARSER_CLASSES), np.float32)  # cx, cy, rx, ry, is_ellipse
    params[:, :] = np.array([[0.5], [0.5], [10.0], [10.0], [0.0]], np.float32)
    weights = np.zeros(PARSER_CLASSES, np.float32)
    weights[0] = _BACKGROUND_LOGIT
    for region in PARSER_REGIONS:
        params[:, region.class_id] = (region.cx, region.cy, region.rx, region.ry, region.shape == "ellipse")
        weights[region.class_id] = _SKIN_LOGIT if region is PARSER_FACE else _FEATURE_LOGIT
    cx, cy, rx, ry, ellipse = (g.const(p.reshape(PARSER_CLASSES, 1, 1)) for p in params)
    centres = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    xs, ys = g.const(centres.reshape(1, 1, size)), g.const(centres.reshape(1, size, 1))
    dx = g.op("Div", g.op("Sub", xs, cx), rx)  # [19,1,512]
    dy = g.op("Div", g.op("Sub", ys, cy), ry)  # [19,512,1]
    round_ = g.op("Add", g.op("Mul", dx, dx), g.op("Mul", dy, dy))  # [19,512,512]
    box = g.op("Max", g.op("Abs", dx), g.op("Abs", dy))  # [19,512,512]
    distance = g.op("Where", g.op("Cast", ellipse, to=TensorProto.BOOL), round_, box)
    inside = g.op("Cast", g.op("LessOrEqual", distance, g.const(1.0)), to=TensorProto.FLOAT)
    logits = g.op("Mul", inside, g.const(weights.reshape(1, PARSER_CLASSES, 1, 1)))  # [1,19,512,512]
    batch = g.op("Slice", g.op("Shape", x), g.const([0], np.int64), g.const([1], np.int64))  # [1] = N
    shape = g.op("Concat", batch, g.const([PARSER_CLASSES, size, size], np.int64), axis=0)
    out = g.op("Expand", logits, shape, out="output")  # [N,19,512,512]
    # BiSeNet's auxiliary heads (feat_out16 / feat_out32): FaceFusion reads only the first output
    aux = [g.op("Identity", out, out=name) for name in ("feat_out16", "feat_out32")]
    dims = ["batch_size", PARSER_CLASSES, size, size]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch_size", 3, size, size])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name in (out, *aux)]
    return _make_model(g, "tiny_bisenet_fixture", inputs, outputs)


def write_face_parser(path: Path, *, seed: int = 0) -> None:
    """Write the BiSeNet-shaped parser fixture (bisenet_resnet_34 signature) to ``path``."""
    # The fixture has no random weights: ``seed`` is accepted for a uniform kit API and changes nothing.
    del seed
    _write(path, _make_parser_graph(), "face parser")


# --- face enhancers (gfpgan_1.4 / codeformer signatures) ----------------------------------------------

ENHANCER_CHANNELS = 8  # hidden channels of the tiny conv net (at half resolution)
ENHANCER_STRENGTH = 0.1  # largest change, in -1..1 units (about 13 levels)
CODEFORMER_WEIGHT_EFFECT = 0.8  # change = strength * (1 - 0.8 * weight): weight 1 keeps 20 %


def _make_enhancer_body(g: _Graph, rng: np.random.Generator, x: str) -> str:
    """A seeded change field in -1..1 at full size: stride-2 conv, ReLU, conv, tanh, 2x upsample."""
    hidden = ENHANCER_CHANNELS
    w1 = g.const(_he(rng, (hidden, 3, 3, 3), 27), name="enc.weight")  # [8,3,3,3]
    b1 = g.const(0.1 * rng.standard_normal(hidden, dtype=np.float32), name="enc.bias")
    w2 = g.const(_he(rng, (3, hidden, 3, 3), hidden * 9), name="dec.weight")  # [3,8,3,3]
    b2 = g.const(np.zeros(3, np.float32), name="dec.bias")
    pads = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    h = g.op("Relu", g.op("Conv", x, w1, b1, strides=[2, 2], **pads))  # [1,8,256,256]
    d = g.op("Tanh", g.op("Conv", h, w2, b2, strides=[1, 1], **pads))  # [1,3,256,256]
    scales = g.const([1.0, 1.0, 2.0, 2.0])
    return g.op("Resize", d, "", scales, mode="linear")  # [1,3,512,512]


def _enhancer_io(extra: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    size = ENHANCER_SIZE
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, size, size])
    return [image, *(extra or [])], [output]


def _make_gfpgan_graph(seed: int) -> onnx.ModelProto:
    """GFPGAN-shaped graph: clip(input + strength * change(input), -1, 1)."""
    rng = np.random.default_rng(seed)
    g = _Graph()
    change = _make_enhancer_body(g, rng, "input")
    moved = g.op("Add", "input", g.op("Mul", change, g.const(ENHANCER_STRENGTH, name="strength")))
    g.op("Clip", moved, g.const(-1.0), g.const(1.0), out="output")
    inputs, outputs = _enhancer_io()
    return _make_model(g, "tiny_gfpgan", inputs, outputs)


def _make_codeformer_graph(seed: int) -> onnx.ModelProto:
    """CodeFormer-shaped graph: the change shrinks as the fidelity ``weight`` (float64 [1]) grows."""
    rng = np.random.default_rng(seed)
    g = _Graph()
    change = _make_enhancer_body(g, rng, "input")
    weight = g.op("Clip", g.op("Cast", "weight", to=TensorProto.FLOAT), g.const(0.0), g.const(1.0))  # [1]
    keep = g.op("Sub", g.const(1.0), g.op("Mul", weight, g.const(CODEFORMER_WEIGHT_EFFECT)))
    scale = g.op("Mul", keep, g.const(ENHANCER_STRENGTH, name="strength"))  # [1]
    moved = g.op("Add", "input", g.op("Mul", change, scale))
    g.op("Clip", moved, g.const(-1.0), g.const(1.0), out="output")
    weight_info = helper.make_tensor_value_info("weight", TensorProto.DOUBLE, [1])
    inputs, outputs = _enhancer_io([weight_info])
    return _make_model(g, "tiny_codeformer", inputs, outputs)


def write_gfpgan(path: Path, *, seed: int = 0) -> None:
    """Write the tiny GFPGAN-shaped enhancer (gfpgan_1.4 signature) to ``path``."""
    _write(path, _make_gfpgan_graph(seed), "face enhancer (GFPGAN signature)")


def write_codeformer(path: Path, *, seed: int = 0) -> None:
    """Write the tiny CodeFormer-shaped enhancer (codeformer signature, fidelity ``weight``) to ``path``."""
    _write(path, _make_codeformer_graph(seed), "face enhancer (CodeFormer signature)")
