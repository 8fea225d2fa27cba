"""The one model resolver: a reference (catalogue name, file, folder, HF repo id) → path, sha256, licence.

Every model the studio opens comes through :func:`resolve`, which also applies the licence policy: with
``commercial = true`` a model is used only if its licence allows commercial use. Catalogued models carry
their licence; a file given by path is matched to the catalogue by its sha256 (so a catalogued model cannot
slip past the policy under another name); anything else has licence "unknown" unless the user declares it
in the licence file ``models.licences`` (TOML, ``[[model]] sha256 = "..." licence = "..." commercial = true``;
``hf = "org/name"`` instead of ``sha256`` for Hugging Face repos).
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from studio.config import StudioConfig, project_dir
from studio.errors import ConfigError, LicenceError, ModelError
from studio.models.catalogue import Catalogue, ModelEntry
from studio.models.store import KIND_FOLDERS, file_digest, require_verified
from studio.models.weights import check_weights_file
from studio.types import ModelKind

logger = logging.getLogger(__name__)

RefKind = ModelKind | Literal["base"]  # "base": an SD 1.5 or SDXL checkpoint
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
UNKNOWN = "unknown"
_LICENCE_FIX = (
    "declare its licence in the file models.licences names "
    '([[model]] sha256 = "<sha256>", licence = "...", commercial = true), '
    "or set commercial = false for non-commercial work."
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: where it is, what exactly it is, and what its licence allows."""

    ref: str  # what the user asked for
    kind: RefKind
    location: str  # a path, or a Hugging Face repo id
    sha256: str  # of the file (folders: studio.files.tree_sha256); "" for a Hugging Face repo
    licence: str
    commercial: bool
    entry: ModelEntry | None = None  # the catalogue entry, when the model is catalogued
    format: str = ""  # what check_weights_file found in a file given by path: safetensors, pickle, onnx...

    @property
    def path(self) -> Path:
        """The file or folder on disk (not for Hugging Face repos)."""
        return Path(self.location)

    @property
    def label(self) -> str:
        """The catalogue name, else the file name or repo id."""
        return self.entry.name if self.entry else Path(self.location).name or self.ref


def resolve(ref: str, kind: RefKind, config: StudioConfig, catalogue: Catalogue) -> ResolvedModel:
    """Resolve ``ref`` as a model of ``kind``; the file is checked and the licence policy applied."""
    # 1. a catalogue name
    entry = catalogue.get(ref)
    if entry is not None and _fits(entry, kind):
        _allowed(_from_entry(ref, kind, entry, Path(entry.filename)), config)  # refused before any search
        path = require_verified(entry, config.models)
        return _from_entry(ref, kind, entry, path)
    # 2. a file or folder: checked before any library opens it, then matched to the catalogue by content
    path = _find_file(ref, kind, config)
    if path is not None:
        found = check_weights_file(path, allow_pickle=config.models.allow_pickle)
        sha = file_digest(path, config.models.dir)
        known = catalogue.by_sha256(sha)
        if known is not None:
            return _allowed(replace(_from_entry(ref, kind, known, path), format=found), config)
        licence, commercial = _declared(config, sha=sha)
        return _allowed(ResolvedModel(ref, kind, str(path), sha, licence, commercial, format=found), config)
    # 3. a Hugging Face repo id (base models only: the hub resolves it on load)
    if kind == "base" and HUB_ID.match(ref) and not Path(ref).expanduser().exists():
        licence, commercial = _declared(config, hf=ref)
        return _allowed(ResolvedModel(ref, kind, ref, "", licence, commercial), config)
    raise _not_found(ref, kind, config, catalogue)


