"""A recipe as AUTOMATIC1111 ``parameters`` text (infotext), written the way A1111 >= 1.9 writes it.

Pasting it into A1111 sets the same options: studio takes A1111's full legacy sampler names
(``DPM++ 2M Karras``, what users type and what the A1111 API still accepts), and the infotext splits them
as A1111 >= 1.9 does into ``Sampler: DPM++ 2M, Schedule type: Karras``. LoRAs appear as
``<lora:name:weight>`` tags appended to the infotext prompt (the recipe keeps the clean prompt) with
``Lora hashes`` computed as A1111 does, so A1111 finds each LoRA by content even when its file is named
differently there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

from studio.imageio import format_parameters
from studio.types import Sampler

if TYPE_CHECKING:
    from studio.recipe import Recipe

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HASH_BLOCK = 1 << 20

# studio sampler (A1111's legacy full name) -> A1111 >= 1.9 (Sampler, Schedule type), split as A1111's own
# get_sampler_and_scheduler splits a legacy name; "Automatic" is each sampler's default schedule. A bare
# "DPM++ 2M" meant the model's uniform sigmas before 1.9, but 1.9 made Karras its default: write Uniform.
A1111_SAMPLERS: dict[Sampler, tuple[str, str]] = {
    "Euler a": ("Euler a", "Automatic"),
    "Euler": ("Euler", "Automatic"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "Karras"),
    "DDIM": ("DDIM", "Automatic"),
    "UniPC": ("UniPC", "Automatic"),
    "LCM": ("LCM", "Automatic"),
}


def a1111_parameters(recipe: Recipe) -> str | None:
    """The A1111 ``parameters`` text of an output: its draft's (or its source's), plus the face swap."""
    draft = recipe.draft or (recipe.parent.draft if recipe.parent else None)
    if draft is None:
        return (recipe.source or {}).get("parameters")
    # a name this studio no longer offers (an older recipe) is written as it was, in A1111's legacy form
    sampler, schedule = A1111_SAMPLERS.get(cast(Sampler, draft.sampler), (draft.sampler, None))
    settings: dict[str, object] = {
        "Steps": draft.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": draft.cfg,
        "Seed": draft.seed,
        "Size": f"{draft.width}x{draft.height}",
        "Model hash": draft.model["sha256"][:10],
        "Model": _a1111_name(draft.model["label"]),
    }
    if draft.strength is not None:
        settings["Denoising strength"] = draft.strength
    loras = [(_a1111_name(lo["name"]), lo) for lo in draft.loras]
    hashes = [f"{name}: {lo['a1111_hash'][:12]}" for name, lo in loras if lo.get("a1111_hash")]
    if hashes:
        settings["Lora hashes"] = ", ".join(hashes)
    if draft.adapter is not None:
        adapter = draft.adapter
        settings["Face adapter"] = f"{adapter['kind']} {adapter['identity']} scale {adapter['scale']}"
    if draft.control is not None:
        settings["ControlNet"] = f"{draft.control['model']} weight {draft.control['scale']}"
    if recipe.refine is not None:
        settings["Face swap"] = recipe.refine.cast
    tags = " ".join(f"<lora:{name}:{_number(lo['weight'])}>" for name, lo in loras)
    prompt = f"{draft.prompt} {tags}" if tags and draft.prompt else draft.prompt or tags
    return format_parameters(prompt, draft.negative, settings)


@functools.lru_cache(maxsize=64)
def a1111_hash(path: Path, sha256: str) -> str | None:
    """A1111's LoRA hash: a safetensors file's ``sshs_model_hash`` metadata, else its addnet hash.

    The addnet hash (kohya-ss, A1111 ``hashes.addnet_hash_safetensors``) is the sha256 of the bytes after
    the header; other files use the whole file's sha256, folders have none. Cached by content (``sha256``).
    """
    if path.is_dir():
        return None
    if path.suffix.lower() != ".safetensors":
        return sha256
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > path.stat().st_size - 8:
                raise ValueError(f"header length {length} runs past the end of the file")
            header = json.loads(handle.read(length))
            kohya = (header.get("__metadata__") or {}).get("sshs_model_hash")
            if isinstance(kohya, str) and kohya:
                return kohya
            digest = hashlib.sha256()
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
            return digest.hexdigest()
    except (OSError, ValueError, AttributeError) as err:
        logger.warning("no A1111 hash for %s (%s): A1111 will not find this LoRA by hash", path, err)
        return None


def _a1111_name(label: str) -> str:
    """A model name as A1111 writes it: the file stem, without the characters its infotext cannot carry."""
    stem = label[: -len(Path(label).suffix)] if Path(label).suffix.lower() in _WEIGHT_SUFFIXES else label
    cleaned = "".join(char for char in stem if char not in ':,<>"\n\r').strip()
    return cleaned or "model"


def _number(value: float) -> str:
    """A weight as people write it: 1 not 1.0, 0.75 exactly."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)
