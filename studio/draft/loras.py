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
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from studio.adapter.ipadapter import unload_faceid
from studio.config import StudioConfig
from studio.errors import InputError
from studio.models.resolve import ResolvedModel
from studio.models.weights import load_weights

logger = logging.getLogger(__name__)


def adapter_name(lora: ResolvedModel) -> str:
    """A peft-safe adapter name, unique per file content."""
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', Path(lora.label).stem)}_{lora.sha256[:8]}"


def apply_loras(
    pipe: Any,
    loras: Sequence[tuple[ResolvedModel, float]],
    resident: OrderedDict[str, None],
    config: StudioConfig,
    *,
    keep_active: Mapping[str, float] | None = None,
) -> None:
    """Make exactly ``loras`` (plus ``keep_active`` adapters, e.g. FaceID's LoRA) active on ``pipe``.

    ``resident`` is the pipeline owner's record of loaded adapters, least recently used first.
    """
    names = [adapter_name(lora) for lora, _ in loras]
    for (lora, _), name in zip(loras, names, strict=True):
        if name not in resident:
            _load(pipe, lora, name, config)
        resident[name] = None
        resident.move_to_end(name)
    _evict(pipe, resident, keep=set(names), limit=config.draft.max_loaded_loras)
    active = {name: weight for name, (_, weight) in zip(names, loras, strict=True)} | dict(keep_active or {})
    if active:
        pipe.enable_lora()
        pipe.set_adapters(list(active), adapter_weights=list(active.values()))
    elif resident or getattr(pipe.unet, "peft_config", None):  # e.g. a parked FaceID's LoRA: inactive
        pipe.disable_lora()


def unload_all(pipe: Any) -> None:
    """Remove every LoRA from ``pipe``, restoring the base weights exactly."""
    unload_faceid(pipe)  # FaceID's own LoRA goes with its IP branch, never without it
    pipe.unload_lora_weights()


def _load(pipe: Any, lora: ResolvedModel, name: str, config: StudioConfig) -> None:
    try:
        weights = load_weights(lora.path, allow_pickle=config.models.allow_pickle)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError) as err:
        raise InputError(
            f"LoRA file {lora.path} is corrupt or truncated ({err}).", fix="download or export it again."
        ) from err
    try:
        pipe.load_lora_weights(weights, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as err:
        raise InputError(
            f"LoRA {lora.label!r} ({lora.path}) does not fit this model: {err}.",
            fix="check that it was trained for this base family (SD 1.5 vs SDXL) and is a LoRA file.",
        ) from err
    logger.info("loaded LoRA %s from %s", lora.label, lora.path)


def _evict(pipe: Any, resident: OrderedDict[str, None], keep: set[str], limit: int) -> None:
    for name in list(resident):
        if len(resident) <= limit:
            break
        if name not in keep:
            pipe.delete_adapters(name)
            del resident[name]
            logger.info("dropped resident LoRA %s", name)
