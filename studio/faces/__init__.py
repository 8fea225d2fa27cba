"""Refine stage: detect faces, map identities, swap, upscale, blend back, check. One public entry: ``refine``.

``draft/`` and ``faces/`` never import each other; ``studio.pipeline`` is where they meet.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from studio.adapter.tokens import FaceTokenEncoder
from studio.config import FaceSelect, StudioConfig
from studio.faces.detect import DetectSettings, detect_faces, embed_faces
from studio.faces.quality import FaceQA, SwapEmbeddings, assess
from studio.faces.select import IdentitySpec, assign_faces
from studio.faces.swap import RefineFaceSettings, cached_latent, refine_face
from studio.faces.upscale import Upscaler, load_upscaler
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry
from studio.models.runtime import choose_device, load_insightface_model, onnx_providers
from studio.models.store import require_verified
from studio.types import Identity, ImageBGR

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FaceModels:
    """The loaded refine models (from one ModelCache) and the recognizer's checksum."""

    detector: Any  # insightface SCRFD
    recognizer: Any  # insightface ArcFaceONNX
    swapper: Any  # insightface INSwapper
    upscaler: Upscaler | None
    recognizer_sha256: str


@dataclass(frozen=True)
class RefineSettings:
    """Detection, selection, per-face refinement and QA settings."""

    detect: DetectSettings
    face: RefineFaceSettings
    select: FaceSelect = "all"
    index: int = 0  # the face for select = "index"
    min_similarity: float = 0.0

    @classmethod
    def from_config(
        cls, config: StudioConfig, *, select: FaceSelect | None = None, index: int = 0
    ) -> RefineSettings:
        """The settings ``[refine]`` asks for, with the request's selection if given."""
        refine = config.refine
        return cls(
            DetectSettings.from_config(refine),
            RefineFaceSettings.from_config(refine),
            select or refine.select,
            index,
            refine.min_similarity,
        )


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


def refine_entries(config: StudioConfig, catalogue: Catalogue) -> list[ModelEntry]:
    """The catalogue entries a refine run uses (for licence checks before any work)."""
    refine = config.refine
    entries = [
        catalogue.entry(refine.detector, "detector"),
        catalogue.entry(refine.recognizer, "recognizer"),
        catalogue.entry(refine.swapper, "swapper"),
    ]
    if refine.upscale != "off":
        entries.append(catalogue.entry(refine.upscaler, "upscaler"))
    return entries


def load_face_model(entry: ModelEntry, config: StudioConfig, cache: ModelCache) -> Any:
    """One insightface model (detector, recognizer or swapper), loaded once per process."""
    providers = onnx_providers(config.runtime.onnx_providers)
    path = require_verified(entry, config.models)
    key = ("insightface", entry.name, entry.sha256, tuple(providers))
    return cache.get(key, lambda: load_insightface_model(path, providers))


def load_token_encoder(entry: ModelEntry, config: StudioConfig, cache: ModelCache) -> FaceTokenEncoder:
    """The recognizer graph with its face-token output exposed (for enrolment), built once per process."""
    providers = onnx_providers(config.runtime.onnx_providers)
    path = require_verified(entry, config.models)
    key = ("face-tokens", entry.name, entry.sha256, tuple(providers))
    return cache.get(key, lambda: FaceTokenEncoder(path, providers))


def load_face_models(config: StudioConfig, catalogue: Catalogue, cache: ModelCache) -> FaceModels:
    """Load (once per process) the detector, recognizer, swapper and upscaler the config names."""
    detector, recognizer, swapper, *upscale = refine_entries(config, catalogue)
    upscaler = None
    if upscale:
        entry, device = upscale[0], choose_device(config.runtime.device)
        path = require_verified(entry, config.models)
        upscaler = cache.get(
            ("upscaler", entry.name, str(device)),
            lambda: load_upscaler(
                entry, path, tile=config.refine.upscale_tile, device=device, half=device.type == "cuda"
            ),
        )
    load = [load_face_model(entry, config, cache) for entry in (detector, recognizer, swapper)]
    return FaceModels(*load, upscaler=upscaler, recognizer_sha256=recognizer.sha256)


def refine(
    image: ImageBGR,
    spec: IdentitySpec,
    identities: Mapping[str, Identity],
    models: FaceModels,
    settings: RefineSettings,
    cache: ModelCache,
    *,
    reference: Identity | None = None,
) -> RefineResult:
    """Swap the faces ``spec`` maps onto their identities; never onto a face the mapping cannot place."""
    timings: dict[str, float] = {}
    # 1. detect, in a stable left-to-right order, and embed the original faces (selection and QA baseline)
    start = time.perf_counter()
    faces = detect_faces(image, models.detector, settings.detect)
    before = embed_faces(image, faces, models.recognizer)  # (N, 512) L2-normed
    timings["detect"] = _ms(start)
    # 2. map identities onto faces; an image the mapping does not fit is left untouched
    similarity = None if reference is None else (lambda i: float(before[i] @ reference.embedding))
    assignment = assign_faces(faces, spec, settings.select, index=settings.index, similarity=similarity)
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
            settings.face,
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


def _identity_key(identity: Identity) -> str:
    """Identity name plus a digest of its embedding: a re-enrolled identity gets a fresh latent."""
    digest = hashlib.sha256(np.ascontiguousarray(identity.embedding, dtype=np.float32).tobytes()).hexdigest()
    return f"{identity.name}:{digest[:16]}"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
