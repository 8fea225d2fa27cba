"""Human-readable copies of a campaign's outputs, and a flat index of its items.

``folders``: ``<to>/<job>/<axis>=<value>/.../<seed>.png`` (re-face items: ``<item id[:12]>.png``; an output
that failed QA: ``<seed>-failed-qa.png``), hard links where the file system allows, else copies, plus
``<to>/index.csv``. ``csv`` / ``json``: only ``<to>/index.csv`` or ``<to>/index.json``, one row per item.
An existing file is never overwritten by a different one: the export is refused before anything is written.
"""

from __future__ import annotations

import csv
import errno
import filecmp
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from studio.batch.store import ItemRow
from studio.errors import InputError, OutputError
from studio.files import atomic_writer, write_text_atomic

if TYPE_CHECKING:
    from studio.batch.campaign import Campaign
    from studio.batch.manifest import Manifest

logger = logging.getLogger(__name__)

Layout = Literal["folders", "csv", "json"]
LAYOUTS: tuple[Layout, ...] = ("folders", "csv", "json")
EXPORTED_STATES = ("done", "failed_qa")  # items whose output is current (a pending one is being redone)
_UNSAFE = re.compile(r"[^\w .+=,@()-]+")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_MAX_NAME = 64


def export_campaign(campaign: Campaign, to: Path, layout: Layout) -> list[Path]:
    """Copy (hard-link) the outputs into folders per axis value, or write a flat CSV/JSON index only."""
    if layout not in LAYOUTS:
        raise InputError(f"Export layout {layout!r} is unknown.", fix=f"use one of: {', '.join(LAYOUTS)}.")
    to = Path(to)
    rows = campaign.store.items()
    names = axis_names(campaign.manifest, rows)
    records = [index_record(campaign.folder, row, names) for row in rows]
    if layout == "json":
        path = to / "index.json"
        write_text_atomic(path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        return [path]
    written: list[Path] = []
    if layout == "folders":
        copies = _plan_copies(campaign.folder, rows, names, to)
        for source, target in copies.values():
            _copy(source, target)
            written.append(target)
        for record in records:
            pair = copies.get(record["id"])
            record["exported"] = pair[1].relative_to(to).as_posix() if pair else ""
    path = to / "index.csv"
    write_text_atomic(path, _csv(records, names))
    logger.info("exported %d file(s) and %s", len(written), path)
    return [*written, path]


def axis_names(manifest: Manifest, rows: Iterable[ItemRow]) -> list[str]:
    """Every axis name the items use (seed aside): the manifest's order, then any others in item order."""
    found = dict.fromkeys(name for row in rows for name in row.axes if name != "seed")
    ordered = [axis.name for axis in manifest.axes if axis.name in found]
    return ordered + [name for name in found if name not in ordered]


def index_record(folder: Path, row: ItemRow, names: Sequence[str]) -> dict[str, Any]:
    """One item as a flat index row: id, job, kind, state, one value per axis, seed, output, QA, attempts."""
    qa = row.qa or {}
    output = folder / row.output if row.output else None
    return {
        "id": row.id,
        "job": row.job,
        "kind": row.kind,
        "state": row.state,
        **{name: row.axes.get(name, "") for name in names},
        "seed": row.seed,
        "output": str(output.resolve()) if output is not None and output.is_file() else "",
        "similarities": [float(s) for s in qa.get("similarities", ())],
        "reasons": list(row.reasons),
        "attempts": row.attempts,
        "favourite": row.favourite,
    }


def safe_name(text: str) -> str:
    """``text`` as one file-name part: letters, digits, spaces and ``.+=,@()-`` kept, others ``_``."""
    name = _UNSAFE.sub("_", text).strip("._ ") or "_"
    if name.split(".")[0].upper() in _RESERVED:
        name = "_" + name
    if len(name) > _MAX_NAME or name != text:
        # a changed name carries a digest of the original, so two values never share a folder or file
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]
        name = f"{name[: _MAX_NAME - 7]}~{digest}"
    return name


def _plan_copies(
    folder: Path, rows: Sequence[ItemRow], names: Sequence[str], to: Path
) -> dict[str, tuple[Path, Path]]:
    """item id -> (output, copy); refused (nothing written) when a copy would replace a different file."""
    copies: dict[str, tuple[Path, Path]] = {}
    taken: dict[Path, str] = {}
    for row in rows:
        source = folder / row.output if row.output else None
        if row.state not in EXPORTED_STATES or source is None:
            continue
        if not source.is_file():
            logger.warning("item %s: its output %s is missing; not exported", row.id[:12], source)
            continue
        target = _target(to, row, names, source.suffix)
        if target in taken:  # a re-roll's seed met another item's: the id tells them apart
            target = target.with_name(f"{target.stem}-{row.id[:12]}{target.suffix}")
        taken[target] = row.id
        if target.exists() and not _same_file(source, target):
            raise OutputError(
                f"Export refused: {target} already exists and differs from {source}.",
                fix="export into an empty folder, or move that file away first.",
            )
        copies[row.id] = (source, target)
    return copies


def _target(to: Path, row: ItemRow, names: Sequence[str], suffix: str) -> Path:
    """``<to>/<job>/<axis>=<value>/.../<seed or id[:12]>[-failed-qa].<ext>``."""
    parts = [safe_name(f"{name}={row.axes[name]}") for name in names if name in row.axes]
    stem = str(row.seed) if row.kind == "generate" and row.seed is not None else row.id[:12]
    stem += "-failed-qa" if row.state == "failed_qa" else ""
    return to.joinpath(safe_name(row.job), *parts, stem + (suffix or ".png"))


def _same_file(source: Path, target: Path) -> bool:
    return target.is_file() and (os.path.samefile(source, target) or filecmp.cmp(source, target, False))


def _copy(source: Path, target: Path) -> None:
    """A hard link to ``source`` at ``target`` (a copy across file systems); an identical file is kept."""
    if target.exists():
        return  # checked identical by _plan_copies
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return
    except FileExistsError as err:
        if _same_file(source, target):
            return
        raise OutputError(
            f"Export refused: {target} appeared meanwhile and differs from {source}.",
            fix="export into a folder no other process writes to.",
        ) from err
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES):
            raise OutputError(f"Cannot write {target} ({err}).", fix="check permissions.") from err
    with open(source, "rb") as src, atomic_writer(target, exclusive=True) as handle:
        shutil.copyfileobj(src, handle)


def _csv(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    columns = ["id", "job", "kind", "state", *names, "seed", "output", "similarities", "reasons"]
    columns += ["attempts", "favourite", *(["exported"] if records and "exported" in records[0] else [])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: _cell(record.get(key)) for key in columns})
    return buffer.getvalue()


def _cell(value: Any) -> str:
    """A CSV cell: lists joined by ``; ``, booleans as true/false, None as empty."""
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
