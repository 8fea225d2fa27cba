"""The one output sink: every image the studio writes goes through :meth:`OutputSink.write`.

A run gets a run id (UTC time + random suffix) when it starts; its resolved config and raw request are
written under that id at once, so a killed run leaves its request behind. Each image is named after what it
is (``<run>-<seed>.png`` for a draft, ``<run>-<seed>-<cast>.png`` for a refined draft,
``<run>-<source>-<cast>.png`` for a re-faced file) and committed with a no-clobber hard link, so two
processes writing into one folder can never overwrite each other. Steps of a write, in order: name →
(label) → watermark → A1111 parameters and the recipe as PNG chunks → C2PA signature (last) → the file,
claimed atomically → audit entry. Provenance (``studio.provenance``) hooks in here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from studio.config import StudioConfig, config_to_toml
from studio.errors import OutputError
from studio.files import atomic_writer, remove_stale_temps
from studio.imageio import encode_png, write_image
from studio.infotext import a1111_parameters
from studio.provenance import Provenance
from studio.recipe import Recipe
from studio.types import ImageBGR

logger = logging.getLogger(__name__)

FAILED_QA_DIR = "failed-qa"  # outputs that failed the QA gate after their re-rolls, apart from the rest

_UNSAFE = re.compile(r"[^\w.+=-]+")
_MAX_TRIES = 1000


def new_run_id() -> str:
    """``20261203-104700-1a2b3c``: sortable by time, unique across processes writing at once."""
    return f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class OutputSink:
    """Writes one run's files into ``folder``: never over an existing file, never a partial one."""

    def __init__(self, folder: Path, run_id: str | None = None, provenance: Provenance | None = None) -> None:
        self.folder = Path(folder)
        self.run_id = run_id or new_run_id()
        self.provenance = provenance  # None: plain files (no marks, no audit), e.g. for tools and tests
        self.config_file: Path | None = None

    def start(self, config: StudioConfig, request: Mapping[str, Any]) -> Path:
        """Begin the run: remove stale temp files of ours, write the run's config and request."""
        self.sweep()
        self.config_file = self._new_file(f"{self.run_id}-config", ".toml", config_to_toml(config).encode())
        self._new_file(
            f"{self.run_id}-request", ".json", json.dumps(request, indent=1, sort_keys=True).encode()
        )
        return self.config_file

    def write(
        self,
        image: ImageBGR,
        recipe: Recipe,
        stem: str,
        *,
        subfolder: str | None = None,
        parent: ImageBGR | None = None,
    ) -> Path:
        """Write ``image`` as ``<run>-<stem>.png`` (or ``-1``, ``-2``… if taken) with its recipe.

        ``parent``: the draft a refined image was made from (its C2PA parent ingredient; a re-faced
        file's source is read from the recipe)."""
        folder = self.folder / subfolder if subfolder else self.folder
        output = _Output(image, recipe, parent)
        for path in self._names(f"{self.run_id}-{_safe(stem)}", ".png", folder):
            try:
                return self._commit(path, output)
            except FileExistsError:
                continue
        raise _no_free_name(stem, folder)

    def write_addressed(
        self,
        image: ImageBGR,
        recipe: Recipe,
        name: str,
        *,
        subfolder: str = "",
        parent: ImageBGR | None = None,
        intermediate: bool = False,
    ) -> Path:
        """Write ``image`` as ``<subfolder>/<name>.png``, where ``name`` is a content address (a recipe or
        campaign item id): a file already there is the same content, so it is kept and its path returned.

        ``intermediate``: a file the studio reads back as an input (a campaign's stored draft): signed, but
        its pixels are not watermarked (a reused draft must equal a fresh one) and it is not audited."""
        path = self.folder / subfolder / f"{_safe(name)}.png"
        try:
            return self._commit(path, _Output(image, recipe, parent, intermediate))
        except FileExistsError:
            logger.info("%s is already written (content-addressed): kept", path)
            return path

    def record_blocked(self, recipe: Recipe, reasons: Sequence[str], scores: Mapping[str, float]) -> None:
        """Audit a picture the content check blocked (nothing is written): its recipe id and scores."""
        if self.provenance is not None:
            self.provenance.audit.append(
                "blocked", identities=output_identities(recipe), recipe_id=recipe.id,
                reasons=list(reasons), scores=dict(scores),
            )  # fmt: skip

    def sweep(self) -> None:
        """Remove temp files of ours that killed runs left in the folder and its immediate subfolders."""
        removed = remove_stale_temps(self.folder)
        if removed:
            logger.info("removed %d stale temp file(s) left by killed runs in %s", len(removed), self.folder)

    def _commit(self, path: Path, output: _Output) -> Path:
        """The complete file claimed atomically at ``path``: marks, PNG chunks, signature; then its audit."""
        recipe, provenance = output.recipe, self.provenance
        if provenance is None:
            return write_image(
                path,
                output.image,
                parameters=a1111_parameters(recipe),
                recipe=recipe.to_dict(),
                exclusive=True,
            )
        # 1. pixels: label and watermark (payload from the recipe id); a stored draft keeps its pixels
        image, marking = output.image, None
        if not output.intermediate:
            image, marking = provenance.mark(image, recipe.id)
        # 2. PNG chunks: the A1111 parameters and the recipe
        png = encode_png(image, parameters=a1111_parameters(recipe), recipe=recipe.to_dict())
        # 3. the C2PA signature, last: the audit head it names is the log's state before this output
        identities = output_identities(recipe)
        png = provenance.seal(
            png,
            title=path.name,
            recipe_id=recipe.id,
            models=recipe.models,
            identities=identities,
            edited=recipe.refine is not None,
            parent=_parent_bytes(output),
            audit_head=provenance.audit.head(),
        )
        # 4. the file, claimed atomically (no-clobber), then its audit entry
        with atomic_writer(path, exclusive=True) as handle:
            handle.write(png)
        if marking is not None:
            provenance.record(path=str(path), data=png, recipe_id=recipe.id, identities=identities,
                              marking=marking, stages=recipe.stages)  # fmt: skip
        return path

    def _new_file(self, stem: str, suffix: str, data: bytes) -> Path:
        for path in self._names(stem, suffix, self.folder):
            try:
                with atomic_writer(path, exclusive=True) as handle:
                    handle.write(data)
                return path
            except FileExistsError:
                continue
        raise _no_free_name(stem, self.folder)

    def _names(self, stem: str, suffix: str, folder: Path) -> list[Path]:
        return [folder / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}" for n in range(_MAX_TRIES)]


