"""Campaign manifests: a TOML file of axes, defaults and jobs, read and checked before any work.

    [campaign]   name, max_rerolls, seed (the first), seeds (a count, or a list of seeds)
    [config]     config overrides, as --set takes them ("refine.min_similarity" = 0.3)
    [defaults]   any generate option (style, negative, steps, cfg, sampler, width, height, loras, ...)
    [axes]       name = [values]: combined as a cartesian product; a table of equal-length lists is a zip
                 group whose values vary together (locale with its identity)
    [[jobs]]     kind = "generate" (prompt, optional pose / init_image / template) or "refine" (image or
                 template, identity)

Every string of a job and of ``[defaults]`` may use ``{axis}`` variables; a job expands over the axes it
uses. Every error names the file, the key and the fix. The syntax is documented in docs/campaigns.md.
"""

from __future__ import annotations

import difflib
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from studio.errors import InputError
from studio.request import REFINE_OPTIONS

JobKind = Literal["generate", "refine"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SECTIONS = ("campaign", "config", "defaults", "axes", "jobs")
_CAMPAIGN_KEYS = ("name", "max_rerolls", "seed", "seeds")
# generate options a manifest may set ([defaults] or a job); the campaign owns prompt, seed and count
OPTIONS = (
    "negative", "style", "width", "height", "steps", "cfg", "sampler", "loras", "pose", "pose_source",
    "control_model", "control_scale", "control_start", "control_end", "init_image", "strength",
    "identity", "select", "face_index", "match", "adapter", "adapter_scale", "template", *REFINE_OPTIONS,
)  # fmt: skip
_PATHS = ("pose", "init_image", "image")  # relative to the manifest's folder
_JOB_KEYS = ("name", "kind", "prompt", "image", "seeds", "rows", "columns", *OPTIONS)
MAX_ITEMS = 100_000


class ManifestError(InputError):
    """A campaign manifest is invalid: the message names the file and the key."""


@dataclass(frozen=True)
class Axis:
    """One axis: a plain list (one variable), or a zip group (several variables varying together)."""

    name: str
    values: tuple[Mapping[str, str], ...]  # one {variable: value} per position

    @property
    def variables(self) -> tuple[str, ...]:
        """The template variables this axis sets."""
        return tuple(self.values[0])


@dataclass(frozen=True)
class Job:
    """One ``[[jobs]]`` entry with ``[defaults]`` merged in (the job's own values win)."""

    name: str
    kind: JobKind
    prompt: str  # a template; "" for refine jobs
    options: Mapping[str, Any]  # generate options (templates), paths resolved against the manifest
    image: str | None = None  # refine: the master image (a string template); None: the template's master
    seeds: tuple[int, ...] = ()  # generate: the seeds of every combination
    rows: str | None = None  # report: the axis down the contact sheet
    columns: str | None = None  # report: the axis across it


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked campaign manifest."""

    path: Path
    name: str
    max_rerolls: int
    overrides: tuple[str, ...]  # "key=value" config overrides ([config])
    axes: tuple[Axis, ...]
    jobs: tuple[Job, ...]
    text: str = field(repr=False, default="")  # the file as read (kept in the campaign store)

    def axis(self, name: str) -> Axis:
        """The axis called ``name``."""
        return next(a for a in self.axes if a.name == name)

    def used_axes(self, job: Job) -> tuple[Axis, ...]:
        """The axes whose variables ``job`` uses, in manifest order."""
        used = job_variables(job)
        return tuple(a for a in self.axes if used & set(a.variables))


def load_manifest(path: Path) -> Manifest:
    """Read and check the manifest at ``path``; a ManifestError naming the key and the fix if it is bad."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Campaign manifest {path} does not exist.", fix="check the path.")
    text = path.read_text(encoding="utf-8")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(f"{path}: not valid TOML ({err}).", fix="correct the syntax there.") from err
    where = _Where(path)
    where.unknown(table, _SECTIONS, "")
    campaign = where.table(table, "campaign", required=True)
    where.unknown(campaign, _CAMPAIGN_KEYS, "campaign")
    name = where.string(campaign, "name", "campaign", required=True)
    if not _NAME.match(name):
        raise where.error("campaign.name", f"{name!r} is not a usable name", "use letters, digits, - _ .")
    max_rerolls = where.integer(campaign, "max_rerolls", "campaign", default=0, low=0, high=100)
    seeds = _seeds(campaign, "campaign", where, default=(where.integer(campaign, "seed", "campaign", 42),))
    defaults = where.table(table, "defaults")
    where.unknown(defaults, OPTIONS, "defaults")
    axes = _axes(where.table(table, "axes"), where)
    jobs = _jobs(table.get("jobs"), defaults, seeds, path.parent, where)
    manifest = Manifest(path, name, max_rerolls, _overrides(where.table(table, "config")), axes, jobs, text)
    _check_variables(manifest, where)
    return manifest


