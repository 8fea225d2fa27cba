"""A campaign's plan: the manifest expanded into items, each keyed by the id of its resolved recipe.

Expansion is deterministic (axes in manifest order, seeds fixed here); an item's id is
``Studio.planned_recipe(...).id``: the sha256 of its canonical resolved recipe, every model file's sha256
included, so planning the same manifest twice gives the same ids. Items are ordered so the LoRA set (the base
model is one per config) changes as rarely as possible, and items sharing a draft sit together.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.batch.manifest import Axis, Job, JobKind, Manifest, ManifestError
from studio.errors import StudioError
from studio.prompts import fill_template
from studio.request import GenerateRequest

if TYPE_CHECKING:
    from studio.pipeline import Studio

logger = logging.getLogger(__name__)

_KEEP_TEMPLATES = (
    "negative",
)  # filled by the draft stage itself, like the prompt (the recipe keeps both raw)


@dataclass(frozen=True)
class Item:
    """One planned output: a job at one combination of axis values (and one seed, for generate jobs)."""

    id: str  # sha256 of the planned recipe
    job: str
    kind: JobKind
    axes: Mapping[str, str]  # axis name -> the value's label (zip groups: values joined by " / ")
    request: Mapping[str, Any]  # GenerateRequest.to_dict(), the seed included
    source: str | None  # refine jobs: the master image
    draft_key: str | None  # generate jobs: the draft shared by every item with this key
    identities: tuple[str, ...]  # every identity the item uses (consent is checked again when it starts)
    loras: str  # the LoRA set, for ordering
    position: int  # expansion order (the plan's order is by LoRA set, draft, then this)

    @property
    def seed(self) -> int | None:
        """The planned seed (generate jobs)."""
        return self.request["seed"] if self.kind == "generate" else None


@dataclass(frozen=True)
class Plan:
    """A manifest's items in run order, and the counts ``studio campaign plan`` prints."""

    manifest: Manifest
    items: tuple[Item, ...]

    @property
    def drafts(self) -> int:
        """Drafts that will actually be rendered (items sharing a draft key share one render)."""
        return len({item.draft_key for item in self.items if item.draft_key})

    def counts(self) -> dict[str, dict[str, int]]:
        """Items per job, and distinct values per axis (seed included)."""
        per_job = Counter(item.job for item in self.items)
        per_axis = {
            name: len({item.axes[name] for item in self.items if name in item.axes})
            for name in [*(a.name for a in self.manifest.axes), "seed"]
        }
        return {"jobs": dict(per_job), "axes": {k: v for k, v in per_axis.items() if v}}


def plan_campaign(manifest: Manifest, studio: Studio) -> Plan:
    """Every item of ``manifest``, checked (identities and consent, models and licences, files)."""
    items: dict[str, Item] = {}
    for index, job in enumerate(manifest.jobs):
        for axes, variables, seed in _combinations(manifest, job):
            item = _item(job, index, axes, variables, seed, len(items), studio, manifest)
            items.setdefault(item.id, item)  # an identical recipe is one item
    ordered = sorted(items.values(), key=lambda i: (i.loras, i.draft_key or "", i.position))
    plan = Plan(manifest, tuple(ordered))
    logger.info("campaign %s: %d items, %d drafts to render", manifest.name, len(ordered), plan.drafts)
    return plan


def _combinations(manifest: Manifest, job: Job) -> list[tuple[dict[str, str], dict[str, str], int | None]]:
    """(axis labels, template variables, seed) for every combination the job expands to."""
    axes: tuple[Axis, ...] = manifest.used_axes(job)
    combos = []
    for values in itertools.product(*(axis.values for axis in axes)):
        labels = {axis.name: " / ".join(value.values()) for axis, value in zip(axes, values, strict=True)}
        variables = {k: v for value in values for k, v in value.items()}
        for seed in job.seeds or (None,):
            combos.append(({**labels, **({"seed": str(seed)} if seed is not None else {})}, variables, seed))
    return combos


def _item(
    job: Job,
    index: int,
    axes: dict[str, str],
    variables: dict[str, str],
    seed: int | None,
    position: int,
    studio: Studio,
    manifest: Manifest,
) -> Item:
    where = f"{manifest.path}: jobs[{index}] ({job.name}) at " + (
        ", ".join(f"{k}={v}" for k, v in axes.items()) or "its only combination"
    )
    try:
        options = {k: v if k in _KEEP_TEMPLATES else _fill(v, variables) for k, v in job.options.items()}
        if "loras" in options:
            options["loras"] = _loras(options["loras"])
        for key in ("processors", "regions"):  # TOML lists -> the request's tuples
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
        request = GenerateRequest(
            prompt=job.prompt, variables=variables, seed=seed if seed is not None else 0, **options
        )
        source = Path(_fill(job.image, variables)) if job.image else None
        if job.kind == "refine" and source is None:  # a template's master picture (checked as it loads)
            source = studio.templates.image_path(studio.templates.load(str(request.template)))
        recipe = studio.planned_recipe(request, source=source)
    except StudioError as err:
        raise ManifestError(f"{where}: {err.problem}", fix=err.fix or "correct the manifest.") from err
    except (TypeError, ValueError) as err:  # a value of the wrong type for a generate option
        raise ManifestError(f"{where}: {err}.", fix="see docs/campaigns.md for each option's type.") from err
    loras = recipe.draft.loras if recipe.draft else ()
    return Item(
        id=recipe.id,
        job=job.name,
        kind=job.kind,
        axes=axes,
        request=request.to_dict(),
        source=str(source) if source else None,
        draft_key=recipe.draft_key,
        identities=tuple(recipe.refine.identities) if recipe.refine else (),
        loras=",".join(f"{lo['sha256']}:{lo['weight']}" for lo in loras),
        position=position,
    )


def _fill(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return fill_template(value, variables)
    if isinstance(value, list):
        return [_fill(v, variables) for v in value]
    return value


def _loras(value: Any) -> tuple[tuple[str, float], ...]:
    """``["film-grain:0.6", ["detail", 0.4]]`` → ((name, weight), ...)."""
    loras = []
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, str):
            name, _, weight = entry.partition(":")
            loras.append((name, float(weight or 1.0)))
        elif isinstance(entry, list) and len(entry) == 2:
            loras.append((str(entry[0]), float(entry[1])))
        else:
            raise TypeError(f'loras entry {entry!r} is neither "name:weight" nor [name, weight]')
    return tuple(loras)
