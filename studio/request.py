"""A user's generate request, kept raw (prompt template and variables, not the rendered text).

Recipes store it as it was asked, so a recipe renders it again exactly; ``studio.prepare`` turns it into
the draft stage's request. Light on purpose: importing it loads no model library.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config import MAX_BATCH, BlendMode, FaceRegion, FaceSelect, ProcessorName, bounds, check_value
from studio.errors import InputError
from studio.types import FaceAdapterKind, PoseSource, Sampler

MAX_SEED = 2**32 - 1
REFINE_OPTIONS = ("processors", "blend", "occlusion", "regions")  # a request's refine settings
_NEWER_KEYS = ("template", *REFINE_OPTIONS)


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
    template: str | None = None  # a multi-person template: ``identity`` then maps its slots (0=anna,1=kenji)
    # refine options (default: the config's refine section)
    processors: tuple[ProcessorName, ...] | None = None  # face processors, in order: swap, enhance
    blend: BlendMode | None = None  # alpha (feathered) or poisson (seamless clone)
    occlusion: bool | None = None  # leave what covers a face (hand, glasses) as it is: refine.occluder
    regions: tuple[FaceRegion, ...] | None = None  # keep only these face-parser regions (): no parser

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(GenerateRequest)
        for spec in dataclasses.fields(self):
            option = "--" + spec.name.replace("_", "-")
            check_value(spec, _literal_of(hints[spec.name]), getattr(self, spec.name), option)

    def refine_options(self) -> dict[str, Any]:
        """The refine options (processors, blend, occlusion, regions; None: the config's), by field name."""
        return {key: getattr(self, key) for key in REFINE_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists, None kept (the recipe's raw request)."""
        data = dataclasses.asdict(self)
        data["variables"] = dict(self.variables)
        data["loras"] = [[name, weight] for name, weight in self.loras]
        for key in ("pose", "init_image"):
            data[key] = None if data[key] is None else str(data[key])
        for key in _NEWER_KEYS:  # kept out when unset: recipes made before these options keep their ids
            if data[key] is None:
                del data[key]
            elif isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerateRequest:
        """The request a recipe stored (see ``to_dict``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple((str(n), float(w)) for n, w in values.get("loras", ()))
        for key in ("pose", "init_image"):
            values[key] = None if values.get(key) is None else Path(values[key])
        for key in ("processors", "regions"):
            values[key] = None if values.get(key) is None else tuple(values[key])
        return cls(**values)


def parse_pairs(items: list[str], option: str = "--var") -> dict[str, str]:
    """``["age=30", ...]`` → ``{"age": "30"}`` (template variables)."""
    pairs = {}
    for item in items:
        key, found, value = item.partition("=")
        if not found or not key.strip():
            raise InputError(f"{option} {item!r} is not KEY=VALUE.", fix=f"e.g. {option} age=30.")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_lora(item: str, option: str = "--lora") -> tuple[str, float]:
    """``NAME[:WEIGHT]`` → (name, weight); the weight defaults to 1.0."""
    name, _, weight = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1.0")
    try:
        return name.strip(), float(weight)
    except ValueError as err:
        raise InputError(
            f"{option} {item!r}: weight {weight!r} is not a number.", fix=f"e.g. {option} film:0.7."
        ) from err


def _literal_of(hint: Any) -> Any:
    """``Literal[...] | None`` → ``Literal[...]`` (None values are skipped by check_value)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal else hint
