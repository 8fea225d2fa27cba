"""``Studio``: the in-memory stage API every client uses, and the one place the stages meet.

    studio = Studio(load_config("tiny"))
    drafts = studio.draft(GenerateRequest("a lighthouse keeper, {age}", variables={"age": "70"}))
    refined = studio.refine(drafts[0], "anna")          # or "0=anna,1=kenji"; template="duo": its slots
    path = studio.save(refined)                           # the one output sink

``generate`` only chains draft → refine → save; ``refine_files`` opens existing images (their own recipe
becomes the parent of the refined one); ``reproduce`` runs a stored recipe again under its own config.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from studio.config import RefineConfig, StudioConfig, config_from_dict, config_to_dict
from studio.draft import open_draft_pipeline
from studio.draft.base import resolve_base
from studio.draft.request import DraftRequest, FaceCondition, Progress, check_draft, plan_batches
from studio.errors import InputError, RefineError, TemplateError
from studio.faces import (
    FaceModels,
    load_face_model,
    load_face_models,
    load_token_encoder,
    refine,
    refine_models,
)
from studio.faces.consent import ConsentTerms
from studio.faces.detect import detect_faces, embed_faces
from studio.faces.identity import EnrolReport, IdentityLibrary
from studio.faces.select import Cast
from studio.faces.template import (
    Template,
    TemplateLibrary,
    check_template_cast,
    check_template_recognizer,
    validate_template_name,
)
from studio.files import file_stamp, sha256_file
from studio.imageio import read_image, read_metadata
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue
from studio.models.resolve import ResolvedModel, resolve
from studio.models.runtime import apply_threads
from studio.output import FAILED_QA_DIR, OutputSink
from studio.prepare import build_draft_request
from studio.provenance import MARKING_OFF_NOTE, Provenance
from studio.qa import (
    NO_CONTENT_CHECK_NOTE,
    ContentCheck,
    Verdict,
    content_gate,
    gate,
    no_content_check,
    reroll_seed,
)
from studio.recipe import (
    DraftRecord,
    Recipe,
    RefineRecord,
    differences,
    draft_record,
    environment,
    recipe_from_image,
    request_from_recipe,
)
from studio.request import GenerateRequest
from studio.results import Draft, GenerateResult, Refined, Reproduction
from studio.safety import content_check as configured_check
from studio.types import Face, Identity, ImageBGR

if TYPE_CHECKING:
    from studio.draft.pipeline import DraftPipeline

logger = logging.getLogger(__name__)

REFINE_SKIPPED = "refine skipped: no --identity given, faces are left as drafted"
TINY_NOTE = "tiny profile: random-weight models, the pictures are NOT portraits"
TINY_DETECTOR_NOTE = (
    "tiny profile: the face detector is a fixture (one face at a fixed place); so are the occlusion mask "
    "(pure green occludes) and the face parser (fixed regions)"
)


@dataclass(frozen=True, eq=False)
class _RefineSetup:
    """Models and identities for one cast, prepared once per request."""

    cast: Cast
    models: FaceModels
    identities: dict[str, Identity]
    settings: RefineConfig  # the config's refine section with the request's refine options applied
    options: dict[str, Any]  # those options as the request gave them (GenerateRequest.refine_options)
    model_digests: dict[str, str] = field(default_factory=dict)  # role -> sha256


class Studio:
    """Holds the config, the catalogue and the model cache for any number of requests (thread-safe)."""

    def __init__(
        self,
        config: StudioConfig,
        cache: ModelCache | None = None,
        content_check: ContentCheck | None = None,
    ) -> None:
        self.config = config
        self.threads = apply_threads(config.runtime.threads)  # torch and OpenCV; ONNX Runtime per session
        self.cache = cache or ModelCache()
        self.catalogue: Catalogue = open_catalogue(config)
        # the content check safety.* asks for (none: a placeholder that passes, and says so in the notes)
        self.content_check = (
            content_check or configured_check(config, self.catalogue, self.cache) or no_content_check
        )
        self.provenance = Provenance(config)  # marks, signs and audits every output this Studio writes
        self._config_record = config_to_dict(config)  # the config as every recipe records it (frozen)
        self._resolved: dict[Hashable, tuple[tuple[tuple[int, ...], ...], dict[str, ResolvedModel]]] = {}

    @functools.cached_property
    def identities(self) -> IdentityLibrary:
        """The identity library the config points at (one object: it keeps the identities it has read)."""
        return IdentityLibrary.for_config(self.config)

    @functools.cached_property
    def templates(self) -> TemplateLibrary:
        """The multi-person template library the config points at (one object: it keeps what it has read)."""
        return TemplateLibrary.for_config(self.config)

    # -- the stage API -------------------------------------------------------------------------------

    def draft(self, request: GenerateRequest, progress: Progress | None = None) -> list[Draft]:
        """Render ``request``'s drafts in memory (no file is written)."""
        return list(self.iter_drafts(request, progress))

    def iter_drafts(self, request: GenerateRequest, progress: Progress | None = None) -> Iterator[Draft]:
        """Render ``request`` batch by batch, yielding each Draft as its batch finishes."""
        return self._render(request, self._plan(request), progress)

    def planned_recipe(self, request: GenerateRequest, source: Path | None = None) -> Recipe:
        """The recipe (minus outcomes) image ``request.seed`` will carry; checks everything, loads no model.

        Its ``id`` and ``draft_key`` equal those of the output (campaign items are keyed by them).
        ``source``: an existing picture to refine (a re-face) instead of a draft.
        """
        cast = self._cast(request) if source is not None or self.refines(request) else None
        if source is not None:
            picture = self.open(source)
        else:
            one = replace(request, count=1, batch_size=1)
            draft, inputs = self._draft_request(one)
            base = resolve_base(self.config.draft.model, self.catalogue, self.config)
            record, models = draft_record(draft, base, one.seed, (one.seed,), inputs)
            device = self.config.runtime.device
            picture = Draft(np.zeros((0, 0, 3), np.uint8), self._recipe(one, record, models, device))
        if cast is None:
            return picture.recipe
        models, identities = self._refine_plan(cast, self._refine_settings(request))
        record = self._refine_record(cast, identities, {"status": "planned", "message": "", "faces_found": 0})
        options = request.refine_options()
        return self._refined_recipe(picture, record, {r: m.sha256 for r, m in models.items()}, options)

    def check_cast(self, request: GenerateRequest) -> None:
        """Refuse now (IdentityError) if an identity of ``request`` is unknown, revoked or made by another
        recognizer: consent is checked when work starts, not only when it was planned."""
        if request.identity:
            self._refine_plan(self._cast(request), self._refine_settings(request))

    def rebase(self, draft: Draft, request: GenerateRequest) -> Draft:
        """A stored draft as the draft of ``request`` (several requests share a draft when only the
        refine differs: same ``draft_key``)."""
        recipe = replace(
            draft.recipe, request=request.to_dict(), notes=self._notes(refining=self.refines(request))
        )
        return Draft(draft.image, recipe, draft.source)

    def _plan(self, request: GenerateRequest) -> tuple[DraftRequest, dict[str, Any], DraftPipeline]:
        """Everything checked before any rendering: the draft request, its input files, the base model."""
        # 1. the draft request: style, template, LoRAs, pose, init image and face adapter resolved and checked
        draft, inputs = self._draft_request(request)
        # 2. the base model (resolved, licence-checked, loaded once per cache)
        pipeline = open_draft_pipeline(self.config.draft.model, self.catalogue, self.config, self.cache)
        return draft, inputs, pipeline

    def _draft_request(self, request: GenerateRequest) -> tuple[DraftRequest, dict[str, Any]]:
        if request.template is not None:
            request = self._template_draft(request)
        face = self._face_condition(request)
        draft, inputs = build_draft_request(request, self.catalogue, self.config, self.cache, face)
        check_draft(draft)
        return draft, inputs

    def _render(
        self,
        request: GenerateRequest,
        plan: tuple[DraftRequest, dict[str, Any], DraftPipeline],
        progress: Progress | None,
    ) -> Iterator[Draft]:
        draft, inputs, pipeline = plan
        batches = plan_batches(draft.count, draft.batch_size, draft.seed)
        batch_of = {seed: batch for batch in batches for seed in batch}
        for seed, image in pipeline.render(draft, progress):
            yield Draft(image, self._draft_recipe(request, draft, pipeline, seed, batch_of[seed], inputs))

    def open(self, path: Path) -> Draft:
        """An existing picture as the input of a refine; its own recipe (if any) becomes the parent."""
        path = Path(path)
        image = read_image(path, max_pixels=self.config.images.max_pixels)
        meta = read_metadata(path, max_pixels=self.config.images.max_pixels)
        parent = recipe_from_image(meta.recipe, path) if meta.recipe is not None else None
        source = {"path": str(path), "sha256": sha256_file(path)}
        if meta.parameters and parent is None:  # e.g. an A1111 image: keep its infotext
            source["parameters"] = meta.parameters
        recipe = Recipe(request={}, config=self._config_record, models={}, source=source, parent=parent)
        return Draft(image, recipe, source=path)

    def refine(
        self,
        picture: Draft | ImageBGR,
        cast: str | Cast,
        *,
        select: str | None = None,
        index: int = 0,
        match: str | None = None,
        template: str | None = None,
    ) -> Refined:
        """Swap the faces ``cast`` names (``anna``, ``0=anna,1=kenji``) in ``picture``; check each result.

        ``template``: a template's name; ``cast`` then maps its slots, matched to the picture's faces."""
        if not isinstance(cast, Cast):
            cast = Cast.parse(cast, select=select, index=index, match=match)  # type: ignore[arg-type]
        if template is not None:
            cast = self._on_template(cast, template)
        if not isinstance(picture, Draft):
            picture = Draft(
                np.ascontiguousarray(picture), Recipe(request={}, config={}, models={}, source={})
            )
        return self._refine(picture, self._refine_setup(cast))

    def save(
        self,
        result: Draft | Refined,
        folder: Path | None = None,
        sink: OutputSink | None = None,
        parent: Draft | None = None,
    ) -> Path:
        """Write ``result`` through the output sink (marked, signed, audited); a refine that changed
        nothing is refused. ``parent``: the draft a refined picture came from (its C2PA ingredient)."""
        if isinstance(result, Refined) and not result.changed:
            raise RefineError(
                f"Nothing to save: {result.message}.", fix="check the cast against the faces found."
            )
        sink = sink or self._start_sink(folder, result.recipe.request)[0]
        picture = None if parent is None else parent.image
        return sink.write(result.image, result.recipe, _stem(result), parent=picture)

    # -- whole runs (what the command line calls) ----------------------------------------------------------

    def generate(
        self, request: GenerateRequest, progress: Progress | None = None, *, max_rerolls: int = 0
    ) -> GenerateResult:
        """Draft → refine (with ``request.identity``) → QA gate → save, each image as its batch finishes.

        An image that fails the gate is rendered again with a new seed (``reroll_seed``) up to
        ``max_rerolls`` times; one that still fails is written under ``failed-qa/``, marked in its name.
        """
        return self._generate(request, progress, only_seed=None, max_rerolls=max_rerolls)

    def _generate(
        self, request: GenerateRequest, progress: Progress | None, only_seed: int | None, max_rerolls: int = 0
    ) -> GenerateResult:
        timings: dict[str, float] = {"load": 0.0, "draft": 0.0}
        # 1. check everything before any work: models, licences, identities (consent), the output folder
        with _timed(timings, "load"):
            plan = self._plan(request)
            setup = self._refine_setup(self._cast(request), request) if self.refines(request) else None
            sink, config_file = self._start_sink(None, request.to_dict())  # the run's request, kept first
        # 2. draft → refine → gate (→ re-roll) → save, image by image (interrupted: finished ones are kept)
        run = _RunLog(sink)
        drafts = self._render(request, plan, progress)
        while True:
            with _timed(timings, "draft"):
                draft = next(drafts, None)
            if draft is None:
                break
            if only_seed is not None and draft.recipe.seed != only_seed:
                continue  # reproducing one image of a batch: the others are rendered, not written
            label = f"seed {draft.recipe.seed}"
            judged = self._judged(draft, setup, timings, run, label)
            key = (judged.refined or judged.picture).recipe.id  # re-roll seeds derive from the first try's
            for attempt in range(1, max_rerolls + 1):
                if judged.verdict.passed:
                    break
                seed = reroll_seed(key, attempt)
                reasons = "; ".join(judged.verdict.reasons)
                run.statuses.append(f"{label}: re-roll {attempt} with seed {seed} ({reasons})")
                again = replace(request, seed=seed, count=1, batch_size=1)
                with _timed(timings, "draft"):
                    redraft = next(self._render(again, self._plan(again), progress))
                judged = self._judged(redraft, setup, timings, run, f"seed {seed}")
            with _timed(timings, "write"):
                run.write(judged, f"seed {judged.picture.recipe.seed}")
        return run.result(config_file, timings, self._notes(refining=setup is not None))

    def refine_files(self, paths: list[Path], request: GenerateRequest) -> GenerateResult:
        """Refine existing pictures (e.g. a master creative) onto ``request.identity``; never overwrites.

        With ``request.template`` and no ``paths``, the template's master picture is refined."""
        timings: dict[str, float] = {}
        with _timed(timings, "load"):
            cast = self._cast(request)
            if not paths and cast.template is not None:
                paths = [self.templates.image_path(cast.template)]
            setup = self._refine_setup(cast, request)
            sink, config_file = self._start_sink(None, request.to_dict())
        run = _RunLog(sink)
        for path in paths:
            judged = self._judged(self.open(path), setup, timings, run, Path(path).name)
            with _timed(timings, "write"):
                run.write(judged, Path(path).name)
        return run.result(config_file, timings, self._notes(refining=True))

    def judge(self, picture: Draft, request: GenerateRequest) -> tuple[Draft | Refined, Verdict]:
        """Content-check ``picture``, refine it when ``request`` names a cast, and judge the result.

        A picture the content check blocks is not refined (no refine compute is spent on it)."""
        refines = picture.source or self.refines(request)
        setup = self._refine_setup(self._cast(request), request) if refines else None
        judged = self._judged(picture, setup, {}, None, "")
        return judged.refined or judged.picture, judged.verdict

    def _judged(
        self,
        picture: Draft,
        setup: _RefineSetup | None,
        timings: dict[str, float],
        run: _RunLog | None,
        label: str,
    ) -> _Judged:
        """Content-check the picture, refine it (when a cast is set up), judge the result."""
        if setup is None:
            return _Judged(picture, None, gate(picture, self.content_check))
        before = content_gate(picture, self.content_check)
        if before.blocked:  # no refine compute on a blocked draft
            return _Judged(picture, None, before)
        with _timed(timings, "refine"):
            refined = self._refine(picture, setup)
        if run is not None:
            run.statuses.append(f"{label}: {refined.status_line}")
        return _Judged(picture, refined, gate(refined, self.content_check))

    def reproduce(self, image_path: Path, *, use_current_config: bool = False) -> Reproduction:
        """Render an image again from its recipe, under the recipe's own config unless told otherwise."""
        path = Path(image_path)
        recipe = recipe_from_image(read_metadata(path, max_pixels=self.config.images.max_pixels).recipe, path)
        studio = self if use_current_config else self._under(recipe)
        try:
            result, again = studio._repeat(recipe)
        finally:  # the recipe's Studio set its own thread counts for the process: this one's come back
            if studio is not self:
                apply_threads(self.config.runtime.threads)
        same = np.array_equal(read_image(result.outputs[0]), read_image(path))
        found = () if same else tuple(differences(recipe, again) or ["no recorded input differs"])
        return Reproduction(result, same, found)

    def faces(self, picture: Draft | ImageBGR) -> tuple[Face, ...]:
        """The faces the refine stage finds in ``picture``, in cast order: ``0=anna,1=kenji`` numbers them."""
        image = picture.image if isinstance(picture, Draft) else picture
        detector = resolve(self.config.refine.detector, "detector", self.config, self.catalogue)
        model = load_face_model(detector, self.config, self.cache)
        return detect_faces(image, model, self.config.refine.detect)

    def enrol(
        self, name: str, photos: list[Path], *, consent: str | ConsentTerms, replace: bool = False
    ) -> EnrolReport:
        """Enrol identity ``name`` from ``photos`` with its consent (a record alone: scope "internal")."""
        refine_config = self.config.refine
        detector = resolve(refine_config.detector, "detector", self.config, self.catalogue)
        recognizer = resolve(refine_config.recognizer, "recognizer", self.config, self.catalogue)
        return self.identities.enrol(
            name,
            photos,
            consent=consent,
            detector=load_face_model(detector, self.config, self.cache),
            recognizer=load_face_model(recognizer, self.config, self.cache),
            token_encoder=load_token_encoder(recognizer, self.config, self.cache),
            recognizer_sha256=recognizer.sha256,
            settings=refine_config,
            max_pixels=self.config.images.max_pixels,
            replace=replace,
        )

    def add_template(self, name: str, image_path: Path, replace: bool = False) -> Template:
        """Store ``image_path`` as template ``name``: its faces, found and embedded by the refine stage's
        detector and recognizer, become slots 0, 1, ... in left-to-right order."""
        # 1. the name and the picture first: no model is loaded for a name or file that cannot be used
        validate_template_name(name)
        image = read_image(Path(image_path), max_pixels=self.config.images.max_pixels)  # HxWx3 uint8 BGR
        # 2. the faces and their embeddings, as refine sees them
        refine_config = self.config.refine
        faces = self.faces(image)
        if not faces:
            raise TemplateError(
                f"No face found in {image_path} (detector threshold {refine_config.detect.threshold:g}).",
                fix="use a picture in which every person's face is visible and at least "
                f"refine.detect.min_face {refine_config.detect.min_face} px.",
            )
        recognizer = resolve(refine_config.recognizer, "recognizer", self.config, self.catalogue)
        embeddings = embed_faces(image, faces, load_face_model(recognizer, self.config, self.cache))
        # 3. saved with a copy of the picture (atomically)
        size = (image.shape[1], image.shape[0])  # width, height
        return self.templates.add(name, Path(image_path), faces, embeddings, size=size,
                                  recognizer_sha256=recognizer.sha256, replace=replace)  # fmt: skip

    # -- internals ---------------------------------------------------------------------------------

    def refines(self, request: GenerateRequest) -> bool:
        """Whether ``request``'s pictures go through the refine stage (an identity given, refine enabled)."""
        if request.identity is None or (request.adapter and not self.config.refine.enabled):
            return False  # an adapter alone steers the draft; refine only when enabled
        if not self.config.refine.enabled:
            raise InputError(
                "--identity was given but refine.enabled = false.", fix="set refine.enabled = true."
            )
        return True

    def _cast(self, request: GenerateRequest) -> Cast:
        """The request's cast; on a template, loaded and checked against its slots (no model is loaded)."""
        if not request.identity and request.template is not None:
            raise TemplateError(
                f"--template {request.template} needs a cast for its slots.",
                fix="pass --cast 0=anna,1=kenji (slots: `studio template show NAME`).",
            )
        if not request.identity:
            raise InputError("Refining needs --identity NAME (or 0=anna,1=kenji).", fix="pass --identity.")
        cast = Cast.parse(
            request.identity, select=request.select, index=request.face_index, match=request.match
        )
        return cast if request.template is None else self._on_template(cast, request.template)

    def _on_template(self, cast: Cast, name: str) -> Cast:
        """``cast`` on template ``name``: its numbers are the template's slots, every one mapped once."""
        template = self.templates.load(name)
        check_template_cast(template, cast.spec)
        return replace(cast, template=template)

    def _template_draft(self, request: GenerateRequest) -> GenerateRequest:
        """A template request as the draft stage takes it: its cast checked against the slots, and drafted
        img2img from the master (so faces land on the slots) unless it brings an init image or pose."""
        template = self._cast(request).template
        if request.init_image is not None or request.pose is not None or template is None:
            return request
        return replace(request, init_image=self.templates.image_path(template))

    def _refine_settings(self, request: GenerateRequest | None) -> RefineConfig:
        """The config's refine section with ``request``'s refine options (processors, blend, masks)."""
        settings = self.config.refine
        if request is None:
            return settings
        mask = replace(
            settings.mask,
            occlusion=settings.mask.occlusion if request.occlusion is None else request.occlusion,
            regions=settings.mask.regions if request.regions is None else request.regions,
        )
        return replace(
            settings,
            processors=request.processors or settings.processors,
            blend=request.blend or settings.blend,
            mask=mask,
        )

    def _refine_plan(
        self, cast: Cast, settings: RefineConfig
    ) -> tuple[dict[str, ResolvedModel], dict[str, Identity]]:
        """The refine models (resolved, licence applied; not loaded) and identities (consent checked now)."""
        models = self._refine_models(settings)
        if cast.template is not None:
            check_template_recognizer(cast.template, models["recognizer"].sha256)
        library, recognizer, purpose = (
            self.identities,
            models["recognizer"].sha256,
            self.config.consent.purpose,
        )
        return models, {n: library.get(n, recognizer_sha256=recognizer, purpose=purpose) for n in cast.names}

    def _refine_models(self, settings: RefineConfig) -> dict[str, ResolvedModel]:
        """``refine_models`` for ``settings``, resolved again only when a model file changed on disk (its
        size, mtime or inode): a checksum verified once holds while the file stays the same."""
        key = ("refine-models", settings)
        kept = self._resolved.get(key)
        if kept is not None and kept[0] == _file_stamps(kept[1]):
            return kept[1]
        models = refine_models(self.config, self.catalogue, settings)
        self._resolved[key] = (_file_stamps(models), models)
        return models

    def _refine_setup(self, cast: Cast, request: GenerateRequest | None = None) -> _RefineSetup:
        """Models (checked, licence applied, loaded) and identities (consent checked as work starts)."""
        settings = self._refine_settings(request)
        models, identities = self._refine_plan(cast, settings)
        loaded = load_face_models(models, self.config, self.cache, settings)
        options = {} if request is None else request.refine_options()
        digests = {r: m.sha256 for r, m in models.items()}
        return _RefineSetup(cast, loaded, identities, settings, options, digests)

    def _refine(self, picture: Draft, setup: _RefineSetup) -> Refined:
        result = refine(picture.image, setup.cast, setup.identities, setup.models, setup.settings, self.cache)
        record = self._refine_record(setup.cast, setup.identities, result.to_recipe())
        recipe = self._refined_recipe(picture, record, setup.model_digests, setup.options)
        return Refined(result.image, recipe, result.status, result.message, result.qa, picture.source)

    def _refine_record(
        self, cast: Cast, identities: Mapping[str, Identity], outcome: Mapping[str, Any]
    ) -> RefineRecord:
        return RefineRecord(
            cast=cast.text,
            select=cast.select or self.config.refine.select,
            face_index=cast.index,
            match=cast.match,
            identities={n: identities[n].file_sha256 for n in cast.names},
            **outcome,
            template=None if cast.template is None else _template_record(cast.template),
        )

    def _refined_recipe(
        self,
        picture: Draft,
        record: RefineRecord,
        model_digests: Mapping[str, str],
        options: Mapping[str, Any],
    ) -> Recipe:
        """The recipe of a refined picture; ``options``: the request's refine options."""
        models = {f"refine.{role}": sha for role, sha in model_digests.items()}
        if picture.recipe.draft is not None:  # a fresh draft: one recipe with both stages
            draft = picture.recipe
            return replace(draft, refine=record, models={**draft.models, **models})
        cast = Cast.parse(record.cast, select=record.select, index=record.face_index, match=record.match)
        template = record.template["name"] if record.template else None
        request = GenerateRequest(
            prompt="",
            identity=cast.text,
            select=cast.select,  # type: ignore[arg-type]
            face_index=cast.index,
            match=cast.match,
            template=template,
            **options,
        )
        return replace(
            picture.recipe,
            request=request.to_dict(),
            config=self._config_record,
            profile=self.config.profile,
            models=models,
            refine=record,
            environment=environment(self.config.runtime.device, self.threads),
            notes=self._notes(refining=True),
        )

    def _draft_recipe(
        self,
        request: GenerateRequest,
        draft: DraftRequest,
        pipeline: DraftPipeline,
        seed: int,
        batch: tuple[int, ...],
        inputs: dict[str, dict[str, str]],
    ) -> Recipe:
        record, models = draft_record(draft, pipeline.base, seed, batch, inputs)
        return self._recipe(request, record, models, str(pipeline.device))

    def _recipe(
        self, request: GenerateRequest, record: DraftRecord, models: Mapping[str, str], device: str
    ) -> Recipe:
        return Recipe(
            request=request.to_dict(),
            config=self._config_record,
            models=models,
            profile=self.config.profile,
            draft=record,
            environment=environment(device, self.threads),
            notes=self._notes(refining=self.refines(request)),
        )

    def _face_condition(self, request: GenerateRequest) -> FaceCondition | None:
        """The identity adapter the request asks for (FACT or IP-Adapter-FaceID), checked and located."""
        if request.adapter is None:
            return None
        if not request.identity:
            raise InputError(
                f"--adapter {request.adapter} needs an identity to steer toward.",
                fix="add --identity NAME (enrol it first with `studio identity add`).",
            )
        cast = Cast.parse(request.identity)
        if cast.spec.name is None:
            raise InputError(
                f"--adapter steers the draft toward one identity; got the mapping {request.identity!r}.",
                fix="pass --identity NAME with --adapter (mappings work for the refine stage).",
            )
        recognizer = resolve(self.config.refine.recognizer, "recognizer", self.config, self.catalogue)
        identity = self.identities.get(
            cast.spec.name, recognizer_sha256=recognizer.sha256, purpose=self.config.consent.purpose
        )
        ref = self.config.adapter.fact if request.adapter == "fact" else self.config.adapter.faceid
        weights = resolve(ref, "adapter", self.config, self.catalogue)
        scale = self.config.adapter.scale if request.adapter_scale is None else request.adapter_scale
        return FaceCondition(
            request.adapter, weights.path, weights.sha256, identity, scale, identity.file_sha256
        )

    def _repeat(self, recipe: Recipe) -> tuple[GenerateResult, Recipe]:
        """Run ``recipe`` again; returns what was written and the new image's recipe."""
        request = request_from_recipe(recipe)
        if recipe.draft is None:  # a re-faced existing image: refine its source again
            source = self._source_of(recipe)
            result = self.refine_files([source], request)
        else:
            _check_inputs_unchanged(recipe.draft.inputs)
            result = self._generate(request, None, only_seed=recipe.seed)
        if not result.outputs:
            raise RefineError(
                "The recipe ran again but produced no image: " + "; ".join(result.unchanged),
                fix="see the reason.",
            )
        again = recipe_from_image(read_metadata(result.outputs[0]).recipe, result.outputs[0])
        return result, again

    def _source_of(self, recipe: Recipe) -> Path:
        """The source image a re-faced recipe started from, unchanged, or an InputError saying why not."""
        source = recipe.source or {}
        path = Path(source.get("path", ""))
        if not path.is_file():
            raise InputError(
                f"The source image {path} of this re-faced picture is gone.",
                fix="put the source image back at that path (its recipe is kept as the parent).",
            )
        if sha256_file(path) != source.get("sha256"):
            raise InputError(
                f"The source image {path} changed since the picture was re-faced.",
                fix="restore the original file.",
            )
        return path

    def _under(self, recipe: Recipe) -> Studio:
        """A Studio under the recipe's config (this Studio's output folder, and its loaded models)."""
        table = {**recipe.config, "output_dir": str(self.config.output_dir)}
        return Studio(config_from_dict(table), self.cache)

    def _start_sink(self, folder: Path | None, request: Mapping[str, Any]) -> tuple[OutputSink, Path]:
        sink = OutputSink(folder or self.config.output_dir, provenance=self.provenance)
        return sink, sink.start(self.config, request)

    def _notes(self, *, refining: bool) -> tuple[str, ...]:
        tiny = self.config.models.tiny_kit is not None
        notes = [TINY_NOTE] if tiny else []
        if not refining and self.config.refine.enabled:
            notes.append(REFINE_SKIPPED)
        if refining and tiny:
            notes.append(TINY_DETECTOR_NOTE)
        if self.content_check is no_content_check:
            notes.append(NO_CONTENT_CHECK_NOTE)
        marks = self.config.provenance
        off = [
            name for name, on in (("the watermark", marks.watermark), ("C2PA signing", marks.c2pa)) if not on
        ]
        if off:
            notes.append(MARKING_OFF_NOTE.format(marks=" and ".join(off)))
        return tuple(notes)


