"""The one model catalogue: every model the studio can use, with source, checksum and licence.

Entries come from ``configs/models.toml`` (real models) and, on the tiny profile, from the tiny kit's
own ``models.toml`` written by ``studio models make-tiny``. Both use this schema::

    [name]
    kind = "swapper"                  # studio.types.ModelKind
    description = "..."
    filename = "inswapper_128.onnx"   # the name on disk (a folder for format = "diffusers")
    format = "file"                   # file | diffusers
    source = { hf = "repo/id", file = "path/in/repo" }   # or { url = "..." } or { local = "rel/path" }
    sha256 = "<64 hex>"               # of the file; for folders, studio.files.tree_sha256
    size = 554253681                  # bytes
    licence = "..."
    commercial = false                # may the outputs be used commercially?
    fixture = "..."                   # tiny kit only: what the stand-in really does
    config = "repo/id or folder"      # single-file SD checkpoints: where the component configs come from
    [name.io]                         # facts about inputs/outputs/architecture, read by loaders
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from studio.config import ModelsConfig, config_dir
from studio.errors import ConfigError, ModelError
from studio.types import MODEL_KINDS, ModelKind

logger = logging.getLogger(__name__)

ModelFormat = Literal["file", "diffusers"]
KIT_CATALOGUE = "models.toml"
# Bumped whenever the kit gains or changes a model: an older kit (on disk from an earlier release) is rebuilt.
KIT_VERSION = "2"  # 2: the FaceFusion face-processor twins (occluder, parser, enhancers)
KIT_VERSION_FILE = "kit-version"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = ("kind", "filename", "source", "sha256", "size", "licence", "commercial")
_OPTIONAL = ("description", "format", "fixture", "config", "io")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a Hugging Face file, a URL, or a local path."""

    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str = "main"
    url: str | None = None
    local: Path | None = None

    def describe(self) -> str:
        """A short human-readable origin."""
        if self.hf_repo:
            return f"hf:{self.hf_repo}/{self.hf_file}"
        return self.url or f"local:{self.local}"


@dataclass(frozen=True)
class ModelEntry:
    """One catalogued model."""

    name: str
    kind: ModelKind
    filename: str
    source: ModelSource
    sha256: str
    size: int
    licence: str
    commercial: bool
    description: str = ""
    format: ModelFormat = "file"
    fixture: str | None = None
    config: str | None = None
    io: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_fixture(self) -> bool:
        """True for tiny-kit stand-ins whose output is not a real model's."""
        return self.fixture is not None


class Catalogue(Mapping[str, ModelEntry]):
    """Read-only name → entry mapping, merged from several catalogue files."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries = {entry.name: entry for entry in entries}

    def __getitem__(self, name: str) -> ModelEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str, kind: ModelKind | None = None) -> ModelEntry:
        """The entry called ``name`` (of ``kind`` if given), or a ModelError listing the choices."""
        entry = self._entries.get(name)
        if entry is None or (kind is not None and entry.kind != kind):
            names = sorted(n for n, e in self._entries.items() if kind is None or e.kind == kind)
            what = f"{kind} model" if kind else "model"
            raise ModelError(
                f"Unknown {what} {name!r}; the catalogue has: {', '.join(names) or 'none'}.",
                fix="pick one of those (see `studio models list`) or add an entry to configs/models.toml.",
            )
        return entry

    def by_sha256(self, sha256: str) -> ModelEntry | None:
        """The entry whose file has this sha256 (a catalogued model given by path), or None."""
        return next((e for e in self._entries.values() if e.sha256 == sha256), None)


def load_catalogue(models: ModelsConfig) -> Catalogue:
    """Load every catalogue file the config names, plus the tiny kit's catalogue if configured."""
    paths = [p if p.is_absolute() else config_dir() / p for p in models.catalogues]
    if models.tiny_kit is not None:
        paths.append(models.tiny_kit / KIT_CATALOGUE)
    entries: dict[str, ModelEntry] = {}
    for path in paths:
        for entry in read_catalogue_file(path):
            entries[entry.name] = entry
    return Catalogue(entries.values())


