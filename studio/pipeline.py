"""``Studio``: a request goes through draft → refine → outputs. The one place the stages meet."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from studio.config import StudioConfig, config_dir, write_resolved_config
from studio.draft import DraftRequest, plan_batches, prepare_draft, render_draft
from studio.draft.face import FaceCondition
from studio.draft.load import BaseModel
from studio.errors import InputError, ModelError
from studio.faces import (
    FaceModels,
    RefineResult,
    RefineSettings,
    load_face_model,
    load_face_models,
    load_token_encoder,
    refine,
    refine_entries,
)
from studio.faces.identity import EnrolReport, EnrolSettings, IdentityLibrary
from studio.faces.select import IdentitySpec, parse_identity_spec
from studio.files import sha256_file
from studio.imageio import format_parameters, read_image, read_metadata, write_image
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry, ensure_allowed
from studio.models.store import file_digest, require_verified
from studio.models.weights import check_weights_file
from studio.recipe import a1111_settings, check_recipe, make_recipe
from studio.request import GenerateRequest, build_draft_request, check_inputs_unchanged, request_from_recipe
from studio.types import Identity, ImageBGR

logger = logging.getLogger(__name__)

REFINE_SKIPPED = "refine skipped: no --identity given, faces are left as drafted"
TINY_NOTE = "tiny profile: random-weight models, the pictures are NOT portraits"


@dataclass(frozen=True)
class GenerateResult:
    """What a run wrote, each image's refine status, and how long each stage took."""

    outputs: tuple[Path, ...]
    config_file: Path
    timings: dict[str, float]
    notes: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()  # one line per output: what the refine stage did


@dataclass(frozen=True, eq=False)
class _Refiner:
    """Everything a refine run needs, prepared once per request."""

    spec: IdentitySpec
    text: str  # the --identity value, for recipes
    identities: dict[str, Identity]
    models: FaceModels
    settings: RefineSettings
    reference: Identity | None


