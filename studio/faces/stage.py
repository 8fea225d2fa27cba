"""The refine stage's entry: the refine models, their loading, and ``refine`` itself.

Re-exported by ``studio.faces``. The model libraries (onnxruntime, insightface, torch for the upscaler)
are imported by the loaders, when a model is first loaded, not when this module is imported.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from studio.adapter.tokens import FaceTokenEncoder
from studio.config import DetectConfig, RefineConfig, StudioConfig
from studio.errors import ModelError
from studio.faces.detect import detect_faces, embed_faces
from studio.faces.quality import FaceQA, SwapEmbeddings, assess
from studio.faces.select import Cast, assign_faces
from studio.faces.swap import cached_latent, refine_face
from studio.faces.upscale import Upscaler, load_upscaler
from studio.models.cache import ModelCache, Recent
from studio.models.catalogue import Catalogue
from studio.models.resolve import ResolvedModel, resolve
from studio.models.runtime import choose_device, load_insightface_model, onnx_providers
from studio.types import Face, Identity, ImageBGR, ModelKind

logger = logging.getLogger(__name__)

ANALYSED_PICTURES = 16  # pictures whose faces and embeddings are kept for the next refine of the same pixels


@dataclass(frozen=True, eq=False)
class FaceModels:
    """The loaded refine models (from one ModelCache) and the recognizer's checksum."""

    detector: Any  # insightface SCRFD
    recognizer: Any  # insightface ArcFaceONNX
    swapper: Any  # insightface INSwapper
    upscaler: Upscaler | None
    recognizer_sha256: str


