"""Style presets: one TOML file each in prompts/ (template, negative, LoRAs, sampler, steps, cfg, size)."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from studio.config import shipped_dir
from studio.errors import InputError
from studio.types import SAMPLERS, Sampler

logger = logging.getLogger(__name__)

_KEYS = {"description", "prompt", "negative", "sampler", "steps", "cfg", "width", "height", "loras"}


@dataclass(frozen=True)
class LoraUse:
    """A LoRA by catalogue name, file name in loras/, or path, with its strength."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class StylePreset:
    """A validated style preset; ``prompt`` holds ``{prompt}`` where the user's text goes."""

    name: str
    description: str
    prompt: str
    negative: str
    sampler: Sampler
    steps: int
    cfg: float
    width: int
    height: int
    loras: tuple[LoraUse, ...] = ()


def styles_dir() -> Path:
    """The folder of shipped presets: the checkout's ``prompts/`` or the installed package's copy."""
    return shipped_dir("prompts")


def list_styles(folder: Path | None = None) -> list[StylePreset]:
    """Every preset in ``folder``, sorted by name."""
    return [load_style(path.stem, folder) for path in sorted((folder or styles_dir()).glob("*.toml"))]


def load_style(name: str, folder: Path | None = None) -> StylePreset:
    """The preset called ``name``; an InputError listing the known presets if there is none."""
    folder = folder or styles_dir()
    path = folder / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.toml"))) or "none"
        raise InputError(f"Unknown style {name!r}; known styles: {known}.", fix="see `studio styles list`.")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"Style file {path} is not valid TOML: {err}.", fix="correct its syntax.") from err
    return _parse(table, path)


def _parse(table: Mapping[str, Any], path: Path) -> StylePreset:
    unknown = sorted(set(table) - _KEYS)
    missing = sorted({"prompt", "sampler", "steps", "cfg", "width", "height"} - set(table))
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise InputError(f"Style file {path}: {problem}.", fix=f"allowed keys: {', '.join(sorted(_KEYS))}.")
    if table["sampler"] not in SAMPLERS:
        raise InputError(
            f"Style file {path}: sampler {table['sampler']!r} is unknown.",
            fix=f"use one of {', '.join(get_args(Sampler))}.",
        )
    if "{prompt}" not in table["prompt"]:
        raise InputError(
            f"Style file {path}: the prompt template has no {{prompt}} placeholder.",
            fix="put {prompt} where the user's text should go.",
        )
    loras = tuple(
        LoraUse(str(item["name"]), float(item.get("weight", 1.0))) for item in table.get("loras", [])
    )
    return StylePreset(
        name=path.stem,
        description=str(table.get("description", "")),
        prompt=table["prompt"],
        negative=str(table.get("negative", "")),
        sampler=table["sampler"],
        steps=int(table["steps"]),
        cfg=float(table["cfg"]),
        width=int(table["width"]),
        height=int(table["height"]),
        loras=loras,
    )
