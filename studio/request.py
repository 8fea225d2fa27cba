"""A user's generate request, and how it becomes a draft request: style → template → LoRAs → pose → image.

Precedence for every setting: the request (command line) > the style preset > the config. The request is
kept raw (prompt template and variables, not the rendered text) so a recipe can render it again exactly.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config import FaceSelect, StudioConfig, bounds, check_value
from studio.draft import ControlSpec, DraftRequest
from studio.draft.face import FaceCondition
from studio.draft.pose import load_pose
from studio.draft.request import MAX_BATCH
from studio.files import sha256_file
from studio.imageio import read_image
from studio.models.cache import ModelCache
from studio.models.catalogue import Catalogue
from studio.models.resolve import resolve
from studio.prompts import fill_template
from studio.styles import StylePreset, load_style
from studio.types import FaceAdapterKind, ImageBGR, PoseSource, Sampler

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerateRequest:
    """A user's request; unset values come from the style preset, then from the config."""

    prompt: str  # a template: {name} placeholders are filled from ``variables``; {{ }} are literal braces
    negative: str | None = None
    style: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    seed: int = field(default=42, metadata=bounds(0, MAX_SEED))
    count: int = field(default=1, metadata=bounds(1, 10_000))
    batch_size: int = field(default=1, metadata=bounds(1, MAX_BATCH))
    width: int | None = None  # ranges: DraftConfig
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: Sampler | None = None
    loras: tuple[tuple[str, float], ...] = ()
    pose: Path | None = None
    pose_source: PoseSource = "auto"
    control_model: str | None = None
    control_scale: float = field(default=1.0, metadata=bounds(0.0, 2.0))
    control_start: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    control_end: float = field(default=1.0, metadata=bounds(0.0, 1.0))
    init_image: Path | None = None
    strength: float = field(default=0.75, metadata=bounds(0.01, 1.0))
    identity: str | None = None  # "anna", or "0=anna,1=kenji" (faces in left-to-right order)
    select: FaceSelect | None = None  # which faces a single identity goes to (default: config)
    face_index: int = field(default=0, metadata=bounds(0, 1000))  # with select = "index"
    match: str | None = None  # with select = "similarity": the reference identity
    adapter: FaceAdapterKind | None = None  # steer the draft itself toward --identity
    adapter_scale: float | None = field(default=None, metadata=bounds(0.0, 2.0))  # default: adapter.scale

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(GenerateRequest)
        for spec in dataclasses.fields(self):
            option = "--" + spec.name.replace("_", "-")
            check_value(spec, _literal_of(hints[spec.name]), getattr(self, spec.name), option)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists, None kept (the recipe's raw request)."""
        data = dataclasses.asdict(self)
        data["variables"] = dict(self.variables)
        data["loras"] = [[name, weight] for name, weight in self.loras]
        for key in ("pose", "init_image"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerateRequest:
        """The request a recipe stored (see ``to_dict``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple((str(n), float(w)) for n, w in values.get("loras", ()))
        for key in ("pose", "init_image"):
            values[key] = None if values.get(key) is None else Path(values[key])
        return cls(**values)


def build_draft_request(
    request: GenerateRequest,
    catalogue: Catalogue,
    config: StudioConfig,
    cache: ModelCache,
    face: FaceCondition | None = None,
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
    loras = tuple((resolve(n, "lora", config, catalogue), w) for n, w in style_loras + request.loras)
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
        control=_control(request, width, height, catalogue, config, cache, inputs),
        face=face,
    )
    return draft, inputs


def _literal_of(hint: Any) -> Any:
    """``Literal[...] | None`` → ``Literal[...]`` (None values are skipped by check_value)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal else hint


def _init_image(path: Path | None, config: StudioConfig, inputs: dict[str, Any]) -> ImageBGR | None:
    if path is None:
        return None
    image = read_image(path, max_pixels=config.images.max_pixels)  # first: a missing file is an ImageError
    inputs["init_image"] = {"path": str(path), "sha256": sha256_file(path)}
    return image


def _control(
    request: GenerateRequest,
    width: int,
    height: int,
    catalogue: Catalogue,
    config: StudioConfig,
    cache: ModelCache,
    inputs: dict[str, Any],
) -> ControlSpec | None:
    if request.pose is None:
        return None
    model = resolve(request.control_model or config.draft.controlnet, "controlnet", config, catalogue)
    image = load_pose(
        request.pose,
        width=width,
        height=height,
        max_pixels=config.images.max_pixels,
        detector_dir=config.models.dir / "annotators",
        source=request.pose_source,
        cache=cache,
    )
    inputs["pose"] = {
        "path": str(request.pose),
        "sha256": sha256_file(request.pose),
        "source": request.pose_source,
    }
    return ControlSpec(model, image, request.control_scale, request.control_start, request.control_end)


def _pick(style: StylePreset | None, key: str, default: Any) -> Any:
    return getattr(style, key) if style is not None else default
