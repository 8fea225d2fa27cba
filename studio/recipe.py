"""The Recipe: everything that decided an output image. Stored as JSON in each PNG, read back to reproduce it.

Every client passes recipes: the CLI writes them, ``reproduce`` runs them again, the A1111 ``parameters``
text is made from them, and campaigns key their items by them. A recipe holds the raw request (prompt
template and variables, not the rendered text), the resolved config, every model file's sha256, identity
file digests, one record per stage, and for a re-faced image the source image's own recipe as its parent.
Its draft part has its own key, so a draft can be rendered once and shared by every identity and refine.

The A1111 ``parameters`` text made from a recipe: ``studio.infotext``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio._version import __version__
from studio.errors import InputError
from studio.infotext import a1111_hash
from studio.request import GenerateRequest

if TYPE_CHECKING:  # annotations only: recipes stay light (no model library is imported)
    from studio.draft import BaseModel, DraftRequest

RECIPE_VERSION = 2
LIBRARIES = ("torch", "diffusers", "transformers", "onnxruntime", "insightface", "peft")
# config keys that say where, how fast or how served, not what (ignored when comparing and keying recipes)
_PATH_KEYS = ("output_dir", "web")  # web: how the UI is served
_RUNTIME_HOW = ("threads",)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftRecord:
    """What rendered a draft: the final prompt, the sampling settings, the batch, every model's digest."""

    prompt: str  # rendered: style and template applied (the raw template is in Recipe.request)
    negative: str
    seed: int
    batch_seeds: tuple[int, ...]  # the batch the image was rendered in (batched kernels round differently)
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str
    model: Mapping[str, str]  # label, family, sha256
    loras: tuple[Mapping[str, Any], ...] = ()  # name, sha256, weight, a1111_hash (None for a folder)
    strength: float | None = None  # img2img only
    control: Mapping[str, Any] | None = None  # model, sha256, scale, start, end
    adapter: Mapping[str, Any] | None = None  # kind, identity, identity_sha256, weights_sha256, scale
    inputs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # init_image / pose: path, sha256


