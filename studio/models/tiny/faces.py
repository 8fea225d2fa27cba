"""Tiny stand-ins for the face models, in the real ONNX formats. Fixtures, not real models.

Each file has the signature of the model it replaces, so ``insightface.model_zoo.get_model``
routes it to the same class as the real weights and the studio's loading code serves both:

- ``write_detector`` -> like SCRFD ``det_10g.onnx``: input [1,3,H,W], 9 outputs (scores, boxes,
  keypoints for strides 8/16/32, 2 anchors per cell). It is a FIXTURE: it reports exactly one face at
  ``FIXTURE_FACE_BOX`` / ``FIXTURE_FACE_KPS`` (fractions of the picture, found inside insightface's
  letterbox padding), whatever the picture shows, unless the picture is uniform: then no face.
- ``write_recognizer`` -> like ArcFace ``w600k_r50.onnx``: [N,3,112,112] -> [N,512]; a seeded random
  conv stack with the real tail (BatchNorm -> Flatten -> Gemm -> BatchNorm). Its embeddings are
  deterministic and differ between pictures, but they do not recognise anybody.
- ``write_swapper`` -> like ``inswapper_128.onnx``: (target [1,3,128,128], source [1,512]) ->
  [1,3,128,128], with ``emap`` as the last initializer. It shifts the target's colours by an amount
  derived from the source identity (or, with ``identity=True``, returns the target unchanged).

Graphs are built with ``onnx.helper`` from seeded numpy (no BLAS/LAPACK), so files are byte-identical
for a given seed. Only graph-level arithmetic happens here; nothing is loaded or run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from studio.files import write_bytes_atomic

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; accepted by onnxruntime >= 1.13

# The fixture face: (x1, y1, x2, y2) as fractions of the picture's width / height.
FIXTURE_FACE_BOX: tuple[float, float, float, float] = (0.30, 0.22, 0.70, 0.72)
# (5, 2) x, y fractions of width / height: left eye, right eye, nose, left mouth, right mouth
# (left = smaller x, as in insightface), proportioned like the ArcFace alignment template.
FIXTURE_FACE_KPS: tuple[tuple[float, float], ...] = (
    (0.42, 0.40),
    (0.58, 0.40),
    (0.50, 0.50),
    (0.435, 0.60),
    (0.565, 0.60),
)
DETECTOR_STRIDES: tuple[int, ...] = (8, 16, 32)
DETECTOR_FACE_STRIDE = 32  # the only stride whose anchor reports the face (big faces live there)
# Texture gate: per-picture std of the normalised input ((x-127.5)/128) below this means "uniform".
DETECTOR_MIN_STD = 0.02  # about 2.6 grey levels
DETECTOR_GATE_GAIN = 400.0  # score = sigmoid(gain * (std - min_std)): ~3e-4 at std 0, ~1 on photos
_PAD_VALUE = -127.5 / 128.0  # insightface letterboxes with black (0) before normalising

RECOGNIZER_CHANNELS: tuple[int, ...] = (16, 32, 32, 32)  # 112 -> 56 -> 28 -> 14 -> 7
EMBEDDING_SIZE = 512
SWAPPER_SIZE = 128
SWAPPER_STRENGTH = 0.1  # largest colour shift, in 0..1 units (about 25 levels)


@dataclass
class _Graph:
    """Collects nodes and initializers, naming every tensor uniquely."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        """Append one node with a single output and return that output's name."""
        self.count += 1
        name = out or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def const(self, value: npt.ArrayLike, dtype: type = np.float32, name: str | None = None) -> str:
        """Add an initializer and return its name."""
        self.count += 1
        name = name or f"const_{self.count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _make_model(g: _Graph, name: str, inputs: list[Any], outputs: list[Any]) -> onnx.ModelProto:
    """Wrap a finished graph as a checked opset-17 model."""
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="studio.tiny"
    )
    model.ir_version = IR_VERSION
    model.doc_string = "studio tiny fixture model: not a real face model"
    onnx.checker.check_model(model, full_check=True)
    return model


