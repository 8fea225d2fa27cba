"""The refine stage's entry: the refine models, their loading, and ``refine`` itself.

Re-exported by ``studio.faces``. The model libraries (onnxruntime, insightface, torch for the upscaler)
are imported by the loaders, when a model is first loaded, not when this module is imported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from studio.config import RefineConfig, StudioConfig
from studio.faces.analysis import PictureAnalysis, analyse_picture
from studio.faces.blend import blend_face
from studio.faces.detect import ARCFACE_SIZE, embed_crops
from studio.faces.loading import load_face_model, load_onnx_model
from studio.faces.masks import MaskModel
from studio.faces.processors import PROCESSORS, FaceJob, FaceProcessor, SwapProcessor
from studio.faces.quality import FaceQA, SwapEmbeddings, assess
from studio.faces.select import Assignment, Cast, assign_faces
from studio.faces.template import assign_template
from studio.faces.upscale import Upscaler
from studio.geometry import warp_to_crop
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue
from studio.models.resolve import ResolvedModel, resolve
from studio.types import Identity, ImageBGR, ModelKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FaceModels:
    """The loaded refine models (from one ModelCache): detection and recognition, the processors in order,
    the mask models the settings ask for, and the recognizer's checksum."""

    detector: Any  # insightface SCRFD
    recognizer: Any  # insightface ArcFaceONNX
    processors: tuple[FaceProcessor, ...]
    occluder: MaskModel | None
    parser: MaskModel | None
    recognizer_sha256: str

    @property
    def upscaler(self) -> Upscaler | None:
        """The swap processor's Real-ESRGAN upscaler, if one is loaded."""
        return next((p.upscaler for p in self.processors if isinstance(p, SwapProcessor)), None)


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


def refine_models(
    config: StudioConfig, catalogue: Catalogue, settings: RefineConfig | None = None
) -> dict[str, ResolvedModel]:
    """The models a refine run uses under ``settings`` (default: the config's), resolved (checked, licence
    applied) before any work: detector, recognizer, each processor's models, the mask models asked for."""
    settings = settings or config.refine
    roles: dict[str, tuple[str, ModelKind]] = {
        "detector": (settings.detector, "detector"),
        "recognizer": (settings.recognizer, "recognizer"),
    }
    for name in settings.processors:
        roles.update(PROCESSORS[name].models(settings))
    if settings.mask.occlusion:
        roles["occluder"] = (settings.occluder, "occluder")
    if settings.mask.regions:
        roles["parser"] = (settings.parser, "parser")
    return {role: resolve(ref, kind, config, catalogue) for role, (ref, kind) in roles.items()}


def load_face_models(
    models: Mapping[str, ResolvedModel],
    config: StudioConfig,
    cache: ModelCache,
    settings: RefineConfig | None = None,
) -> FaceModels:
    """Load (once per process) the models of ``refine_models`` and prepare the processors."""
    settings = settings or config.refine
    detector, recognizer = (
        load_face_model(models[role], config, cache) for role in ("detector", "recognizer")
    )
    processors = tuple(PROCESSORS[name].load(models, config, settings, cache) for name in settings.processors)
    occluder, parser = (
        _mask_model(models[role], config, cache, default) if role in models else None
        for role, default in (("occluder", 256), ("parser", 512))
    )
    return FaceModels(detector, recognizer, processors, occluder, parser, models["recognizer"].sha256)


