"""A user's generate request, and how it becomes a draft request: style → template → LoRAs → pose → image.

Precedence for every setting: the request (command line) > the style preset > the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config import FaceSelect, StudioConfig
from studio.draft import ControlSpec, DraftRequest
from studio.draft.loras import resolve_lora
from studio.draft.pose import load_pose
from studio.errors import InputError
from studio.files import sha256_file
from studio.imageio import read_image
from studio.models.catalogue import Catalogue
from studio.prompts import fill_template
from studio.styles import StylePreset, load_style
from studio.types import FaceAdapterKind, ImageBGR, PoseSource, Sampler


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
    identity: str | None = None  # "anna", or "0=anna,1=kenji" (faces in left-to-right order)
    select: FaceSelect | None = None  # which faces a single identity goes to (default: config)
    face_index: int = 0  # with select = "index"
    match: str | None = None  # with select = "similarity": the reference identity
    adapter: FaceAdapterKind | None = None  # steer the draft itself toward --identity
    adapter_scale: float | None = None  # default: config adapter.scale


def build_draft_request(
    request: GenerateRequest, catalogue: Catalogue, config: StudioConfig
) -> tuple[DraftRequest, dict[str, Any]]:
    """The draft request, and the input files it used (path + sha256, for the recipe)."""
    style = load_style(request.style) if request.style else None
    defaults = config.draft
    text = style.prompt.replace("{prompt}", request.prompt) if style else request.prompt
    negative = (
        request.negative if request.negative is not None else _pick(style, "negative", defaults.negative)
    )
    width = request.width or _pick(style, "width", defaults.width)
    height = request.height or _pick(style, "height", defaults.height)
    style_loras = tuple((lo.name, lo.weight) for lo in style.loras) if style else ()
    loras = tuple((resolve_lora(n, catalogue, config), w) for n, w in style_loras + request.loras)
    inputs: dict[str, Any] = {}
    draft = DraftRequest(
        prompt=fill_template(text, request.variables),
        negative=fill_template(negative, request.variables),
        seed=request.seed,
        count=request.count,
        width=width,
        height=height,
        steps=request.steps or _pick(style, "steps", defaults.steps),
        cfg=request.cfg if request.cfg is not None else _pick(style, "cfg", defaults.cfg),
        sampler=request.sampler or _pick(style, "sampler", defaults.sampler),
        batch_size=request.batch_size,
        loras=loras,
        init_image=_init_image(request.init_image, config, inputs),
        strength=request.strength,
        control=_control(request, width, height, catalogue, config, inputs),
    )
    return draft, inputs


def request_from_recipe(recipe: dict[str, Any]) -> GenerateRequest:
    """The request that renders the recipe's whole batch again (its prompt is already final)."""
    inputs = recipe.get("inputs", {})
    control = recipe.get("control") or {}
    refine = (recipe.get("refine") or {}).get("request", {})
    adapter = recipe.get("adapter") or {}
    return GenerateRequest(
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
        control_model=control.get("model"),
        control_scale=control.get("scale", 1.0),
        control_start=control.get("start", 0.0),
        control_end=control.get("end", 1.0),
        identity=refine.get("identity") or adapter.get("identity"),
        select=refine.get("select"),
        face_index=refine.get("face_index", 0),
        match=refine.get("match"),
        adapter=adapter.get("kind"),
        adapter_scale=adapter.get("scale"),
    )


def check_inputs_unchanged(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse to reproduce when an input file differs from the one the recipe recorded."""
    for key, was in recorded.items():
        if now.get(key, {}).get("sha256") != was["sha256"]:
            raise InputError(
                f"The {key} file {was['path']} changed since the image was made.",
                fix="restore the original file.",
            )


def _init_image(path: Path | None, config: StudioConfig, inputs: dict[str, Any]) -> ImageBGR | None:
    if path is None:
        return None
    inputs["init_image"] = {"path": str(path), "sha256": sha256_file(path)}
    return read_image(path, max_pixels=config.images.max_pixels)


def _control(
    request: GenerateRequest,
    width: int,
    height: int,
    catalogue: Catalogue,
    config: StudioConfig,
    inputs: dict[str, Any],
) -> ControlSpec | None:
    if request.pose is None:
        return None
    model = catalogue.entry(request.control_model or config.draft.controlnet, "controlnet")
    image = load_pose(
        request.pose,
        width=width,
        height=height,
        max_pixels=config.images.max_pixels,
        detector_dir=config.models.dir / "annotators",
        source=request.pose_source,
    )
    inputs["pose"] = {
        "path": str(request.pose),
        "sha256": sha256_file(request.pose),
        "source": request.pose_source,
    }
    return ControlSpec(model, image, request.control_scale, request.control_start, request.control_end)


def _pick(style: StylePreset | None, key: str, default: Any) -> Any:
    return getattr(style, key) if style is not None else default