@dataclass(frozen=True)
class RefineRecord:
    """What a refine did: who went on which face, with which identity files, and how it turned out."""

    cast: str  # "anna" or "0=anna,1=kenji"
    select: str
    face_index: int
    match: str | None
    identities: Mapping[str, str]  # name -> identity file sha256
    status: str  # ok, failed_qa
    message: str
    faces_found: int
    qa: tuple[Mapping[str, Any], ...] = ()
    upscaled: tuple[bool, ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    template: Mapping[str, str] | None = None  # name, sha256 (template file), image_sha256 (its master)


@dataclass(frozen=True)
class Recipe:
    """One output's recipe (frozen, versioned); ``to_json`` / ``from_json`` round-trip it exactly."""

    request: Mapping[str, Any]  # GenerateRequest.to_dict(): the raw request
    config: Mapping[str, Any]  # the resolved config the output was made under
    models: Mapping[str, str]  # role -> sha256 of every model file used ("" for a Hugging Face repo)
    profile: str = "default"
    draft: DraftRecord | None = None
    refine: RefineRecord | None = None
    source: Mapping[str, str] | None = None  # path, sha256 of the existing image a refine started from
    parent: Recipe | None = None  # the source image's own recipe, when it had one
    environment: Mapping[str, str] = field(default_factory=dict)  # library versions, device
    notes: tuple[str, ...] = ()
    version: int = RECIPE_VERSION
    studio_version: str = __version__

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this output went through: ("draft",), ("draft", "refine") or ("refine",)."""
        return tuple(s for s, rec in (("draft", self.draft), ("refine", self.refine)) if rec is not None)

    @property
    def seed(self) -> int | None:
        """The draft seed (the parent's for a re-faced image), if any."""
        if self.draft is not None:
            return self.draft.seed
        return self.parent.seed if self.parent is not None else None

    @property
    def draft_key(self) -> str | None:
        """sha256 of the canonical fields that decide the draft's pixels: equal keys, equal drafts."""
        if self.draft is None:
            return None
        record = asdict(self.draft)
        record["inputs"] = {k: v["sha256"] for k, v in self.draft.inputs.items()}  # content, not paths
        runtime = {k: _what(self.config).get(k) for k in ("runtime", "performance")}
        return _digest({"draft": record, "runtime": runtime})

    @property
    def id(self) -> str:
        """sha256 of what was asked (request, config, model digests, stage inputs), not of the outcome."""
        refine = None
        if self.refine is not None:
            refine = {
                k: getattr(self.refine, k) for k in ("cast", "select", "face_index", "match", "identities")
            }
            if self.refine.template is not None:  # only then: recipes without a template keep their ids
                refine["template"] = self.refine.template
        # a draft's seed and batch are in its draft record: the request's seed, count and batch size then
        # say nothing more (image k of a batch, reproduced alone, keeps its id and so its watermark)
        request = (
            self.request
            if self.draft is None
            else {k: v for k, v in self.request.items() if k not in ("seed", "count", "batch_size")}
        )
        return _digest(
            {
                "request": request,
                "config": _what(self.config),
                "models": self.models,
                "draft": self.draft_key,
                "refine": refine,
                "source": self.source.get("sha256") if self.source else None,
                "parent": self.parent.id if self.parent else None,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        data = asdict(self)
        data["parent"] = self.parent.to_dict() if self.parent else None
        data["stages"] = list(self.stages)  # derived, for people reading the metadata
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the recipe") -> Recipe:
        """A recipe from ``to_dict`` data; an InputError saying why when it cannot be read."""
        version = data.get("version", data.get("recipe_version"))
        if version != RECIPE_VERSION:
            raise InputError(
                f"{where} has recipe version {version!r}; this studio ({__version__}) reads "
                f"{RECIPE_VERSION}.",
                fix=f"use the studio version that wrote it ({data.get('studio_version', 'unknown')}).",
            )
        try:
            values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            values["draft"] = _record(DraftRecord, data.get("draft"))
            values["refine"] = _record(RefineRecord, data.get("refine"))
            values["parent"] = cls.from_dict(data["parent"], where) if data.get("parent") else None
            values["notes"] = tuple(data.get("notes", ()))
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where} is damaged ({err!r}).", fix="use an image the studio wrote.") from err

    @classmethod
    def from_json(cls, text: str, where: str = "the recipe") -> Recipe:
        """The recipe in ``text`` (see ``to_json``)."""
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{where} is not valid JSON ({err}).", fix="use an image the studio wrote."
            ) from err


def draft_record(
    draft: DraftRequest, base: BaseModel, seed: int, batch: tuple[int, ...], inputs: Mapping[str, Any]
) -> tuple[DraftRecord, dict[str, str]]:
    """The record of image ``seed`` of ``draft`` (rendered in ``batch``), and the digests of its models."""
    models = {"draft.base": base.sha256}
    models |= {f"draft.lora.{m.label}": m.sha256 for m, _ in draft.loras}
    if draft.control is not None:
        models["draft.controlnet"] = draft.control.model.sha256
    if draft.face is not None:
        models["draft.adapter"] = draft.face.weights_sha256
    record = DraftRecord(
        prompt=draft.prompt,
        negative=draft.negative,
        seed=seed,
        batch_seeds=batch,
        width=draft.width,
        height=draft.height,
        steps=draft.steps,
        cfg=draft.cfg,
        sampler=draft.sampler,
        model={"label": base.label, "family": base.family, "sha256": base.sha256},
        loras=tuple(
            {"name": m.label, "sha256": m.sha256, "weight": w, "a1111_hash": a1111_hash(m.path, m.sha256)}
            for m, w in draft.loras
        ),
        strength=draft.strength if draft.init_image is not None else None,
        control=None
        if draft.control is None
        else {
            "model": draft.control.model.label,
            "sha256": draft.control.model.sha256,
            "scale": draft.control.scale,
            "start": draft.control.start,
            "end": draft.control.end,
        },
        adapter=None
        if draft.face is None
        else {
            "kind": draft.face.kind,
            "identity": draft.face.identity.name,
            "identity_sha256": draft.face.identity_sha256,
            "weights_sha256": draft.face.weights_sha256,
            "scale": draft.face.scale,
        },
        inputs=inputs,
    )
    return record, models


def request_from_recipe(recipe: Recipe) -> GenerateRequest:
    """The request that renders ``recipe``'s whole draft batch again (or repeats its refine)."""
    request = GenerateRequest.from_dict(recipe.request)
    if recipe.draft is None:
        return request
    batch = recipe.draft.batch_seeds
    return replace(request, seed=batch[0], count=len(batch), batch_size=len(batch))


def recipe_from_image(data: Mapping[str, Any] | None, path: Path) -> Recipe:
    """The recipe stored in the image at ``path`` (its metadata's JSON), or an InputError saying why not."""
    if data is None:
        raise InputError(
            f"{path} carries no studio recipe.",
            fix="reproduce an image written by `studio generate` or `refine`.",
        )
    return Recipe.from_dict(data, str(path))


def environment(device: str, threads: int) -> dict[str, str]:
    """Library versions, the device and the CPU threads: what can change pixels when nothing else did."""
    return {"studio": __version__, **_library_versions(), "device": device, "threads": str(threads)}


@functools.cache
def _library_versions() -> dict[str, str]:
    """Installed versions, read once per process (package metadata lookups scan site-packages)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def differences(before: Recipe, after: Recipe) -> list[str]:
    """What differs between two recipes' models, identities, inputs, config and environment."""
    found: list[str] = []
    for role in sorted(set(before.models) | set(after.models)):
        was, now = before.models.get(role), after.models.get(role)
        if was != now:
            found.append(f"model {role}: sha256 {_short(was)} then, {_short(now)} now")
    found += _refine_differences(before.refine, after.refine)
    found += _draft_differences(before.draft, after.draft)
    if before.draft and after.draft:
        for key, was in before.draft.inputs.items():
            now = after.draft.inputs.get(key, {}).get("sha256")
            if was["sha256"] != now:
                found.append(
                    f"input {key} {was['path']}: sha256 {_short(was['sha256'])} then, {_short(now)} now"
                )
    if (before.source or {}).get("sha256") != (after.source or {}).get("sha256"):
        found.append("the source image's content differs")
    for key in sorted(set(_what(before.config)) | set(_what(after.config))):
        if _what(before.config).get(key) != _what(after.config).get(key):
            found.append(f"config [{key}] differs")
    for key in sorted(set(before.environment) | set(after.environment)):
        was, now = before.environment.get(key), after.environment.get(key)
        if was != now:
            found.append(f"{key}: {was} then, {now} now")
    return found


_DRAFT_FIELDS = ("prompt", "negative", "width", "height", "steps", "cfg", "sampler", "strength", "loras")


def _draft_differences(before: DraftRecord | None, after: DraftRecord | None) -> list[str]:
    """Rendered draft settings that changed although the request did not (e.g. an edited style preset)."""
    if before is None or after is None:
        return []
    return [
        f"draft {name}: {getattr(before, name)!r} then, {getattr(after, name)!r} now (style preset edited?)"
        for name in _DRAFT_FIELDS
        if getattr(before, name) != getattr(after, name)
    ]


def _refine_differences(before: RefineRecord | None, after: RefineRecord | None) -> list[str]:
    if before is None or after is None:
        return []
    found = []
    was, now = (r.template.get("sha256") if r.template else None for r in (before, after))
    if was != now:
        found.append(f"template: file sha256 {_short(was)} then, {_short(now)} now (added again?)")
    for name, was in before.identities.items():
        now = after.identities.get(name)
        if was != now:
            found.append(
                f"identity {name!r}: file sha256 {_short(was)} then, {_short(now)} now (re-enrolled?)"
            )
    return found


def _record(cls: type, data: Mapping[str, Any] | None) -> Any:
    if data is None:
        return None
    values = dict(data)
    for f in fields(cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def _what(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without where-to-write and how-many-threads keys."""
    what = {k: v for k, v in config.items() if k not in _PATH_KEYS}
    if isinstance(what.get("runtime"), Mapping):
        what["runtime"] = {k: v for k, v in what["runtime"].items() if k not in _RUNTIME_HOW}
    return what


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "none"


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