def refine(
    image: ImageBGR,
    cast: Cast,
    identities: Mapping[str, Identity],
    models: FaceModels,
    settings: RefineConfig,
    cache: ModelCache,
) -> RefineResult:
    """Run the processors on the faces ``cast`` maps onto identities; never on a face it cannot place."""
    timings: dict[str, float] = {}
    # 1. detect (stable left-to-right order) and embed, once per picture: selection and QA baseline
    start = time.perf_counter()
    analysis = analyse_picture(
        image, models.detector, models.recognizer, models.recognizer_sha256, settings.detect, cache
    )
    faces, before = analysis.faces, analysis.embeddings  # before: (N, 512) L2-normed
    timings["detect"] = _ms(start)
    # 2. map identities onto faces; an image the mapping does not fit is left untouched
    assignment = _assign(image, cast, identities, settings, analysis)
    if assignment.status != "ok":
        return RefineResult(image, assignment.status, assignment.message, len(faces), timings=timings)
    jobs = [FaceJob(i, faces[i], identities[name]) for i, name in assignment.pairs]
    # 3. each processor on every assigned face (one batch per picture), pasted into one working canvas
    canvas, upscaled = image.copy(), [False] * len(jobs)
    for step, processor in enumerate(models.processors):
        start = time.perf_counter()
        grown = _run_processor(processor, canvas, image, jobs, analysis, models, settings, first=step == 0)
        upscaled = [a or b for a, b in zip(upscaled, grown, strict=True)]
        timings[processor.name] = _ms(start)
    # 4. QA: ArcFace similarity of each result face (and of the original) to its identity
    start = time.perf_counter()
    # cut as the analysis cut the picture's own ArcFace crops, with the alignments it keeps
    qa_crops = [
        warp_to_crop(canvas, analysis.alignment(job.index, "arcface", ARCFACE_SIZE), ARCFACE_SIZE)
        for job in jobs
    ]
    after = embed_crops(qa_crops, models.recognizer)
    swaps = [
        SwapEmbeddings(job.index, job.identity.name, job.identity.embedding, before[job.index], after[k])
        for k, job in enumerate(jobs)
    ]
    qa = tuple(assess(swaps, min_similarity=settings.min_similarity))
    timings["qa"] = _ms(start)
    status = "ok" if all(q.passed for q in qa) else "failed_qa"
    message = assignment.message if status == "ok" else f"{assignment.message}; QA failed"
    return RefineResult(canvas, status, message, len(faces), qa, tuple(upscaled), timings)


def _assign(
    image: ImageBGR,
    cast: Cast,
    identities: Mapping[str, Identity],
    settings: RefineConfig,
    analysis: PictureAnalysis,
) -> Assignment:
    """Which face becomes whom: template slots (position and embedding), else the cast's selection."""
    faces, before = analysis.faces, analysis.embeddings
    if cast.template is not None:  # image.shape: H, W, 3
        return assign_template(cast.template, faces, before, (image.shape[1], image.shape[0]), cast.spec)
    reference = identities[cast.match] if cast.match else None
    similarity = None if reference is None else (lambda i: float(before[i] @ reference.embedding))
    mode = cast.select or settings.select
    return assign_faces(faces, cast.spec, mode, index=cast.index, similarity=similarity)


def _run_processor(
    processor: FaceProcessor,
    canvas: ImageBGR,
    image: ImageBGR,
    jobs: list[FaceJob],
    analysis: PictureAnalysis,
    models: FaceModels,
    settings: RefineConfig,
    *,
    first: bool,
) -> list[bool]:
    """Cut every job's crop, process them as one batch, paste each into ``canvas`` (in place) through its
    mask. The first processor reads the untouched picture, whose crops the analysis already keeps.
    Returns, per job, whether the processor handed back a larger crop than it read (upscaled)."""
    template, size = processor.template, processor.size
    affines = [analysis.alignment(job.index, template, size) for job in jobs]
    crops = [
        analysis.original(image, job.index, template, size) if first else warp_to_crop(canvas, affine, size)
        for job, affine in zip(jobs, affines, strict=True)
    ]
    results = processor.process(crops, jobs)
    for job, result in zip(jobs, results, strict=True):
        side = int(result.shape[0])
        kept = (image, job.index, template, side, settings.mask, (models.occluder, models.parser))
        mask = analysis.mask(*kept)
        colour = analysis.colour(*kept) if processor.colour_match else None
        blend_face(
            canvas,
            result,
            analysis.alignment(job.index, template, side),
            settings.mask,
            mask=mask,
            colour=colour,
            strength=processor.strength,
            poisson=settings.blend == "poisson",
            inplace=True,
        )
    return [int(r.shape[0]) > size for r in results]


def _mask_model(
    model: ResolvedModel, config: StudioConfig, cache: ModelCache, default_side: int
) -> MaskModel:
    return MaskModel.load(model, load_onnx_model(model, config, cache), default_side)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