def _write(path: Path, model: onnx.ModelProto, what: str) -> None:
    """Serialize a model atomically and log what was written."""
    data = model.SerializeToString()
    write_bytes_atomic(Path(path), data)
    logger.info("wrote tiny %s (fixture, not a real model): %s, %d bytes", what, path, len(data))


# --- detector (SCRFD det_10g signature) -------------------------------------------------------


def _make_content_extent(g: _Graph, x: str) -> tuple[str, str, str, str]:
    """Measure the picture inside the letterbox: (content width, height, x ramp, y ramp), floats."""
    away = g.op("Abs", g.op("Sub", x, g.const(_PAD_VALUE)))
    dist = g.op("ReduceSum", away, g.const([1], np.int64), keepdims=1)  # [1,1,H,W]
    real = g.op("Cast", g.op("Greater", dist, g.const(1e-3)), to=TensorProto.FLOAT)  # 1 = not padding
    col_real = g.op("ReduceMax", real, axes=[0, 1, 2], keepdims=0)  # [W]
    row_real = g.op("ReduceMax", real, axes=[0, 1, 3], keepdims=0)  # [H]
    shape = g.op("Shape", x)  # [4] int64 = 1,3,H,W
    one = g.const(1.0)
    extent = []
    for axis, flags in ((3, col_real), (2, row_real)):
        size = g.op("Gather", shape, g.const(axis, np.int64), axis=0)  # int64 scalar
        ramp = _make_ramp(g, size)  # [W] or [H]: 0, 1, 2, ...
        last = g.op("ReduceMax", g.op("Mul", g.op("Add", ramp, one), flags), keepdims=0)  # scalar
        extent.append((last, ramp))
    (width, ramp_x), (height, ramp_y) = extent
    return width, height, ramp_x, ramp_y


def _make_texture_gate(g: _Graph, x: str, width: str, height: str, ramp_x: str, ramp_y: str) -> str:
    """Face confidence in 0..1: sigmoid of the picture's std (letterbox excluded) over a threshold."""
    col_in = g.op("Cast", g.op("Less", ramp_x, width), to=TensorProto.FLOAT)  # [W]
    row_in = g.op("Cast", g.op("Less", ramp_y, height), to=TensorProto.FLOAT)  # [H]
    mask = g.op("Mul", g.op("Unsqueeze", row_in, g.const([1], np.int64)), col_in)  # [H,W]
    count = g.op("Max", g.op("Mul", g.op("ReduceSum", mask, keepdims=0), g.const(3.0)), g.const(1.0))
    mean = g.op("Div", g.op("ReduceSum", g.op("Mul", x, mask), keepdims=0), count)  # scalar
    centred = g.op("Mul", g.op("Sub", x, mean), mask)  # [1,3,H,W]
    var = g.op("Div", g.op("ReduceSum", g.op("Mul", centred, centred), keepdims=0), count)
    margin = g.op("Sub", g.op("Sqrt", var), g.const(DETECTOR_MIN_STD))
    return g.op("Sigmoid", g.op("Mul", margin, g.const(DETECTOR_GATE_GAIN)))