@dataclass(frozen=True, eq=False)
class _Output:
    image: ImageBGR  # HxWx3 uint8 BGR
    recipe: Recipe
    parent: ImageBGR | None = None  # the draft a refined picture was made from
    intermediate: bool = False


def output_identities(recipe: Recipe) -> dict[str, str]:
    """Every identity an output used (name -> identity file sha256): refine casts and the draft adapter."""
    found = dict(recipe.refine.identities) if recipe.refine is not None else {}
    adapter = recipe.draft.adapter if recipe.draft is not None else None
    if adapter:
        found[adapter["identity"]] = adapter["identity_sha256"]
    return found


def _parent_bytes(output: _Output) -> bytes | None:
    """The C2PA parent ingredient: a re-faced file's source bytes, or the draft a refine started from."""
    source = output.recipe.source or {}
    if source.get("path") and Path(source["path"]).is_file():
        return Path(source["path"]).read_bytes()
    return None if output.parent is None else encode_png(output.parent)


def _no_free_name(stem: str, folder: Path) -> OutputError:
    return OutputError(
        f"No free file name for {stem} in {folder}: {_MAX_TRIES} names are taken.",
        fix="write into another folder (--out DIR) or clear this one.",
    )


def _safe(text: str) -> str:
    """A file-name-safe version of ``text`` (identity names are already safe; source stems may not be)."""
    return _UNSAFE.sub("_", text).strip("._") or "image"
