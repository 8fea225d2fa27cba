"""Face tokens: the recognizer's last spatial feature map, read in the same run as its embedding.

FACT feeds the adapter a face encoder's penultimate tokens. With an ArcFace ResNet (w600k_r50) those
are the 7x7 feature map just before the embedding head: the graph ends
``... -> BatchNormalization -> Flatten -> Gemm -> BatchNormalization (the embedding)``, and the
Flatten's input [N, C, 7, 7] (C = 512 for w600k_r50) is 49 tokens of width C, each the features of one
face region. ``FaceTokenEncoder`` loads the ONNX graph, adds that tensor as a second graph output (in
memory only, the model file is not changed) and runs one session that returns both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from studio.errors import IdentityError, InputError, ModelError
from studio.models.runtime import check_session_providers, session_options
from studio.types import Identity, ImageBGR

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

EMBEDDING_SIZE = 512
_PASS_THROUGH = ("Identity", "Dropout")  # inference no-ops an exporter may leave between Flatten and Gemm
_MIN_NORM = 1e-6  # an embedding shorter than this carries no direction

Tokens = npt.NDArray[np.float32]  # (N, T, C) float32: T = H*W spatial tokens of width C, row-major


class FaceTokenEncoder:
    """Face tokens (N, H*W, C) and L2-normed embeddings (N, 512) of aligned crops, one ORT run."""

    def __init__(self, model_path: Path, providers: Sequence[str], threads: int = 0) -> None:
        # onnx and onnxruntime load here, with the first encoder: identity files need neither
        import onnxruntime as ort
        from onnx import helper

        self.model_path = Path(model_path)
        model = _load_graph(self.model_path)
        self.input_name, self.input_size = _graph_input(model, self.model_path)  # size: (width, height)
        self.input_mean, self.input_std = _input_normalisation(model.graph)
        self.embedding_output = model.graph.output[0].name
        self.token_output = _token_tensor(model.graph, self.model_path)
        elem_type = model.graph.input[0].type.tensor_type.elem_type
        model.graph.output.append(helper.make_tensor_value_info(self.token_output, elem_type, None))
        options = session_options(threads)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
        self.providers = check_session_providers(self.session, list(providers), self.model_path)
        self._token_shape = self._probe_token_shape()

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, C): tokens per crop and their width, e.g. (49, 512) for w600k_r50."""
        return self._token_shape

    def encode(self, crops: Sequence[ImageBGR]) -> tuple[Tokens, npt.NDArray[np.float32]]:
        """(tokens (N, T, C) float32, embeddings (N, 512) float32 L2-normed) of aligned BGR crops."""
        crops = list(crops)
        if not crops:
            tokens, width = self._token_shape
            return np.zeros((0, tokens, width), np.float32), np.zeros((0, EMBEDDING_SIZE), np.float32)
        for crop in crops:
            self._check_crop(crop)
        feature_map, raw = self._forward_session(crops)  # [N, C, H, W], (N, 512)
        n, c, h, w = feature_map.shape
        tokens = feature_map.transpose(0, 2, 3, 1).reshape(n, h * w, c)  # [N, C, H, W] -> [N, H*W, C]
        return np.ascontiguousarray(tokens, dtype=np.float32), _normalize_rows(raw, self.model_path)

    def _forward_session(
        self, crops: list[ImageBGR]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Run the recognizer once: (feature map [N, C, H, W], raw embeddings (N, 512))."""
        # the recognizer's own preprocessing (as insightface's ArcFaceONNX.get_feat): BGR -> RGB,
        # (x - mean) / std, HWC -> [N, 3, H, W]
        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / self.input_std, self.input_size, (self.input_mean,) * 3, swapRB=True
        )  # [N, 3, H, W] float32 RGB
        outputs = [self.embedding_output, self.token_output]
        raw, feature_map = self.session.run(outputs, {self.input_name: blob.astype(np.float32)})
        if feature_map.ndim != 4:
            raise ModelError(
                f"{self.model_path.name}: the tensor before its final Flatten has shape {feature_map.shape}; "
                "face tokens need a spatial map [N, C, H, W].",
                fix="use an ArcFace ResNet recognizer such as w600k_r50 for the face adapter.",
            )
        if raw.shape != (len(crops), EMBEDDING_SIZE):
            raise ModelError(
                f"{self.model_path.name} returned embeddings of shape {raw.shape}; expected "
                f"({len(crops)}, {EMBEDDING_SIZE}).",
                fix="use an ArcFace recognizer (e.g. w600k_r50) for the face adapter.",
            )
        return np.asarray(feature_map, np.float32), np.asarray(raw, np.float32)

    def _probe_token_shape(self) -> tuple[int, int]:
        """(T, C) from one run on a grey crop (also checks the outputs' layout once, at load)."""
        width, height = self.input_size
        feature_map, _ = self._forward_session([np.full((height, width, 3), 128, np.uint8)])
        _, c, h, w = feature_map.shape
        return h * w, c

    def _check_crop(self, crop: object) -> None:
        """Raise InputError unless ``crop`` is an aligned HxWx3 uint8 crop of the recognizer's size."""
        width, height = self.input_size
        if isinstance(crop, np.ndarray) and crop.shape == (height, width, 3) and crop.dtype == np.uint8:
            return
        shape, dtype = getattr(crop, "shape", None), getattr(crop, "dtype", None)
        raise InputError(
            f"Face crop of shape {shape}, dtype {dtype} received; expected {height}x{width}x3 uint8 BGR.",
            fix="align faces with studio.faces.detect.align_crops (arcface template).",
        )


def _load_graph(path: Path) -> onnx.ModelProto:
    """The recognizer's ONNX graph (a protobuf, never a pickle)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path))
    except (OSError, DecodeError) as err:
        raise ModelError(
            f"Cannot read the recognizer {path}: {err}.", fix="check the file (studio models verify)."
        ) from err


def _graph_input(model: onnx.ModelProto, path: Path) -> tuple[str, tuple[int, int]]:
    """The image input's name and (width, height) from its declared [N, 3, H, W] shape."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
    if len(dims) != 4 or dims[1] != 3 or dims[2] < 1 or dims[3] < 1:
        raise ModelError(
            f"{path.name}: its input is not an image batch [N, 3, H, W] (declared {dims}).",
            fix="use an ArcFace recognizer such as w600k_r50 for the face adapter.",
        )
    return inputs[0].name, (dims[3], dims[2])


def _input_normalisation(graph: onnx.GraphProto) -> tuple[float, float]:
    """(mean, std) exactly as insightface's ArcFaceONNX decides it, so embeddings match get_feat.

    MXNet-converted recognizers normalise inside the graph (Sub and Mul among the first nodes) and take
    raw 0..255 pixels; all others, w600k_r50 included, take (x - 127.5) / 127.5.
    """
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def _token_tensor(graph: onnx.GraphProto, path: Path) -> str:
    """Name of the Flatten's input feeding the graph's final Gemm: the spatial map [N, C, H, W]."""
    producers = {out: node for node in graph.node for out in node.output}
    gemms = [node for node in graph.node if node.op_type == "Gemm"]  # ONNX nodes are topologically sorted
    if not gemms:
        raise ModelError(
            f"{path.name} has no Gemm (fully connected) node, so no Flatten -> Gemm embedding head to read "
            "face tokens before.",
            fix="use an ArcFace ResNet recognizer such as w600k_r50 for the face adapter.",
        )
    node = producers.get(gemms[-1].input[0])
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Flatten":
        found = "a graph input" if node is None else f"a {node.op_type} node"
        raise ModelError(
            f"{path.name}: its final Gemm is fed by {found}, not by a Flatten; the face adapter reads its "
            "tokens from the spatial map a Flatten -> Gemm embedding head starts with.",
            fix="use an ArcFace ResNet recognizer such as w600k_r50 for the face adapter.",
        )
    return node.input[0]


def _normalize_rows(raw: npt.NDArray[np.float32], path: Path) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length; a non-finite or zero row is a model error."""
    norms = np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)  # (N, 1)
    if not np.isfinite(raw).all() or (norms < _MIN_NORM).any():
        raise ModelError(
            f"{path.name} returned a non-finite or zero embedding.",
            fix="check the recognizer file (studio models verify) and the runtime provider.",
        )
    return (raw / norms).astype(np.float32)  # (N, 512) float32, L2-normed


def identity_condition(
    identity: Identity, photo: int | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(tokens (1, T, C), embedding (1, 512)) of one enrolment photo; by default the most typical one."""
    if identity.face_tokens is None:
        raise IdentityError(
            f"Identity {identity.name!r} has no face tokens (enrolled before the face adapter existed).",
            fix="re-enrol it: `studio identity add NAME PHOTO... --consent TEXT --replace`.",
        )
    count = len(identity.face_tokens)
    if photo is None:
        photo = int(np.argmax(identity.photo_embeddings @ identity.embedding))  # closest to the mean
    if not 0 <= photo < count:
        raise InputError(f"Photo {photo} of identity {identity.name!r} requested; it has {count} photo(s).")
    tokens = identity.face_tokens[photo : photo + 1]  # (1, T, C)
    return tokens, identity.photo_embeddings[photo : photo + 1]  # (1, 512)