def _make_anchor_grid(g: _Graph, x: str, stride: int) -> tuple[str, str, str]:
    """Anchor centres in insightface's order (row-major cells, 2 anchors each): cx, cy, anchor id."""
    hw = g.op("Slice", g.op("Shape", x), *_span(g, 2, 4))  # [2] int64 = H,W
    cells = g.op("Div", hw, g.const(stride, np.int64))  # [2] int64 = Hs,Ws
    zero, s = g.const(0.0), g.const(float(stride))
    spans = []
    for index in (1, 0):  # x along the width, then y along the height
        n = g.op("Gather", cells, g.const(index, np.int64), axis=0)  # int64 scalar
        spans.append(g.op("Mul", _make_ramp(g, n), s))  # [Ws] / [Hs] px
    xs = g.op("Unsqueeze", spans[0], g.const([0, 2], np.int64))  # [1,Ws,1]
    ys = g.op("Unsqueeze", spans[1], g.const([1, 2], np.int64))  # [Hs,1,1]
    zeros = g.op("Add", g.op("Mul", xs, zero), g.op("Mul", ys, zero))  # [Hs,Ws,1]
    pair = g.const([[[0.0, 1.0]]])  # [1,1,2]: each cell holds anchors 0 and 1
    flat = g.const([-1, 1], np.int64)
    # [Hs,Ws,2] -> [K,1], K = Hs*Ws*2, anchor index fastest (as insightface's anchor_centers)
    cx, cy, anchor = (
        g.op("Reshape", g.op("Add", g.op("Add", zeros, term), g.op("Mul", pair, scale)), flat)
        for term, scale in ((xs, zero), (ys, zero), (zeros, g.const(1.0)))
    )
    return cx, cy, anchor


def _make_stride_head(g: _Graph, x: str, stride: int, box: str, kps: str, conf: str) -> tuple[str, str, str]:
    """One stride's outputs: score [K,1], box distances [K,4], keypoint offsets [K,10] (in strides)."""
    cx, cy, anchor = _make_anchor_grid(g, x, stride)  # each [K,1] px / anchor index
    s = g.const(float(stride))
    points = g.op("Concat", cx, cy, cx, cy, axis=1)  # [K,4]
    signs = g.const([1.0, 1.0, -1.0, -1.0])  # left = cx-x1, top = cy-y1, right = x2-cx, bottom = y2-cy
    bbox = g.op("Div", g.op("Mul", g.op("Sub", points, box), signs), s, out=f"bbox_{stride}")
    centres = g.op("Concat", *([cx, cy] * 5), axis=1)  # [K,10] x,y per keypoint
    kpss = g.op("Div", g.op("Sub", kps, centres), s, out=f"kps_{stride}")
    if stride != DETECTOR_FACE_STRIDE:
        return g.op("Mul", cx, g.const(0.0), out=f"score_{stride}"), bbox, kpss
    corners = g.op("Add", g.op("Slice", box, *_span(g, 0, 2)), g.op("Slice", box, *_span(g, 2, 4)))  # [2]
    centre = g.op("Div", corners, g.const(2.0))  # [2] x,y px of the face centre
    cell = g.op("Mul", g.op("Floor", g.op("Div", centre, s)), s)  # [2] px of the cell holding the centre
    hits = [
        g.op("Equal", cx, g.op("Gather", cell, g.const(0, np.int64), axis=0)),
        g.op("Equal", cy, g.op("Gather", cell, g.const(1, np.int64), axis=0)),
        g.op("Equal", anchor, g.const(0.0)),
    ]
    hit = g.op("Cast", g.op("And", g.op("And", hits[0], hits[1]), hits[2]), to=TensorProto.FLOAT)
    return g.op("Mul", hit, conf, out=f"score_{stride}"), bbox, kpss


def _span(g: _Graph, start: int, end: int) -> tuple[str, str]:
    """Initializers for a 1-D Slice [start:end]."""
    return g.const([start], np.int64), g.const([end], np.int64)


def _make_ramp(g: _Graph, size: str) -> str:
    """0, 1, ..., size-1 as float32 from an int64 scalar (int64 Range: ORT's static shape inference
    rejects a float Range whose limit comes from Shape)."""
    ramp = g.op("Range", g.const(0, np.int64), size, g.const(1, np.int64))  # [size] int64
    return g.op("Cast", ramp, to=TensorProto.FLOAT)


