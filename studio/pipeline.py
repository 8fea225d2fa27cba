"""``Studio``: a request goes through draft → refine → outputs. The one place the stages meet."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from studio.config import StudioConfig, write_resolved_config
from studio.draft import ControlSpec, DraftRequest, plan_batches, prepare_draft, render_draft
from studio.draft.load import BaseModel
from studio.draft.loras import resolve_lora
from studio.draft.pose import load_pose
from studio.errors import InputError
from studio.files import sha256_file
from studio.imageio import format_parameters, read_image, read_metadata, write_image
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry, ensure_allowed
from studio.prompts import fill_template
from studio.recipe import a1111_settings, check_recipe, make_recipe
from studio.styles import StylePreset, load_style
from studio.types import ImageBGR, PoseSource, Sampler

logger = logging.getLogger(__name__)

REFINE_PENDING = "refine stage not built yet: faces are not detected, upscaled or swapped"
TINY_NOTE = "tiny profile: random-weight models, the pictures are NOT portraits"


@dataclass(frozen=True)
class GenerateRequest:
    """A user's request; unset values come from the style preset, then from the config."""

    prompt: str
    negative: str | None = None
    style: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    seed: int = 42
    count: int = 1
    batch_size: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: Sampler | None = None
    loras: tuple[tuple[str, float], ...] = ()
    pose: Path | None = None
    pose_source: PoseSource = "auto"
    control_model: str | None = None
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    init_image: Path | None = None
    strength: float = 0.75