def model_folders(kind: ModelKind, config: StudioConfig) -> list[Path]:
    """Folders searched for a model file given by name: the studio's own, then ComfyUI/A1111 layouts."""
    folders = [lora_dir(config)] if kind == "lora" else []
    folders.append(config.models.dir / kind)
    for root in config.models.search_paths:
        folders += [
            root,
            *(root / s for s in KIND_FOLDERS[kind]),
            *(root / "models" / s for s in KIND_FOLDERS[kind]),
        ]
    return list(dict.fromkeys(folders))  # installed, lora_dir is <models.dir>/lora itself


def lora_dir(config: StudioConfig) -> Path:
    """draft.lora_dir, else the checkout's loras/, else (installed) the studio's own <models.dir>/lora."""
    project = project_dir()
    return config.draft.lora_dir or (project / "loras" if project else config.models.dir / "lora")


def _fits(entry: ModelEntry, kind: RefKind) -> bool:
    return entry.kind in ("sd15", "sdxl") if kind == "base" else entry.kind == kind


def _from_entry(ref: str, kind: RefKind, entry: ModelEntry, path: Path) -> ResolvedModel:
    return ResolvedModel(ref, kind, str(path), entry.sha256, entry.licence, entry.commercial, entry)


def _find_file(ref: str, kind: RefKind, config: StudioConfig) -> Path | None:
    """``ref`` as a path (relative to the working folder, then the checkout if any), then by name."""
    given = Path(ref).expanduser()
    project = project_dir()
    candidates = [given] if given.is_absolute() or project is None else [given, project / given]
    if kind != "base" and not given.is_absolute() and len(given.parts) == 1:
        names = [ref] if given.suffix else [ref, f"{ref}.safetensors"]
        candidates += [folder / name for folder in model_folders(kind, config) for name in names]
    for path in candidates:
        if path.is_file() or (path / "model_index.json").is_file():
            return path
    return None


def _allowed(model: ResolvedModel, config: StudioConfig) -> ResolvedModel:
    """The licence policy: with commercial = true, only models whose licence allows commercial use."""
    if config.commercial and not model.commercial:
        what = model.entry.name if model.entry else f"{model.location} (sha256 {model.sha256[:12] or '-'})"
        fix = (
            _LICENCE_FIX
            if model.entry is None
            else "choose a commercially licensed model, or "
            + ("set commercial = false for non-commercial work.")
        )
        raise LicenceError(
            f"commercial = true, but the {model.kind} model {what} has licence {model.licence!r}, "
            "which does not allow commercial use.",
            fix=fix,
        )
    return model


def _declared(config: StudioConfig, *, sha: str = "", hf: str = "") -> tuple[str, bool]:
    """The user's declared (licence, commercial) for a file's sha256 or a repo id; ("unknown", False) else."""
    path = config.models.licences
    if path is None or not path.is_file():
        return UNKNOWN, False
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"Licence file {path} cannot be read: {err}.", fix="correct it (TOML).") from err
    for item in table.get("model", []):
        if not isinstance(item, dict):
            continue
        if (sha and item.get("sha256") == sha) or (hf and item.get("hf") == hf):
            commercial = item.get("commercial")
            if not isinstance(commercial, bool) or not isinstance(item.get("licence"), str):
                raise ConfigError(
                    f"Licence file {path}: the entry for {sha or hf} needs licence (text) and "
                    "commercial (true/false).",
                    fix='e.g. licence = "CreativeML OpenRAIL-M", commercial = true.',
                )
            return item["licence"], commercial
    return UNKNOWN, False


def _not_found(ref: str, kind: RefKind, config: StudioConfig, catalogue: Catalogue) -> ModelError:
    known = sorted(n for n, e in catalogue.items() if _fits(e, kind))
    where = (
        "a file path"
        if kind == "base"
        else f"a file in {', '.join(map(str, model_folders(kind, config)[:2]))}"
    )
    extra = ", a diffusers folder or a Hugging Face repo id org/name" if kind == "base" else ""
    return ModelError(
        f"The {kind} model {ref!r} is not a catalogue name, {where}{extra}.",
        fix=f"use one of: {', '.join(known) or 'none catalogued'}; or give the file's path.",
    )