@dataclass(frozen=True, eq=False)
class _Judged:
    """A picture, its refine (None: no cast), and the QA gate's verdict on the result."""

    picture: Draft
    refined: Refined | None
    verdict: Verdict


def _file_stamps(models: Mapping[str, ResolvedModel]) -> tuple[tuple[int, ...], ...]:
    """The stamps of each resolved model file: what a replaced or edited file changes."""
    return tuple(file_stamp(model.location) for model in models.values())


class _RunLog:
    """What one run wrote: passing outputs, outputs that failed QA (apart, marked), statuses."""

    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink
        self.outputs: list[Path] = []
        self.failed_qa: list[Path] = []
        self.statuses: list[str] = []
        self.unchanged: list[str] = []
        self.blocked: list[str] = []

    def write(self, judged: _Judged, label: str) -> None:
        """A passing result beside the run's others, a QA failure under failed-qa/ (marked in its name).

        A refine that changed nothing writes no refined file: a generate keeps its draft, a re-face of an
        existing file writes nothing; both are listed in ``unchanged`` (the command exits 7).
        """
        picture, refined, verdict = judged.picture, judged.refined, judged.verdict
        if verdict.blocked:  # never written, never replaced by a black image: recorded with its scores
            result = refined or picture
            self.blocked.append(f"{label}: {'; '.join(verdict.reasons)}")
            self.sink.record_blocked(result.recipe, verdict.reasons, verdict.scores)
            return
        if refined is not None and not refined.changed:
            kept = picture.source is None
            self.unchanged.append(
                f"{label}: {refined.message} (" + ("the draft was kept)" if kept else "no file written)")
            )
            if kept:
                self.outputs.append(self.sink.write(picture.image, picture.recipe, _stem(picture)))
            return
        result = refined or picture
        parent = picture.image if refined is not None and picture.source is None else None  # the draft
        if verdict.passed:
            self.outputs.append(self.sink.write(result.image, result.recipe, _stem(result), parent=parent))
            return
        stem = f"{_stem(result)}-FAILED-QA"
        path = self.sink.write(result.image, result.recipe, stem, subfolder=FAILED_QA_DIR, parent=parent)
        self.failed_qa.append(path)
        self.statuses.append(f"{label}: FAILED QA ({'; '.join(verdict.reasons)}): {self.failed_qa[-1]}")

    def result(self, config_file: Path, timings: dict[str, float], notes: tuple[str, ...]) -> GenerateResult:
        return GenerateResult(
            self.sink.run_id,
            tuple(self.outputs),
            config_file,
            timings,
            notes,
            tuple(self.statuses),
            tuple(self.unchanged),
            tuple(self.failed_qa),
            tuple(self.blocked),
        )


def _check_inputs_unchanged(inputs: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse to reproduce when an input file (init image, pose) differs from the one recorded."""
    for key, was in inputs.items():
        path = Path(was["path"])
        if not path.is_file() or sha256_file(path) != was["sha256"]:
            raise InputError(
                f"The {key} file {path} is missing or changed since the image was made.",
                fix="restore the original file at that path.",
            )


def _template_record(template: Template) -> dict[str, str]:
    """What a recipe keeps of a template: its name and the digests of its file and master picture."""
    return {"name": template.name, "sha256": template.file_sha256, "image_sha256": template.image_sha256}


def _stem(result: Draft | Refined) -> str:
    """What the file is: ``<seed>`` for a draft, ``<seed>-<cast>`` refined, ``<source>-<cast>`` re-faced."""
    recipe = result.recipe
    base = Path(result.source).stem if result.source is not None else str(recipe.seed)
    if isinstance(result, Refined) and recipe.refine is not None:
        return f"{base}-{Cast.parse(recipe.refine.cast).label}"
    return base


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the time spent in the block to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