def _make_detector_graph() -> onnx.ModelProto:
    """SCRFD-shaped fixture graph: one face at FIXTURE_* unless the picture is uniform."""
    g = _Graph()
    x = "input.1"  # [1,3,H,W] RGB, (x - 127.5) / 128, letterboxed with black at bottom/right
    width, height, ramp_x, ramp_y = _make_content_extent(g, x)
    conf = _make_texture_gate(g, x, width, height, ramp_x, ramp_y)
    zero_axis = g.const([0], np.int64)
    dims = (g.op("Unsqueeze", width, zero_axis), g.op("Unsqueeze", height, zero_axis))
    size = g.op("Concat", *dims, axis=0)  # [2] = content width, height in px
    box = g.op("Mul", g.const(FIXTURE_FACE_BOX), g.op("Tile", size, g.const([2], np.int64)))  # [4] px
    kps = g.op("Mul", g.const(np.ravel(FIXTURE_FACE_KPS)), g.op("Tile", size, g.const([5], np.int64)))  # [10]
    heads = [_make_stride_head(g, x, stride, box, kps, conf) for stride in DETECTOR_STRIDES]
    outputs = [
        helper.make_tensor_value_info(heads[i][part], TensorProto.FLOAT, [f"anchors_{stride}", columns])
        for part, columns in ((0, 1), (1, 4), (2, 10))
        for i, stride in enumerate(DETECTOR_STRIDES)
    ]  # insightface order: scores 8/16/32, then boxes 8/16/32, then keypoints 8/16/32
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])]
    return _make_model(g, "tiny_scrfd_fixture", inputs, outputs)


def write_detector(path: Path, *, seed: int = 0) -> None:
    """Write the SCRFD-shaped fixture detector (det_10g signature) to ``path``."""
    # The fixture has no random weights: ``seed`` is accepted for a uniform kit API and changes nothing.
    del seed
    _write(path, _make_detector_graph(), "detector")


# --- recognizer (ArcFace w600k_r50 signature) -------------------------------------------------


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> npt.NDArray[np.float32]:
    """Seeded He-normal weights (no BLAS involved, so byte-identical everywhere)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))


def _make_batchnorm(g: _Graph, rng: np.random.Generator, x: str, channels: int, prefix: str, out: str) -> str:
    """Inference BatchNormalization with seeded scale and unit running statistics."""
    scale = 1.0 + 0.1 * rng.standard_normal(channels, dtype=np.float32)  # [C]
    zeros, ones = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    params = [
        g.const(scale, name=f"{prefix}.weight"),
        g.const(zeros, name=f"{prefix}.bias"),
        g.const(zeros, name=f"{prefix}.running_mean"),
        g.const(ones, name=f"{prefix}.running_var"),
    ]
    return g.op("BatchNormalization", x, *params, epsilon=1e-5, out=out)


def _make_conv_stack(g: _Graph, rng: np.random.Generator, x: str) -> str:
    """Stride-2 3x3 convs with PReLU: [N,3,112,112] -> [N,C,7,7]."""
    c_in = 3
    for i, c_out in enumerate(RECOGNIZER_CHANNELS):
        weight = g.const(_he(rng, (c_out, c_in, 3, 3), c_in * 9), name=f"conv{i}.weight")  # [O,I,3,3]
        bias = g.const(np.zeros(c_out, np.float32), name=f"conv{i}.bias")
        conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        x = g.op("Conv", x, weight, bias, out=f"conv{i}", **conv)  # [N,O,H/2,W/2]
        if i < len(RECOGNIZER_CHANNELS) - 1:
            slope = g.const(np.full((c_out, 1, 1), 0.25, np.float32), name=f"prelu{i}.slope")  # [C,1,1]
            x = g.op("PRelu", x, slope, out=f"prelu{i}")
        c_in = c_out
    return x


def _make_recognizer_graph(seed: int) -> onnx.ModelProto:
    """ArcFace-shaped graph: conv stack -> BN -> Flatten -> Gemm -> BN, like w600k_r50's tail."""
    rng = np.random.default_rng(seed)
    g = _Graph()
    x = "input.1"  # [N,3,112,112] RGB, (x - 127.5) / 127.5, aligned with the arcface template
    channels = RECOGNIZER_CHANNELS[-1]
    features = _make_conv_stack(g, rng, x)  # [N,C,7,7]
    face_map = _make_batchnorm(g, rng, features, channels, "bn2", out="face_map")  # [N,C,7,7]: face tokens
    flat = g.op("Flatten", face_map, axis=1, out="flatten")  # [N,C*49]
    fan_in = channels * 7 * 7
    weight = g.const(_he(rng, (EMBEDDING_SIZE, fan_in), fan_in), name="fc.weight")  # [512,C*49]
    bias = g.const(np.zeros(EMBEDDING_SIZE, np.float32), name="fc.bias")
    fc = g.op("Gemm", flat, weight, bias, transB=1, out="fc")  # [N,512]
    embedding = _make_batchnorm(g, rng, fc, EMBEDDING_SIZE, "features", out="embedding")  # [N,512]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["N", EMBEDDING_SIZE])]
    return _make_model(g, "tiny_arcface", inputs, outputs)


