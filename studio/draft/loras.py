"""Style LoRAs on a loaded pipeline: several at once with weights, switched without reloading the base.

LoRAs stay resident as named peft adapters (the least recently used is dropped beyond
``draft.max_loaded_loras``); a request activates its own set with ``set_adapters`` and a request without
LoRAs disables them, which gives exactly the base model's output.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from studio.adapter.ipadapter import unload_faceid
from studio.config import StudioConfig, config_dir
from studio.errors import InputError
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue
from studio.models.store import KIND_FOLDERS, file_digest, require_verified
from studio.models.weights import PICKLE_SUFFIXES, SAFE_SUFFIXES, check_weights_file, load_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA file found on disk, with its checksum (recorded in output recipes)."""

    name: str
    path: Path
    sha256: str

    @property
    def adapter_name(self) -> str:
        """A peft-safe adapter name, unique per file content."""
        return f"{re.sub(r'[^0-9A-Za-z_]', '_', self.name)}_{self.sha256[:8]}"


def lora_dir(config: StudioConfig) -> Path:
    """The project's loras/ folder (or draft.lora_dir)."""
    return config.draft.lora_dir or config_dir().parent / "loras"


def resolve_lora(name: str, catalogue: Catalogue, config: StudioConfig) -> ResolvedLora:
    """Find a LoRA by catalogue name, file name (loras/, model folders, search paths) or path."""
    entry = catalogue.get(name)
    if entry is not None and entry.kind == "lora":
        path = require_verified(entry, config.models)
        return ResolvedLora(name, path, entry.sha256)
    for path in _candidates(name, config):
        if path.is_file():
            check_weights_file(path, allow_pickle=config.models.allow_pickle)
            return ResolvedLora(Path(name).stem, path, file_digest(path, config.models.dir))
    available = sorted(
        p.name for p in lora_dir(config).glob("*") if p.suffix in SAFE_SUFFIXES + PICKLE_SUFFIXES
    )
    raise InputError(
        f"LoRA {name!r} is not in the catalogue, {lora_dir(config)}, the models folder or search paths.",
        fix=f"put the file in loras/ (available: {', '.join(available) or 'none'}) or pass its path.",
    )


def apply_loras(
    pipe: Any,
    loras: Sequence[tuple[ResolvedLora, float]],
    config: StudioConfig,
    cache: ModelCache,
    *,
    keep_active: Mapping[str, float] | None = None,
) -> None:
    """Make exactly ``loras`` (plus ``keep_active`` adapters, e.g. FaceID's LoRA) active on ``pipe``."""
    resident: OrderedDict[str, None] = cache.get(("lora-resident", id(pipe.unet)), OrderedDict)
    for lora, _ in loras:
        if lora.adapter_name not in resident:
            _load(pipe, lora, config)
        resident[lora.adapter_name] = None
        resident.move_to_end(lora.adapter_name)
    _evict(pipe, resident, keep={lora.adapter_name for lora, _ in loras}, limit=config.draft.max_loaded_loras)
    active = {lora.adapter_name: weight for lora, weight in loras} | dict(keep_active or {})
    if active:
        pipe.enable_lora()
        pipe.set_adapters(list(active), adapter_weights=list(active.values()))
    elif resident:
        pipe.disable_lora()


def unload_all(pipe: Any, cache: ModelCache) -> None:
    """Remove every LoRA from ``pipe``, restoring the base weights exactly."""
    unload_faceid(pipe)  # FaceID's own LoRA goes with its IP branch, never without it
    cache.drop(("face-state", id(pipe.unet)))
    pipe.unload_lora_weights()
    cache.drop(("lora-resident", id(pipe.unet)))


def _candidates(name: str, config: StudioConfig) -> list[Path]:
    names = [name] if Path(name).suffix else [name, f"{name}.safetensors"]
    folders = [lora_dir(config), config.models.dir / "lora"]
    for root in config.models.search_paths:
        folders += [
            root,
            *(root / sub for sub in KIND_FOLDERS["lora"]),
            *(root / "models" / s for s in KIND_FOLDERS["lora"]),
        ]
    return [Path(name).expanduser(), *(folder / n for folder in folders for n in names)]


def _load(pipe: Any, lora: ResolvedLora, config: StudioConfig) -> None:
    try:
        weights = load_weights(lora.path, allow_pickle=config.models.allow_pickle)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError) as err:
        raise InputError(
            f"LoRA file {lora.path} is corrupt or truncated ({err}).", fix="download or export it again."
        ) from err
    try:
        pipe.load_lora_weights(weights, adapter_name=lora.adapter_name)
    except (ValueError, KeyError, RuntimeError) as err:
        raise InputError(
            f"LoRA {lora.name!r} ({lora.path}) does not fit this model: {err}.",
            fix="check that it was trained for this base family (SD 1.5 vs SDXL) and is a LoRA file.",
        ) from err
    logger.info("loaded LoRA %s from %s", lora.name, lora.path)


def _evict(pipe: Any, resident: OrderedDict[str, None], keep: set[str], limit: int) -> None:
    for name in list(resident):
        if len(resident) <= limit:
            break
        if name not in keep:
            pipe.delete_adapters(name)
            del resident[name]
            logger.info("dropped resident LoRA %s", name)