def read_catalogue_file(path: Path) -> list[ModelEntry]:
    """Parse and validate one catalogue TOML file; a missing tiny-kit catalogue yields no entries."""
    if not path.is_file():
        if path.name == KIT_CATALOGUE and path.parent.name != config_dir().name:
            logger.debug("tiny kit catalogue %s not built yet", path)
            return []
        raise ConfigError(f"Model catalogue {path} does not exist.", fix="check models.catalogues.")
    with open(path, "rb") as handle:
        try:
            table = tomllib.load(handle)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"Model catalogue {path} is not valid TOML: {err}.") from err
    return [_parse_entry(name, spec, path) for name, spec in table.items()]


def _parse_entry(name: str, spec: Any, path: Path) -> ModelEntry:
    where = f"catalogue {path}, entry [{name}]"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"In {where}: expected a table, got {spec!r}.")
    missing = [key for key in _REQUIRED if key not in spec]
    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        problem = f"missing keys {missing}" if missing else f"unknown keys {unknown}"
        raise ConfigError(f"In {where}: {problem}.", fix=f"entries need {', '.join(_REQUIRED)}.")
    if spec["kind"] not in MODEL_KINDS:
        raise ConfigError(f"In {where}: kind {spec['kind']!r} is not one of {', '.join(MODEL_KINDS)}.")
    if not _SHA256.match(str(spec["sha256"])):
        raise ConfigError(f"In {where}: sha256 {spec['sha256']!r} is not 64 lowercase hex digits.")
    fmt = spec.get("format", "file")
    if fmt not in get_args(ModelFormat):
        raise ConfigError(f"In {where}: format {fmt!r} is not one of {', '.join(get_args(ModelFormat))}.")
    if not isinstance(spec["size"], int) or not isinstance(spec["commercial"], bool):
        raise ConfigError(f"In {where}: size must be an integer and commercial true or false.")
    return ModelEntry(
        name=name,
        kind=spec["kind"],
        filename=_parse_filename(spec["filename"], where),
        source=_parse_source(spec["source"], path, where),
        sha256=spec["sha256"],
        size=spec["size"],
        licence=spec["licence"],
        commercial=spec["commercial"],
        description=spec.get("description", ""),
        format=fmt,
        fixture=spec.get("fixture"),
        config=_parse_config_ref(spec.get("config"), path),
        io=MappingProxyType(dict(spec.get("io", {}))),
    )


def _parse_filename(filename: Any, where: str) -> str:
    """A bare file or folder name, so that joining it to a models folder stays inside that folder."""
    unsafe = not isinstance(filename, str) or any(c in filename for c in "/\\:\0")
    if unsafe or filename in ("", ".", "..") or Path(filename).is_absolute():
        raise ConfigError(
            f"In {where}: filename {filename!r} is not a plain file or folder name.",
            fix='use a bare name such as "model.safetensors" (no "/", "\\" or ":"; not "." or "..").',
        )
    return filename


def _parse_config_ref(ref: str | None, path: Path) -> str | None:
    """A ``config`` that names a folder beside the catalogue becomes its absolute path."""
    if ref is not None and (path.parent / ref).is_dir():
        return str(path.parent / ref)
    return ref


def _parse_source(spec: Any, path: Path, where: str) -> ModelSource:
    if isinstance(spec, Mapping) and "hf" in spec and "file" in spec:
        return ModelSource(hf_repo=spec["hf"], hf_file=spec["file"], revision=spec.get("revision", "main"))
    if isinstance(spec, Mapping) and "url" in spec:
        return ModelSource(url=spec["url"])
    if isinstance(spec, Mapping) and "local" in spec:
        local = Path(spec["local"])
        return ModelSource(local=local if local.is_absolute() else path.parent / local)
    raise ConfigError(
        f"In {where}: source {spec!r} is not understood.",
        fix='use { hf = "repo", file = "path" }, { url = "..." } or { local = "path" }.',
    )