@dataclass(frozen=True, eq=False)
class RefineResult:
    """One refined picture and what happened to it."""

    image: ImageBGR  # HxWx3 uint8 BGR; the input unchanged unless status is "ok" or "failed_qa"
    status: str  # "ok", "failed_qa", or an assignment status: "no_faces", "too_few_faces", ...
    message: str
    faces_found: int
    qa: tuple[FaceQA, ...] = ()
    upscaled: tuple[bool, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # ms

    @property
    def changed(self) -> bool:
        """True when faces were swapped (whether or not they passed QA)."""
        return self.status in ("ok", "failed_qa")

    def to_recipe(self) -> dict[str, Any]:
        """The JSON-ready record stored in the output's recipe."""
        return {
            "status": self.status,
            "message": self.message,
            "faces_found": self.faces_found,
            "qa": [asdict(q) for q in self.qa],
            "upscaled": list(self.upscaled),
            "timings_ms": {k: round(v, 2) for k, v in self.timings.items()},
        }


def refine_models(config: StudioConfig, catalogue: Catalogue) -> dict[str, ResolvedModel]:
    """The models a refine run uses, resolved (checked, licence applied) before any work."""
    refine = config.refine
    roles: dict[str, tuple[str, ModelKind]] = {
        "detector": (refine.detector, "detector"),
        "recognizer": (refine.recognizer, "recognizer"),
        "swapper": (refine.swapper, "swapper"),
    }
    if refine.upscale != "off":
        roles["upscaler"] = (refine.upscaler, "upscaler")
    return {role: resolve(ref, kind, config, catalogue) for role, (ref, kind) in roles.items()}


def load_face_model(model: ResolvedModel, config: StudioConfig, cache: ModelCache) -> Any:
    """One insightface model (detector, recognizer or swapper), loaded once per process."""
    providers, threads = onnx_providers(config.runtime.onnx_providers), config.runtime.threads
    key = ("insightface", model.sha256, tuple(providers), threads)
    return cache.get(key, lambda: load_insightface_model(model.path, providers, threads))


def load_token_encoder(model: ResolvedModel, config: StudioConfig, cache: ModelCache) -> FaceTokenEncoder:
    """The recognizer graph with its face-token output exposed (for enrolment), built once per process."""
    providers, threads = onnx_providers(config.runtime.onnx_providers), config.runtime.threads
    key = ("face-tokens", model.sha256, tuple(providers), threads)
    return cache.get(key, lambda: FaceTokenEncoder(model.path, providers, threads))


def load_face_models(
    models: Mapping[str, ResolvedModel], config: StudioConfig, cache: ModelCache
) -> FaceModels:
    """Load (once per process) the detector, recognizer, swapper and upscaler of ``refine_models``."""
    upscaler = None
    if "upscaler" in models:
        model, device = models["upscaler"], choose_device(config.runtime.device)
        if model.entry is None:
            raise ModelError(
                f"The upscaler {model.ref!r} is not catalogued; its architecture comes from the catalogue.",
                fix="catalogue it in configs/models.toml (see realesrgan_x2plus) and name that entry.",
            )
        upscaler = cache.get(
            ("upscaler", model.sha256, str(device), config.refine.upscale_tile),
            lambda: load_upscaler(
                model.entry,
                model.path,
                tile=config.refine.upscale_tile,
                device=device,
                half=device.type == "cuda",
            ),
        )
    loaded = [load_face_model(models[role], config, cache) for role in ("detector", "recognizer", "swapper")]
    return FaceModels(*loaded, upscaler=upscaler, recognizer_sha256=models["recognizer"].sha256)


def refine(
    image: ImageBGR,
    cast: Cast,
    identities: Mapping[str, Identity],
    models: FaceModels,
    settings: RefineConfig,
    cache: ModelCache,
) -> RefineResult:
    """Swap the faces ``cast`` maps onto their identities; never onto a face the mapping cannot place."""
    timings: dict[str, float] = {}
    # 1. detect, in a stable left-to-right order, and embed the original faces (selection and QA baseline)
    start = time.perf_counter()
    faces, before = analyse_faces(image, models, settings.detect, cache)  # before: (N, 512) L2-normed
    timings["detect"] = _ms(start)
    # 2. map identities onto faces; an image the mapping does not fit is left untouched
    reference = identities[cast.match] if cast.match else None
    similarity = None if reference is None else (lambda i: float(before[i] @ reference.embedding))
    mode = cast.select or settings.select
    assignment = assign_faces(faces, cast.spec, mode, index=cast.index, similarity=similarity)
    if assignment.status != "ok":
        return RefineResult(image, assignment.status, assignment.message, len(faces), timings=timings)
    # 3. swap (+ upscale) and blend each assigned face into one working canvas
    start = time.perf_counter()
    canvas, upscaled = image.copy(), []
    for face_index, name in assignment.pairs:
        identity = identities[name]
        latent = cached_latent(cache, _identity_key(identity), identity.embedding, models.swapper)
        canvas, stats = refine_face(
            canvas,
            faces[face_index],
            latent,
            models.swapper,
            settings,
            upscaler=models.upscaler,
            inplace=True,
        )
        upscaled.append(stats.upscaled)
    timings["swap"] = _ms(start)
    # 4. QA: ArcFace similarity of each result face (and of the original) to its identity
    start = time.perf_counter()
    after = embed_faces(canvas, [faces[i] for i, _ in assignment.pairs], models.recognizer)
    swaps = [
        SwapEmbeddings(i, name, identities[name].embedding, before[i], after[k])
        for k, (i, name) in enumerate(assignment.pairs)
    ]
    qa = tuple(assess(swaps, min_similarity=settings.min_similarity))
    timings["qa"] = _ms(start)
    status = "ok" if all(q.passed for q in qa) else "failed_qa"
    message = assignment.message if status == "ok" else f"{assignment.message}; QA failed"
    return RefineResult(canvas, status, message, len(faces), qa, tuple(upscaled), timings)


def analyse_faces(
    image: ImageBGR, models: FaceModels, settings: DetectConfig, cache: ModelCache
) -> tuple[tuple[Face, ...], npt.NDArray[np.float32]]:
    """The faces in ``image`` and their embeddings, computed once per picture: every identity and slot map
    applied to one draft shares them (a small LRU of recent pictures, keyed by their pixels)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()
    key = (digest, image.shape, id(models.detector), models.recognizer_sha256, settings)
    recent = cache.get(("face-analyses",), lambda: Recent(ANALYSED_PICTURES))
    found = recent.get(key)
    if found is None:
        faces = detect_faces(image, models.detector, settings)
        found = recent.put(key, (faces, embed_faces(image, faces, models.recognizer)))
    return found


def _identity_key(identity: Identity) -> str:
    """Identity name plus a digest of its embedding: a re-enrolled identity gets a fresh latent."""
    digest = hashlib.sha256(np.ascontiguousarray(identity.embedding, dtype=np.float32).tobytes()).hexdigest()
    return f"{identity.name}:{digest[:16]}"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