def write_recognizer(path: Path, *, seed: int = 0) -> None:
    """Write the tiny ArcFace-shaped recognizer (w600k_r50 signature) to ``path``."""
    _write(path, _make_recognizer_graph(seed), "recognizer")


# --- swapper (inswapper_128 signature) --------------------------------------------------------


def _make_orthogonal(rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    """Seeded orthogonal matrix: a Sylvester Hadamard with shuffled rows/columns and random signs."""
    hadamard = np.ones((1, 1), np.int8)
    while hadamard.shape[0] < size:  # size must be a power of two
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    rows, cols = rng.permutation(size), rng.permutation(size)
    signs = rng.choice(np.array([-1, 1], np.int8), size=(2, size))
    matrix = hadamard[rows][:, cols] * signs[0][:, None] * signs[1][None, :]  # exact ±1
    return (matrix / np.sqrt(size)).astype(np.float32)  # [size,size], rows and columns orthonormal


def _make_swapper_graph(seed: int, identity: bool) -> onnx.ModelProto:
    """inswapper-shaped graph: target plus a per-channel colour shift derived from the source latent."""
    rng = np.random.default_rng(seed)
    g = _Graph()
    emap = _make_orthogonal(rng, EMBEDDING_SIZE)  # [512,512]
    colour = rng.standard_normal((EMBEDDING_SIZE, 3), dtype=np.float32)  # [512,3] embedding -> RGB
    strength = 0.0 if identity else SWAPPER_STRENGTH  # identity: target + 0 is the target, bit for bit
    # insightface feeds latent = normed_embedding @ emap (renormalised); emap is orthogonal, so
    # latent @ emap^T recovers the identity's normed embedding.
    embedding = g.op("Gemm", "source", "emap", transB=1)  # [1,512]
    mix = g.op("Tanh", g.op("MatMul", embedding, g.const(colour, name="colour.weight")))  # [1,3] in -1..1
    shift = g.op("Mul", mix, g.const(strength, name="strength"))  # [1,3]
    shift = g.op("Reshape", shift, g.const([1, 3, 1, 1], np.int64))  # [1,3,1,1] per RGB channel
    if identity:
        out = g.op("Add", "target", shift, out="output")  # [1,3,128,128] RGB, equal to the target
    else:
        shifted = g.op("Add", "target", shift)  # [1,3,128,128] RGB
        out = g.op("Clip", shifted, g.const(0.0), g.const(1.0), out="output")  # RGB 0..1
    g.const(emap, name="emap")  # must stay the LAST initializer: INSwapper reads initializer[-1]
    size = SWAPPER_SIZE
    inputs = [
        helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, size, size]),  # RGB 0..1
        helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, EMBEDDING_SIZE]),  # latent
    ]
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3, size, size])]
    return _make_model(g, "tiny_inswapper", inputs, outputs)


def write_swapper(path: Path, *, seed: int = 0, identity: bool = False) -> None:
    """Write the tiny inswapper-shaped swapper (or, with ``identity``, one returning its target)."""
    what = "swapper (returns its target)" if identity else "swapper"
    _write(path, _make_swapper_graph(seed, identity), what)
