"""Recipes: everything that decided an output image, stored as JSON in the PNG, read back to reproduce it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio import __version__
from studio.config import StudioConfig, config_to_dict
from studio.draft import DraftRequest
from studio.draft.load import BaseModel
from studio.errors import InputError

RECIPE_VERSION = 1


def make_recipe(
    request: DraftRequest,
    base: BaseModel,
    seed: int,
    batch: tuple[int, ...],
    config: StudioConfig,
    inputs: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """The recipe of the image rendered with ``seed`` in ``batch``."""
    control = request.control
    return {
        "recipe_version": RECIPE_VERSION,
        "studio_version": __version__,
        "profile": config.profile,
        "prompt": request.prompt,
        "negative": request.negative,
        "seed": seed,
        "batch_seeds": list(batch),
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "cfg": request.cfg,
        "sampler": request.sampler,
        "model": {"label": base.label, "family": base.family, "sha256": base.sha256},
        "loras": [{"name": lo.name, "sha256": lo.sha256, "weight": w} for lo, w in request.loras],
        "strength": request.strength if request.init_image is not None else None,
        "control": None
        if control is None
        else {
            "model": control.model.name,
            "scale": control.scale,
            "start": control.start,
            "end": control.end,
        },
        "adapter": None
        if request.face is None
        else {
            "kind": request.face.kind,
            "identity": request.face.identity.name,
            "weights_sha256": request.face.weights_sha256,
            "scale": request.face.scale,
        },
        "inputs": inputs,  # {"init_image": {"path", "sha256"}, "pose": {"path", "sha256", "source"}}
        "stages": ["draft"],
        "notes": list(notes),
        "config": config_to_dict(config),
    }


def a1111_settings(request: DraftRequest, base: BaseModel, seed: int) -> dict[str, object]:
    """The settings line of the A1111 ``parameters`` chunk."""
    settings: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "CFG scale": request.cfg,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": base.sha256[:10],
        "Model": base.label,
    }
    if request.init_image is not None:
        settings["Denoising strength"] = request.strength
    if request.loras:
        settings["Lora hashes"] = ", ".join(f"{lo.name}: {lo.sha256[:12]}" for lo, _ in request.loras)
    if request.face is not None:
        settings["Face adapter"] = (
            f"{request.face.kind} {request.face.identity.name} scale {request.face.scale}"
        )
    if request.control is not None:
        settings["ControlNet"] = f"{request.control.model.name} weight {request.control.scale}"
    return settings


def check_recipe(recipe: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """A recipe read from an image, or an InputError saying why it cannot be reproduced."""
    if recipe is None:
        raise InputError(
            f"{path} carries no studio recipe.", fix="reproduce an image written by `studio generate`."
        )
    if recipe.get("recipe_version") != RECIPE_VERSION:
        raise InputError(
            f"{path} has recipe version {recipe.get('recipe_version')!r}; this studio reads "
            f"{RECIPE_VERSION}.",
            fix="use the studio version that wrote it.",
        )
    return recipe
