"""Finding catalogued model files on disk and checking them against the catalogue.

Search order for an entry: its local source (tiny kit), the studio's own folder
(``<models.dir>/<kind>/<filename>``), then each extra search path, which may be a plain folder of model
files or the root of an existing ComfyUI or AUTOMATIC1111 install (their per-kind sub-folders below).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from studio.config import ModelsConfig
from studio.errors import ChecksumError, ModelNotFoundError
from studio.files import sha256_file, tree_sha256, tree_size, write_text_atomic
from studio.models.catalogue import ModelEntry
from studio.types import ModelKind, ModelStatus

logger = logging.getLogger(__name__)

VERIFIED_CACHE = ".verified.json"

# Sub-folders where ComfyUI (models/<x>) and A1111 (models/<x>) keep each kind of model.
KIND_FOLDERS: dict[ModelKind, tuple[str, ...]] = {
    "sd15": ("checkpoints", "Stable-diffusion"),
    "sdxl": ("checkpoints", "Stable-diffusion"),
    "controlnet": ("controlnet", "ControlNet"),
    "lora": ("loras", "Lora"),
    "upscaler": ("upscale_models", "ESRGAN", "RealESRGAN"),
    "detector": ("insightface/models/buffalo_l", "insightface"),
    "recognizer": ("insightface/models/buffalo_l", "insightface"),
    "swapper": ("insightface",),
    "adapter": ("ipadapter", "adapters"),
    "safety": ("nudenet",),  # content-check models
    # face-processor models: FaceFusion keeps them in .assets/models; ComfyUI ReActor and A1111 the enhancers
    "occluder": ("facefusion", ".assets/models"),
    "parser": ("facefusion", ".assets/models"),
    "enhancer": ("facerestore_models", "GFPGAN", "Codeformer", "facefusion", ".assets/models"),
    "annotator": (  # the OpenPose files, where ComfyUI's controlnet_aux and A1111's ControlNet keep them
        "custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators",
        "extensions/sd-webui-controlnet/annotator/downloads/openpose",
    ),
}


@dataclass(frozen=True)
class ModelCheck:
    """Where an entry was found (if anywhere) and what state it is in."""

    entry: ModelEntry
    path: Path | None
    status: ModelStatus

    @property
    def note(self) -> str:
        """Where it is (or where it comes from), and what a fixture stands in for."""
        note = str(self.path) if self.path else self.entry.source.describe()
        return note + (f"\nFIXTURE: {self.entry.fixture}" if self.entry.fixture else "")


def own_path(entry: ModelEntry, models: ModelsConfig) -> Path:
    """Where the studio itself keeps (and pulls) this entry."""
    return models.dir / entry.kind / entry.filename


def candidate_paths(entry: ModelEntry, models: ModelsConfig) -> list[Path]:
    """Every place the entry may be, in search order."""
    if entry.source.local is not None:
        return [entry.source.local]
    found = [own_path(entry, models)]
    for root in models.search_paths:
        found.append(root / entry.filename)
        for sub in KIND_FOLDERS[entry.kind]:
            found += [root / sub / entry.filename, root / "models" / sub / entry.filename]
    return found


def locate(entry: ModelEntry, models: ModelsConfig) -> Path | None:
    """The first existing path for ``entry``, or None."""
    return next((p for p in candidate_paths(entry, models) if p.exists()), None)


def require(entry: ModelEntry, models: ModelsConfig) -> Path:
    """The entry's path; a ModelNotFoundError naming where it looked and how to get it otherwise."""
    path = locate(entry, models)
    if path is not None:
        return path
    looked = sorted({str(p.parent) for p in candidate_paths(entry, models)})
    if entry.source.local is not None:
        fix = "run `studio models make-tiny` (or any studio command on the tiny profile) to build it."
    else:
        fix = f"run `studio models pull {entry.name}`, or add the folder holding it to models.search_paths."
    raise ModelNotFoundError(
        f"Model {entry.name!r} ({entry.filename}) was not found; looked in: {', '.join(looked)}.", fix=fix
    )


def check(entry: ModelEntry, models: ModelsConfig, *, recheck: bool = False) -> ModelCheck:
    """Locate ``entry`` and compare size and sha256 with the catalogue (hashes cached by size+mtime)."""
    path = locate(entry, models)
    if path is None:
        return ModelCheck(entry, None, "missing")
    if tree_size(path) != entry.size:
        return ModelCheck(entry, path, "corrupt")
    digest = file_digest(path, models.dir, recheck=recheck)
    return ModelCheck(entry, path, "present" if digest == entry.sha256 else "corrupt")


def require_verified(entry: ModelEntry, models: ModelsConfig) -> Path:
    """The entry's path after its checksum matched; ChecksumError otherwise."""
    path = require(entry, models)
    result = check(entry, models)
    if result.status == "corrupt":
        raise ChecksumError(
            f"Model {entry.name!r} at {path} does not match the catalogue (size or sha256 differ).",
            fix=f"delete it and run `studio models pull {entry.name}`, or fix the catalogue entry.",
        )
    return path


def file_digest(path: Path, models_dir: Path, *, recheck: bool = False) -> str:
    """sha256 of a file (or folder tree), cached in the models folder by size and mtime."""
    cache_file = models_dir / VERIFIED_CACHE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    stat = path.stat()
    key, stamp = str(path.resolve()), [tree_size(path), stat.st_mtime_ns]
    hit = cache.get(key)
    if not recheck and hit and hit.get("stamp") == stamp:
        return str(hit["sha256"])
    logger.info("hashing %s", path)
    digest = tree_sha256(path) if path.is_dir() else sha256_file(path)
    cache[key] = {"stamp": stamp, "sha256": digest}
    write_text_atomic(cache_file, json.dumps(cache, indent=1, sort_keys=True))
    return digest
