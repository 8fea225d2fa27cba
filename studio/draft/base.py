"""Draft base models: what a reference is (catalogue name, diffusers folder, single file, HF repo id).

Decided through the one resolver (file checked, licence applied) before any model library is imported:
a bad reference fails in a fraction of a second.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors import safe_open

from studio.compat import quiet_model_libraries
from studio.config import StudioConfig
from studio.errors import InputError, ModelError
from studio.models.catalogue import Catalogue, ModelEntry
from studio.models.resolve import ResolvedModel, resolve

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl"]
_SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


@dataclass(frozen=True)
class BaseModel:
    """A resolved draft base model."""

    label: str  # what the user asked for
    family: Family
    source: Literal["single_file", "folder", "hub"]
    location: str  # a path, or a Hugging Face repo id
    config: str | None  # component configs for single files (a folder)
    sha256: str  # of the checkpoint file (folders: tree_sha256); "" for hub repos
    model: ResolvedModel  # what the resolver found: catalogue entry, licence


def resolve_base(ref: str, catalogue: Catalogue, config: StudioConfig) -> BaseModel:
    """Turn a model reference into a BaseModel (through the one resolver: checked, licence applied)."""
    model = resolve(ref, "base", config, catalogue)
    entry = model.entry
    index = model.path / "model_index.json"
    if (entry is not None and entry.format == "diffusers") or index.is_file():
        family = _family(config, entry, lambda: _index_family(json.loads(index.read_text())))
        return BaseModel(ref, family, "folder", model.location, None, model.sha256, model)
    if model.sha256 == "":  # a Hugging Face repo id
        family = _family(config, None, lambda: _index_family(_hub_index(ref)))
        return BaseModel(ref, family, "hub", ref, None, "", model)
    family = _family(config, entry, lambda: _single_file_family(model))
    own = entry.config if entry and entry.config and Path(entry.config).is_dir() else None
    return BaseModel(
        ref, family, "single_file", model.location, own or _base_config(family, config), model.sha256, model
    )


def _base_config(family: Family, config: StudioConfig) -> str:
    """Shipped component configs (configs/base/<family>) so single files load with no network."""
    from studio.draft.base_configs import ensure_base_config

    return str(ensure_base_config(family, config.models.dir / "base-configs"))


def _family(config: StudioConfig, entry: ModelEntry | None, infer: Callable[[], Family]) -> Family:
    if entry is not None:
        return entry.kind  # type: ignore[return-value]  # the catalogue says which family
    if config.draft.family != "auto":
        return config.draft.family
    family = infer()
    logger.info("draft.family = auto: treating the model as %s", family)
    return family


def _single_file_family(model: ResolvedModel) -> Family:
    path = model.path
    if model.format != "safetensors":  # the resolver checked the file's content
        raise InputError(f"Cannot tell whether {path.name} is SD 1.5 or SDXL.", fix="set draft.family.")
    with safe_open(str(path), framework="numpy") as handle:  # the key names only
        return "sdxl" if _SDXL_KEY in handle.keys() else "sd15"  # noqa: SIM118  (safe_open is not a dict)


def _index_family(index: dict[str, Any]) -> Family:
    name = str(index.get("_class_name", ""))
    if "XL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd15"
    raise InputError(
        f"Model class {name!r} is not Stable Diffusion 1.5 or XL.", fix="pick an SD 1.5/SDXL model."
    )


def _hub_index(repo: str) -> dict[str, Any]:
    from diffusers import DiffusionPipeline  # the hub's model_index.json, through diffusers' own cache

    try:
        with quiet_model_libraries():
            return DiffusionPipeline.load_config(repo)
    except (OSError, ValueError) as err:  # offline and not cached, gated, mistyped, or a missing path
        raise hub_error(repo, err) from err


def hub_error(repo: str, err: Exception) -> ModelError:
    """A Hugging Face repo (or a path that looks like one) that cannot be reached, as one line."""
    reason = " ".join(str(err).split())[:200]
    return ModelError(
        f"{repo!r} is not a file or folder here, and as a Hugging Face repo it cannot be loaded ({reason}).",
        fix="check the path, or the repo id and your network; offline (HF_HUB_OFFLINE=1) only cached "
        "repos load.",
    )