@dataclass(frozen=True)
class GenerateResult:
    """What a run wrote and how long each stage took."""

    outputs: tuple[Path, ...]
    config_file: Path
    timings: dict[str, float]
    notes: tuple[str, ...] = ()


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
        draft, inputs = self._draft_request(request)
        # 2. models: licences checked before any work, then the base loaded (once per process)
        with _timed(timings, "load"):
            base = self._prepare(draft)
        # 3. draft, writing each image as its batch finishes (an interruption keeps finished images)
        notes = self._notes(base)
        return self._render(draft, base, inputs, notes, timings)

    def reproduce(self, image_path: Path) -> tuple[GenerateResult, bool]:
        """Render an image again from its recipe; returns the result and whether pixels are identical."""
        recipe = check_recipe(
            read_metadata(image_path, max_pixels=self.config.images.max_pixels).recipe, image_path
        )
        draft, inputs = self._draft_from_recipe(recipe)
        timings: dict[str, float] = {}
        with _timed(timings, "load"):
            base = self._prepare(draft)
        if base.sha256 and base.sha256 != recipe["model"]["sha256"]:
            raise InputError(
                f"The recipe's model {recipe['model']['label']!r} has changed on disk.",
                fix="restore the model file the image was made with.",
            )
        result = self._render(draft, base, inputs, self._notes(base), timings, only_seed=recipe["seed"])
        same = np.array_equal(read_image(result.outputs[0]), read_image(image_path))
        return result, same

    # -- request building --------------------------------------------------------------------------

    def _draft_request(self, request: GenerateRequest) -> tuple[DraftRequest, dict[str, Any]]:
        style = load_style(request.style) if request.style else None
        draft_cfg = self.config.draft
        text = style.prompt.replace("{prompt}", request.prompt) if style else request.prompt
        negative = (
            request.negative if request.negative is not None else _pick(style, "negative", draft_cfg.negative)
        )
        width = request.width or _pick(style, "width", draft_cfg.width)
        height = request.height or _pick(style, "height", draft_cfg.height)
        style_loras = tuple((lo.name, lo.weight) for lo in style.loras) if style else ()
        loras = tuple(
            (resolve_lora(n, self.catalogue, self.config), w) for n, w in style_loras + request.loras
        )
        inputs: dict[str, Any] = {}
        init = self._init_image(request.init_image, inputs)
        control = self._control(request, width, height, inputs)
        draft = DraftRequest(
            prompt=fill_template(text, request.variables),
            negative=fill_template(negative, request.variables),
            seed=request.seed,
            count=request.count,
            width=width,
            height=height,
            steps=request.steps or _pick(style, "steps", draft_cfg.steps),
            cfg=request.cfg if request.cfg is not None else _pick(style, "cfg", draft_cfg.cfg),
            sampler=request.sampler or _pick(style, "sampler", draft_cfg.sampler),
            batch_size=request.batch_size,
            loras=loras,
            init_image=init,
            strength=request.strength,
            control=control,
        )
        return draft, inputs

    def _init_image(self, path: Path | None, inputs: dict[str, Any]) -> ImageBGR | None:
        if path is None:
            return None
        inputs["init_image"] = {"path": str(path), "sha256": sha256_file(path)}
        return read_image(path, max_pixels=self.config.images.max_pixels)

    def _control(
        self, request: GenerateRequest, width: int, height: int, inputs: dict[str, Any]
    ) -> ControlSpec | None:
        if request.pose is None:
            return None
        model = self.catalogue.entry(request.control_model or self.config.draft.controlnet, "controlnet")
        image = load_pose(
            request.pose,
            width=width,
            height=height,
            max_pixels=self.config.images.max_pixels,
            detector_dir=self.config.models.dir / "annotators",
            source=request.pose_source,
        )
        inputs["pose"] = {
            "path": str(request.pose),
            "sha256": sha256_file(request.pose),
            "source": request.pose_source,
        }
        return ControlSpec(model, image, request.control_scale, request.control_start, request.control_end)

    def _draft_from_recipe(self, recipe: dict[str, Any]) -> tuple[DraftRequest, dict[str, Any]]:
        inputs = recipe.get("inputs", {})
        request = GenerateRequest(
            prompt=recipe["prompt"],
            negative=recipe["negative"],
            seed=recipe["batch_seeds"][0],
            count=len(recipe["batch_seeds"]),
            batch_size=len(recipe["batch_seeds"]),
            width=recipe["width"],
            height=recipe["height"],
            steps=recipe["steps"],
            cfg=recipe["cfg"],
            sampler=recipe["sampler"],
            loras=tuple((lo["name"], lo["weight"]) for lo in recipe["loras"]),
            init_image=Path(inputs["init_image"]["path"]) if "init_image" in inputs else None,
            strength=recipe["strength"] or 0.75,
            pose=Path(inputs["pose"]["path"]) if "pose" in inputs else None,
            pose_source=inputs.get("pose", {}).get("source", "auto"),
            **_control_fields(recipe.get("control")),
        )
        draft, now = self._draft_request(request)
        for key, was in inputs.items():
            if now[key]["sha256"] != was["sha256"]:
                raise InputError(
                    f"The {key} file {was['path']} changed since the image was made.",
                    fix="restore the original file.",
                )
        return draft, now

    # -- running -----------------------------------------------------------------------------------

    def _prepare(self, draft: DraftRequest) -> BaseModel:
        entries: list[ModelEntry] = [
            e for e in (self.catalogue.get(self.config.draft.model),) if e is not None
        ]
        entries += [self.catalogue[lo.name] for lo, _ in draft.loras if lo.name in self.catalogue]
        entries += [draft.control.model] if draft.control else []
        ensure_allowed(entries, commercial=self.config.commercial)
        return prepare_draft(self.config.draft.model, self.catalogue, self.config, self.cache)

    def _notes(self, base: BaseModel) -> list[str]:
        notes = [TINY_NOTE] if self.config.models.tiny_kit is not None else []
        if self.config.refine.enabled:
            notes.append(REFINE_PENDING)
        return notes

    def _render(
        self,
        draft: DraftRequest,
        base: BaseModel,
        inputs: dict[str, Any],
        notes: list[str],
        timings: dict[str, float],
        only_seed: int | None = None,
    ) -> GenerateResult:
        folder, stamp = self.config.output_dir, datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        batches = plan_batches(draft.count, draft.batch_size, draft.seed)
        batch_of = {seed: batch for batch in batches for seed in batch}
        outputs: list[Path] = []
        start = time.perf_counter()
        for seed, image in render_draft(draft, base, self.config, self.cache):
            if only_seed is not None and seed != only_seed:
                continue
            recipe = make_recipe(draft, base, seed, batch_of[seed], self.config, inputs, notes)
            params = format_parameters(draft.prompt, draft.negative, a1111_settings(draft, base, seed))
            outputs.append(
                write_image(_free_path(folder, f"{stamp}-{seed}"), image, parameters=params, recipe=recipe)
            )
        timings["draft"] = time.perf_counter() - start
        with _timed(timings, "write"):
            config_file = write_resolved_config(self.config, _free_path(folder, f"{stamp}-config", ".toml"))
        return GenerateResult(tuple(outputs), config_file, timings, tuple(notes))


def _control_fields(control: dict[str, Any] | None) -> dict[str, Any]:
    if control is None:
        return {}
    return {
        "control_model": control["model"],
        "control_scale": control["scale"],
        "control_start": control["start"],
        "control_end": control["end"],
    }


def _pick(style: StylePreset | None, key: str, default: Any) -> Any:
    return getattr(style, key) if style is not None else default


def _free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/stem.suffix``, or ``stem-1``, ``stem-2``… so an existing output is never overwritten."""
    path, n = folder / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