def job_variables(job: Job) -> set[str]:
    """Every ``{variable}`` a job's strings use."""
    texts = [job.prompt, job.image or "", *_strings(job.options)]
    return {name for text in texts for name in template_fields(text)}


def template_fields(text: str) -> list[str]:
    """The ``{name}`` fields of ``text`` (``{{`` and ``}}`` are literal braces)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name]
    except ValueError:
        return []  # unbalanced braces: reported by the templating itself, with the text


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _seeds(table: Mapping[str, Any], key: str, where: _Where, default: tuple[int, ...]) -> tuple[int, ...]:
    """``seeds = 4`` (four seeds from ``seed`` up) or ``seeds = [7, 9]``."""
    value = table.get("seeds")
    first = default[0]
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
        return tuple(range(first, first + value))
    if isinstance(value, list) and value and all(isinstance(v, int) and 0 <= v < 2**32 for v in value):
        return tuple(dict.fromkeys(value))
    raise where.error(f"{key}.seeds", f"{value!r} received", "use a count (seeds = 4) or a list of seeds")


def _axes(table: Mapping[str, Any], where: _Where) -> tuple[Axis, ...]:
    axes = []
    for name, value in table.items():
        key = f"axes.{name}"
        if isinstance(value, Mapping):  # a zip group
            lists = {var: _axis_values(v, f"{key}.{var}", where, unique=False) for var, v in value.items()}
            if not lists:
                raise where.error(key, "the zip group is empty", "give it lists of equal length")
            lengths = {var: len(v) for var, v in lists.items()}
            if len(set(lengths.values())) != 1:
                found = ", ".join(f"{var} has {n}" for var, n in lengths.items())
                raise where.error(key, f"zip lists differ in length ({found})", "give each the same length")
            count = next(iter(lengths.values()))
            rows = list(zip(*lists.values(), strict=True))
            if len(set(rows)) != len(rows):
                raise where.error(key, "a combination of values is listed twice", "list each one once")
            axes.append(Axis(name, tuple({v: lists[v][i] for v in lists} for i in range(count))))
        else:
            axes.append(Axis(name, tuple({name: v} for v in _axis_values(value, key, where))))
    seen: dict[str, str] = {}
    for axis in axes:
        for var in axis.variables:
            if var in seen:
                raise where.error(f"axes.{axis.name}", f"variable {var!r} is also set by axes.{seen[var]}",
                                  "give each variable one axis")  # fmt: skip
            seen[var] = axis.name
    return tuple(axes)


def _axis_values(value: Any, key: str, where: _Where, unique: bool = True) -> list[str]:
    if not isinstance(value, list) or not value:
        raise where.error(key, f"{value!r} received", "give a non-empty list of values")
    if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        raise where.error(key, "values must be strings or numbers", 'e.g. ["elf ranger", "dwarf smith"]')
    values = [str(v) for v in value]
    if unique and len(set(values)) != len(values):
        raise where.error(key, "a value is listed twice", "list each value once")
    return values


def _jobs(
    value: Any, defaults: Mapping[str, Any], seeds: tuple[int, ...], folder: Path, where: _Where
) -> tuple[Job, ...]:
    if not isinstance(value, list) or not value:
        raise where.error("jobs", "no [[jobs]] given", 'add [[jobs]] with kind = "generate" or "refine"')
    jobs: list[Job] = []
    for index, entry in enumerate(value):
        key = f"jobs[{index}]"
        if not isinstance(entry, Mapping):
            raise where.error(key, "is not a table", "write it as [[jobs]]")
        where.unknown(entry, _JOB_KEYS, key)
        name = where.string(entry, "name", key, default=f"job{index + 1}")
        if not _NAME.match(name) or name in {j.name for j in jobs}:
            raise where.error(f"{key}.name", f"{name!r} is not a unique usable name", "name each job once")
        kind = where.string(entry, "kind", key, default="generate")
        if kind not in ("generate", "refine"):
            raise where.error(f"{key}.kind", f"{kind!r} received", 'use "generate" or "refine"')
        options = {**defaults, **{k: v for k, v in entry.items() if k in OPTIONS}}
        options = {k: _path(v, folder) if k in _PATHS else v for k, v in options.items()}
        if kind == "generate":
            prompt = where.string(entry, "prompt", key, required=True)
            image, job_seeds = None, _seeds(entry, key, where, default=seeds)
        else:
            prompt, job_seeds = "", ()
            image = _refine_image(entry, options, key, folder, where)
            if not options.get("identity"):
                raise where.error(
                    f"{key}.identity", "a refine job needs a cast", 'e.g. identity = "0={identity}"'
                )
            for bad in ("prompt", "seeds"):
                if bad in entry:
                    raise where.error(f"{key}.{bad}", "is not used by a refine job", f"remove {bad}")
        rows = where.string(entry, "rows", key, default="") or None
        columns = where.string(entry, "columns", key, default="") or None
        jobs.append(Job(name, kind, prompt, options, image, job_seeds, rows, columns))  # type: ignore[arg-type]
    return tuple(jobs)


def _refine_image(
    entry: Mapping[str, Any], options: Mapping[str, Any], key: str, folder: Path, where: _Where
) -> str | None:
    """A refine job's picture: its ``image``, or None to refine its ``template``'s master picture."""
    if "image" not in entry and options.get("template"):
        return None
    if "image" not in entry:
        raise where.error(
            f"{key}.image",
            "is missing",
            'add image = "master.png", or template = "NAME" (studio template add)',
        )
    return _path(where.string(entry, "image", key, required=True), folder)


def _path(value: Any, folder: Path) -> Any:
    """A path option relative to the manifest's folder (templates stay templates)."""
    if not isinstance(value, str) or not value:
        return value
    return value if Path(value).is_absolute() else str(folder / value)