class Studio:
    """Holds the config, the catalogue and the model cache for any number of requests."""

    def __init__(self, config: StudioConfig, cache: ModelCache | None = None) -> None:
        self.config = config
        self.cache = cache or ModelCache()
        self.catalogue: Catalogue = open_catalogue(config)

    def generate(self, request: GenerateRequest) -> GenerateResult:
        """Render ``request`` and write one PNG per image with its recipe."""
        timings: dict[str, float] = {}
        # 1. the draft request: style, template, LoRAs, pose and init image resolved and checked
        draft, inputs = build_draft_request(request, self.catalogue, self.config)
        draft = replace(draft, face=self._face_condition(request))
        # 2. models: licences checked before any work, then loaded (once per process)
        with _timed(timings, "load"):
            refining = request.identity is not None and (self.config.refine.enabled or not request.adapter)
            base = self._prepare(draft, refining=refining)
            refiner = self._refiner(request) if refining else None
        # 3. draft → refine, writing each image as its batch finishes (an interruption keeps finished ones)
        notes = self._notes(refiner)
        return self._render(draft, base, inputs, notes, timings, refiner)

    def reproduce(self, image_path: Path) -> tuple[GenerateResult, bool]:
        """Render an image again from its recipe; returns the result and whether pixels are identical."""
        recipe = check_recipe(
            read_metadata(image_path, max_pixels=self.config.images.max_pixels).recipe, image_path
        )
        again = request_from_recipe(recipe)
        draft, inputs = build_draft_request(again, self.catalogue, self.config)
        draft = replace(draft, face=self._face_condition(again))
        check_inputs_unchanged(recipe.get("inputs", {}), inputs)
        timings: dict[str, float] = {}
        with _timed(timings, "load"):
            refining = bool(recipe.get("refine"))
            base = self._prepare(draft, refining=refining)
            refiner = self._refiner(again) if refining else None
        if base.sha256 and base.sha256 != recipe["model"]["sha256"]:
            raise InputError(
                f"The recipe's model {recipe['model']['label']!r} has changed on disk.",
                fix="restore the model file the image was made with.",
            )
        result = self._render(draft, base, inputs, self._notes(refiner), timings, refiner, recipe["seed"])
        same = np.array_equal(read_image(result.outputs[0]), read_image(image_path))
        return result, same

    # -- running -----------------------------------------------------------------------------------

    def _prepare(self, draft: DraftRequest, *, refining: bool) -> BaseModel:
        entries: list[ModelEntry] = [
            e for e in (self.catalogue.get(self.config.draft.model),) if e is not None
        ]
        entries += [self.catalogue[lo.name] for lo, _ in draft.loras if lo.name in self.catalogue]
        entries += [draft.control.model] if draft.control else []
        entries += refine_entries(self.config, self.catalogue) if refining else []
        ensure_allowed(entries, commercial=self.config.commercial)
        return prepare_draft(self.config.draft.model, self.catalogue, self.config, self.cache)

    def _refiner(self, request: GenerateRequest) -> _Refiner:
        """Identities (consent and recognizer checked), models and settings for a refine run."""
        if not self.config.refine.enabled:
            raise InputError(
                "--identity was given but refine.enabled = false.", fix="set refine.enabled = true."
            )
        spec = parse_identity_spec(request.identity or "")
        models = load_face_models(self.config, self.catalogue, self.cache)
        names = (*spec.names, *((request.match,) if request.match else ()))
        identities = {n: self.identities.get(n, recognizer_sha256=models.recognizer_sha256) for n in names}
        settings = RefineSettings.from_config(self.config, select=request.select, index=request.face_index)
        reference = identities[request.match] if request.match else None
        return _Refiner(spec, request.identity or "", identities, models, settings, reference)

    def _face_condition(self, request: GenerateRequest) -> FaceCondition | None:
        """The identity adapter the request asks for (FACT or IP-Adapter-FaceID), checked and located."""
        if request.adapter is None:
            return None
        if not request.identity:
            raise InputError(
                f"--adapter {request.adapter} needs an identity to steer toward.",
                fix="add --identity NAME (enrol it first with `studio identity add`).",
            )
        spec = parse_identity_spec(request.identity)
        if spec.name is None:
            raise InputError(
                f"--adapter steers the draft toward one identity; got the mapping {request.identity!r}.",
                fix="pass --identity NAME with --adapter (mappings work for the refine stage).",
            )
        recognizer = self.catalogue.entry(self.config.refine.recognizer, "recognizer")
        identity = self.identities.get(spec.name, recognizer_sha256=recognizer.sha256)
        ref = self.config.adapter.fact if request.adapter == "fact" else self.config.adapter.faceid
        path, sha = self._adapter_file(ref, request.adapter)
        scale = self.config.adapter.scale if request.adapter_scale is None else request.adapter_scale
        return FaceCondition(request.adapter, path, sha, identity, scale)

    def _adapter_file(self, ref: str, kind: str) -> tuple[Path, str]:
        entry = self.catalogue.get(ref)
        if entry is not None and entry.kind == "adapter":
            ensure_allowed([entry], commercial=self.config.commercial)
            return require_verified(entry, self.config.models), entry.sha256
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else config_dir().parent / path
        if not path.is_file():
            hint = "train one with train_adapter.py" if kind == "fact" else "run `studio models pull`"
            raise ModelError(
                f"The {kind} adapter {ref!r} is neither a catalogue entry nor a file ({path}).",
                fix=f"{hint}, or point adapter.{'fact' if kind == 'fact' else 'faceid'} at it.",
            )
        check_weights_file(path, allow_pickle=self.config.models.allow_pickle)
        return path, file_digest(path, self.config.models.dir)

    @property
    def identities(self) -> IdentityLibrary:
        """The identity library the config points at."""
        return IdentityLibrary(self.config.refine.identities_dir)

    def enrol(self, name: str, photos: list[Path], *, consent: str, replace: bool = False) -> EnrolReport:
        """Enrol identity ``name`` from ``photos`` with its consent record."""
        refine = self.config.refine
        detector = self.catalogue.entry(refine.detector, "detector")
        recognizer = self.catalogue.entry(refine.recognizer, "recognizer")
        ensure_allowed([detector, recognizer], commercial=self.config.commercial)
        return self.identities.enrol(
            name,
            photos,
            consent=consent,
            detector=load_face_model(detector, self.config, self.cache),
            recognizer=load_face_model(recognizer, self.config, self.cache),
            token_encoder=load_token_encoder(recognizer, self.config, self.cache),
            recognizer_sha256=recognizer.sha256,
            settings=EnrolSettings.from_config(refine),
            max_pixels=self.config.images.max_pixels,
            replace=replace,
        )

    def refine_files(self, paths: list[Path], request: GenerateRequest) -> GenerateResult:
        """Refine existing pictures (e.g. a master creative) onto ``request.identity``; never overwrites."""
        timings: dict[str, float] = {}
        with _timed(timings, "load"):
            ensure_allowed(refine_entries(self.config, self.catalogue), commercial=self.config.commercial)
            refiner = self._refiner(request)
        outputs, statuses = [], []
        start = time.perf_counter()
        for path in paths:
            image = read_image(path, max_pixels=self.config.images.max_pixels)
            result = self._apply_refiner(refiner, image)
            meta = read_metadata(path, max_pixels=self.config.images.max_pixels)
            recipe = {
                "source_image": {"path": str(path), "sha256": sha256_file(path)},
                "refine": self._refine_record(refiner, result),
                "stages": ["refine"],
            }
            name = f"{path.stem}-{refiner.text.replace(',', '+').replace('=', '-')}"
            outputs.append(
                write_image(
                    _free_path(self.config.output_dir, name),
                    result.image,
                    parameters=meta.parameters,
                    recipe=recipe,
                )
            )
            statuses.append(f"{path.name}: {_status_line(result)}")
        timings["refine"] = time.perf_counter() - start
        config_file = write_resolved_config(
            self.config, _free_path(self.config.output_dir, "refine-config", ".toml")
        )
        return GenerateResult(
            tuple(outputs), config_file, timings, tuple(self._notes(refiner)), tuple(statuses)
        )

    def _apply_refiner(self, refiner: _Refiner, image: ImageBGR) -> RefineResult:
        return refine(
            image,
            refiner.spec,
            refiner.identities,
            refiner.models,
            refiner.settings,
            self.cache,
            reference=refiner.reference,
        )

    def _refine_record(self, refiner: _Refiner, result: RefineResult) -> dict[str, Any]:
        request = {
            "identity": refiner.text,
            "select": refiner.settings.select,
            "face_index": refiner.settings.index,
            "match": refiner.reference.name if refiner.reference else None,
        }
        return {
            "identity": refiner.text,
            "request": request,
            **result.to_recipe(),
            "models": {"recognizer_sha256": refiner.models.recognizer_sha256},
        }

    def _notes(self, refiner: _Refiner | None) -> list[str]:
        notes = [TINY_NOTE] if self.config.models.tiny_kit is not None else []
        if refiner is None and self.config.refine.enabled:
            notes.append(REFINE_SKIPPED)
        if refiner is not None and self.config.models.tiny_kit is not None:
            notes.append("tiny profile: the face detector is a fixture (one face at a fixed place)")
        return notes

    def _render(
        self,
        draft: DraftRequest,
        base: BaseModel,
        inputs: dict[str, Any],
        notes: list[str],
        timings: dict[str, float],
        refiner: _Refiner | None = None,
        only_seed: int | None = None,
    ) -> GenerateResult:
        folder, stamp = self.config.output_dir, datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        batches = plan_batches(draft.count, draft.batch_size, draft.seed)
        batch_of = {seed: batch for batch in batches for seed in batch}
        outputs: list[Path] = []
        statuses: list[str] = []
        timings["draft"] = 0.0
        start = time.perf_counter()
        for seed, image in render_draft(draft, base, self.config, self.cache):
            timings["draft"] += time.perf_counter() - start
            if only_seed is not None and seed != only_seed:
                start = time.perf_counter()
                continue
            recipe = make_recipe(draft, base, seed, batch_of[seed], self.config, inputs, notes)
            if refiner is not None:
                with _timed(timings, "refine"):
                    result = self._apply_refiner(refiner, image)
                image = result.image
                recipe |= {"refine": self._refine_record(refiner, result), "stages": ["draft", "refine"]}
                statuses.append(f"seed {seed}: {_status_line(result)}")
            params = format_parameters(draft.prompt, draft.negative, a1111_settings(draft, base, seed))
            outputs.append(
                write_image(_free_path(folder, f"{stamp}-{seed}"), image, parameters=params, recipe=recipe)
            )
            start = time.perf_counter()
        with _timed(timings, "write"):
            config_file = write_resolved_config(self.config, _free_path(folder, f"{stamp}-config", ".toml"))
        return GenerateResult(tuple(outputs), config_file, timings, tuple(notes), tuple(statuses))


def _status_line(result: RefineResult) -> str:
    """The refine message plus each swapped face's identity similarity (after, and before the swap)."""
    qa = "; ".join(
        f"face {q.face_index} similarity {q.similarity_after:.3f} (was {q.similarity_before:.3f})"
        + ("" if q.passed else " FAILED QA")
        for q in result.qa
    )
    return f"{result.message}{'; ' + qa if qa else ''}"


def _free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/stem.suffix``, or ``stem-1``, ``stem-2``… so an existing output is never overwritten."""
    path, n = folder / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the time spent in the block to ``timings[stage]``."""
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
