"""``Studio``: a request goes through draft → refine → outputs. The one place the stages meet."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from studio import __version__
from studio.config import StudioConfig, config_to_dict, write_resolved_config
from studio.draft import DraftRequest, prepare_draft, render_draft
from studio.imageio import format_parameters, write_image
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue, ModelEntry, ensure_allowed

logger = logging.getLogger(__name__)

REFINE_PENDING = "refine stage not built yet: faces are not detected, upscaled or swapped"


@dataclass(frozen=True)
class GenerateResult:
    """What a generate run wrote and how long each stage took."""

    outputs: tuple[Path, ...]
    config_file: Path
    timings: dict[str, float]
    notes: tuple[str, ...] = field(default=())


class Studio:
    """Holds the config, the catalogue and the model cache for any number of requests."""

    def __init__(self, config: StudioConfig, cache: ModelCache | None = None) -> None:
        self.config = config
        self.cache = cache or ModelCache()
        self.catalogue: Catalogue = open_catalogue(config)

    def generate(self, request: DraftRequest) -> GenerateResult:
        """Render ``request`` and write one PNG per image with its recipe."""
        timings: dict[str, float] = {}
        notes: list[str] = []
        # 1. check the models and their licences before any work
        model = self.catalogue.entry(self.config.draft.model, "sd15")
        ensure_allowed([model], commercial=self.config.commercial)
        if model.is_fixture or model.source.local is not None:
            notes.append("tiny profile: random-weight models, the pictures are NOT portraits")
        # 2. draft (the model loads once per process; later requests find it in the cache)
        with _timed(timings, "load"):
            prepare_draft(model, self.config, self.cache)
        with _timed(timings, "draft"):
            images = render_draft(request, model, self.config, self.cache)
        # 3. refine
        if self.config.refine.enabled:
            notes.append(REFINE_PENDING)
        # 4. outputs: one PNG each, with the A1111 parameters and the full recipe, plus the config
        with _timed(timings, "write"):
            folder = self.config.output_dir
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            outputs = tuple(
                write_image(
                    _free_path(folder, f"{stamp}-{request.seed + i}"),
                    image,
                    parameters=format_parameters(
                        request.prompt, request.negative, _settings(request, i, model)
                    ),
                    recipe=self._recipe(request, i, model, notes),
                )
                for i, image in enumerate(images)
            )
            config_file = write_resolved_config(self.config, _free_path(folder, f"{stamp}-config", ".toml"))
        return GenerateResult(outputs, config_file, timings, tuple(notes))

    def _recipe(
        self, request: DraftRequest, index: int, model: ModelEntry, notes: list[str]
    ) -> dict[str, Any]:
        return {
            "studio_version": __version__,
            "profile": self.config.profile,
            "prompt": request.prompt,
            "negative": request.negative,
            "seed": request.seed + index,
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "cfg": request.cfg,
            "sampler": request.sampler,
            "model": {"name": model.name, "sha256": model.sha256},
            "stages": ["draft"],
            "notes": list(notes),
            "config": config_to_dict(self.config),
        }


def _settings(request: DraftRequest, index: int, model: ModelEntry) -> dict[str, object]:
    return {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "CFG scale": request.cfg,
        "Seed": request.seed + index,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model.sha256[:10],
        "Model": model.name,
    }


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