def _overrides(table: Mapping[str, Any]) -> tuple[str, ...]:
    """``[config]`` as --set overrides: ``"refine.min_similarity" = 0.3`` or nested tables."""

    def flat(prefix: str, value: Any) -> list[str]:
        if isinstance(value, Mapping):
            return [item for k, v in value.items() for item in flat(f"{prefix}{k}.", v)]
        return [f"{prefix[:-1]}={value!r}" if isinstance(value, str) else f"{prefix[:-1]}={_toml(value)}"]

    return tuple(flat("", table))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(repr(v) if isinstance(v, str) else _toml(v) for v in value) + "]"
    return str(value)


def _check_variables(manifest: Manifest, where: _Where) -> None:
    """Every ``{variable}`` a job uses is set by an axis; report axes name axes the job uses."""
    known = {var: axis.name for axis in manifest.axes for var in axis.variables}
    for index, job in enumerate(manifest.jobs):
        for var in sorted(job_variables(job) - set(known)):
            hint = difflib.get_close_matches(var, list(known), n=1)
            fix = f"did you mean {{{hint[0]}}}" if hint else f"add it under [axes]: {var} = [...]"
            raise where.error(f"jobs[{index}]", f"uses {{{var}}}, which no axis sets", fix)
        usable = {a.name for a in manifest.used_axes(job)} | ({"seed"} if job.kind == "generate" else set())
        for key in ("rows", "columns"):
            axis = getattr(job, key)
            if axis is not None and axis not in usable:
                choices = ", ".join(sorted(usable)) or "none"
                raise where.error(f"jobs[{index}].{key}", f"{axis!r} is not an axis of this job",
                                  f"use one of: {choices}")  # fmt: skip
    count = sum(_count(manifest, job) for job in manifest.jobs)
    if count > MAX_ITEMS:
        raise where.error("axes", f"the plan has {count} items (at most {MAX_ITEMS})", "split the campaign")


def _count(manifest: Manifest, job: Job) -> int:
    total = max(1, len(job.seeds))
    for axis in manifest.used_axes(job):
        total *= len(axis.values)
    return total


class _Where:
    """Builds errors that name the manifest file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str, fix: str) -> ManifestError:
        return ManifestError(f"{self.path}: {key}: {problem}.", fix=f"{fix}.")

    def unknown(self, table: Mapping[str, Any], known: Sequence[str], key: str) -> None:
        for name in table:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                where = f"{key}.{name}" if key else name
                fix = f"did you mean {hint[0]!r}" if hint else f"known keys: {', '.join(known)}"
                raise self.error(where, "unknown key", fix)

    def table(self, table: Mapping[str, Any], key: str, required: bool = False) -> Mapping[str, Any]:
        value = table.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, "missing or not a table", f"add a [{key}] table")
        return value

    def string(
        self, table: Mapping[str, Any], key: str, where: str, *, required: bool = False, default: str = ""
    ) -> str:
        value = table.get(key)
        if value is None:
            if required:
                raise self.error(f"{where}.{key}", "is missing", f'add {key} = "..."')
            return default
        if not isinstance(value, str):
            raise self.error(f"{where}.{key}", f"{value!r} is not a string", "quote it")
        return value

    def integer(
        self,
        table: Mapping[str, Any],
        key: str,
        where: str,
        default: int,
        low: int = 0,
        high: int = 2**32 - 1,
    ) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.error(f"{where}.{key}", f"{value!r} received", f"use a whole number in {low}..{high}")
        return value
