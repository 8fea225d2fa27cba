"""Campaign reports: one labelled contact sheet per job (A1111 X/Y/Z-plot style) and one offline HTML page.

A sheet's rows and columns are the job's ``rows`` / ``columns`` axes (``seed`` is an axis of generate jobs);
by default rows are the first axis the job uses, columns its seeds when it has several, else its second axis.
Every further axis with more than one value gives one sheet per combination of values (A1111's Z axis).
A cell shows the output (framed in red when it failed QA) with its identity similarities under it, or a
grey tile naming the item's state. ``report/index.html`` embeds its thumbnails as data URIs, so it opens
offline; it links the full images relatively (``../outputs/...``).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps

from studio.batch.export import axis_names, safe_name
from studio.batch.manifest import Job, Manifest
from studio.batch.store import STATES, ItemRow
from studio.errors import StudioError
from studio.files import atomic_writer
from studio.imageio import DEFAULT_MAX_PIXELS, from_pil, read_image, to_pil, write_image
from studio.output import FAILED_QA_DIR

if TYPE_CHECKING:
    from studio.batch.campaign import Campaign, ReportFiles

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
THUMB = 256  # a sheet's cells are THUMB px squares (less on huge sheets); outputs are fitted inside
MIN_THUMB = 64
MAX_SHEET_PIXELS = DEFAULT_MAX_PIXELS  # a sheet stays readable by read_image
PREVIEW = 160  # the HTML page's thumbnails (JPEG)
GAP, PAD, BORDER = 4, 6, 4
FONT_SIZE, LINE = 14, 18
TITLE_H = 2 * LINE + 2 * PAD  # job name; row/column axes and the extra axes' values
HEADER_H = 2 * LINE + PAD  # column labels (only when there is a column axis)
LABEL_W = 160  # row labels (only when there is a row axis)
CAPTION_H = LINE  # similarities under each cell
WHITE, BLACK, GREY, EMPTY, RED = (255, 255, 255), (0, 0, 0), (120, 120, 120), (225, 225, 225), (210, 30, 30)
SHOWN = ("done", "failed_qa")  # states whose output is shown (a pending item is being redone)


@dataclass(frozen=True)
class Sheet:
    """One contact sheet: a job's items on a grid of two axes, at fixed values of its other axes."""

    job: str
    rows: str | None  # the axis down the sheet (None: one row)
    columns: str | None  # the axis across it (None: one column)
    row_values: tuple[str, ...]
    column_values: tuple[str, ...]
    fixed: tuple[tuple[str, str], ...]  # (axis, value) of every further axis: one sheet per combination
    cells: Mapping[tuple[int, int], ItemRow]  # (row, column) -> item

    @property
    def name(self) -> str:
        """The file name stem: ``<job>`` or ``<job>-<axis=value>-...``, file-name safe."""
        return "-".join([safe_name(self.job), *(safe_name(f"{a}={v}") for a, v in self.fixed)])

    @property
    def subtitle(self) -> str:
        """Which axis runs where, and the values this sheet is for."""
        parts = [f"{key}: {axis}" for key, axis in (("rows", self.rows), ("columns", self.columns)) if axis]
        return " | ".join(parts + [f"{a} = {v}" for a, v in self.fixed])


@dataclass(frozen=True)
class SheetGeometry:
    """Pixel layout: title band, column labels, row labels, square cells with a caption line under each."""

    rows: int
    columns: int
    cell: int
    label_w: int
    header_h: int

    @classmethod
    def of(cls, sheet: Sheet) -> SheetGeometry:
        """The layout of ``sheet``: THUMB px cells, smaller where the sheet would pass MAX_SHEET_PIXELS."""
        rows, columns = max(1, len(sheet.row_values)), max(1, len(sheet.column_values))
        label_w, header_h = LABEL_W if sheet.rows else 0, HEADER_H if sheet.columns else 0
        geometry = cls(rows, columns, THUMB, label_w, header_h)
        while geometry.cell > MIN_THUMB and geometry.size[0] * geometry.size[1] > MAX_SHEET_PIXELS:
            geometry = cls(rows, columns, geometry.cell - 16, label_w, header_h)
        return geometry

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet."""
        width = self.label_w + self.columns * (self.cell + GAP) + GAP
        return width, TITLE_H + self.header_h + self.rows * (self.cell + CAPTION_H + GAP) + GAP

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of a cell's picture."""
        x = self.label_w + GAP + column * (self.cell + GAP)
        return x, TITLE_H + self.header_h + GAP + row * (self.cell + CAPTION_H + GAP)


def write_report(campaign: Campaign) -> ReportFiles:
    """Write ``report/<job>[-<axis=value>...].png`` contact sheets and ``report/index.html``."""
    from studio.batch.campaign import ReportFiles

    folder = campaign.folder / REPORT_DIR
    rows = campaign.store.items()
    thumbs = _Thumbs(campaign.folder)
    sheets: dict[str, list[Path]] = {}
    for job in _job_names(campaign.manifest, rows):
        for sheet in plan_sheets(campaign.manifest, job, [r for r in rows if r.job == job]):
            path = folder / f"{sheet.name}.png"
            write_image(path, from_pil(draw_sheet(sheet, thumbs)))
            sheets.setdefault(job, []).append(path)
    page = folder / "index.html"
    with atomic_writer(page) as handle:
        handle.write(render_html(campaign, rows, sheets, thumbs).encode("utf-8"))
    found = [path for paths in sheets.values() for path in paths]
    logger.info("campaign %s: %d contact sheet(s) in %s", campaign.manifest.name, len(found), folder)
    return ReportFiles(sheets=tuple(found), html=page)


def plan_sheets(manifest: Manifest, job_name: str, items: Sequence[ItemRow]) -> list[Sheet]:
    """The contact sheets of one job's items: one per combination of the axes beyond rows and columns."""
    job = _job(manifest, job_name)
    values = axis_values(manifest, job, items)
    rows, columns = _layout(job, values)
    extra = [name for name in values if name not in (rows, columns) and len(values[name]) > 1]
    sheets = []
    for combo in itertools.product(*(values[name] for name in extra)):
        fixed = tuple(zip(extra, combo, strict=True))
        chosen = [item for item in items if all(item.axes.get(a) == v for a, v in fixed)]
        if not chosen:
            continue
        row_values = tuple(values[rows]) if rows else ()
        column_values = tuple(values[columns]) if columns else ()
        cells: dict[tuple[int, int], ItemRow] = {}
        for item in chosen:
            row, column = _index(row_values, item, rows), _index(column_values, item, columns)
            if row is None or column is None:  # an item planned under other axes (the manifest changed)
                logger.debug("item %s has no %s/%s value: not on a sheet", item.id[:12], rows, columns)
                continue
            cells.setdefault((row, column), item)
        sheets.append(Sheet(job_name, rows, columns, row_values, column_values, fixed, cells))
    return sheets


def axis_values(manifest: Manifest, job: Job | None, items: Sequence[ItemRow]) -> dict[str, list[str]]:
    """Axis name -> the values the items have, in manifest order (seed included; unknown ones last)."""
    known: dict[str, list[str]] = {}
    if job is not None:
        for axis in manifest.used_axes(job):
            known[axis.name] = [" / ".join(value.values()) for value in axis.values]
        if job.seeds:
            known["seed"] = [str(seed) for seed in job.seeds]
    present: dict[str, set[str]] = {}
    for item in items:
        for name, value in item.axes.items():
            present.setdefault(name, set()).add(value)
            if value not in known.setdefault(name, []):
                known[name].append(value)
    return {name: [v for v in vs if v in present[name]] for name, vs in known.items() if name in present}


def draw_sheet(sheet: Sheet, thumbs: _Thumbs) -> Image.Image:
    """The labelled grid of ``sheet`` as an RGB image."""
    geo = SheetGeometry.of(sheet)
    canvas = Image.new("RGB", geo.size, WHITE)
    draw = ImageDraw.Draw(canvas)
    width = geo.size[0] - 2 * PAD
    _text(draw, (PAD, PAD, width, LINE), sheet.job)
    _text(draw, (PAD, PAD + LINE, width, LINE), sheet.subtitle)
    for column, value in enumerate(sheet.column_values):
        x, _ = geo.origin(0, column)
        _text(draw, (x, TITLE_H, geo.cell, HEADER_H - PAD), f"{sheet.columns}: {value}", center=True)
    for row, value in enumerate(sheet.row_values):
        _, y = geo.origin(row, 0)
        _text(draw, (PAD, y, LABEL_W - 2 * PAD, geo.cell), f"{sheet.rows}: {value}")
    for row, column in itertools.product(range(geo.rows), range(geo.columns)):
        _draw_cell(canvas, draw, geo.origin(row, column), geo.cell, sheet.cells.get((row, column)), thumbs)
    return canvas


def render_html(
    campaign: Campaign, rows: Sequence[ItemRow], sheets: Mapping[str, Sequence[Path]], thumbs: _Thumbs
) -> str:
    """The self-contained report page: counts per state, then a table of every job's items."""
    name = html.escape(campaign.manifest.name)
    counts = campaign.store.counts()
    parts = [
        _HEAD.replace("{title}", f"Campaign {name}"),
        f"<h1>Campaign {name}</h1>",
        *(f"<p class='note'><b>note:</b> {html.escape(note)}</p>" for note in campaign.store.notes()),
        "<table class='counts'><tr>" + "".join(f"<th>{html.escape(s)}</th>" for s in STATES),
        "<th>total</th></tr><tr>" + "".join(f"<td>{counts.get(s, 0)}</td>" for s in STATES),
        f"<td>{len(rows)}</td></tr></table>",
    ]
    report_dir = campaign.folder / REPORT_DIR
    for job in _job_names(campaign.manifest, rows):
        items = [row for row in rows if row.job == job]
        parts.append(_job_html(campaign, job, items, sheets.get(job, ()), report_dir, thumbs))
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


# -- thumbnails -------------------------------------------------------------------------------------------


class _Thumbs:
    """Reads each shown output once: a THUMB px thumbnail for a sheet, a small JPEG data URI for the page."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._previews: dict[str, str | None] = {}

    def path(self, row: ItemRow) -> Path | None:
        """The item's output file, when it is shown (done or failed QA) and exists."""
        if row.state not in SHOWN or not row.output:
            return None
        path = self.folder / row.output
        return path if path.is_file() else None

    def image(self, row: ItemRow) -> Image.Image | None:
        """The output fitted in THUMB x THUMB (RGB), or None when there is none to show."""
        path = self.path(row)
        if path is None:
            return None
        try:
            picture = to_pil(read_image(path))  # HxWx3 BGR -> RGB PIL
        except StudioError as err:
            logger.warning("item %s: output not shown in the report: %s", row.id[:12], err)
            self._previews[row.id] = None
            return None
        picture.thumbnail((THUMB, THUMB))
        self._previews[row.id] = _data_uri(picture)
        return picture

    def preview(self, row: ItemRow) -> str | None:
        """A ``data:image/jpeg;base64,...`` thumbnail of the output, or None."""
        if row.id not in self._previews:
            self.image(row)
        return self._previews.get(row.id)


def _data_uri(picture: Image.Image) -> str:
    small = picture.copy()
    small.thumbnail((PREVIEW, PREVIEW))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=82)  # in memory, embedded in the page (no file written)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- drawing ----------------------------------------------------------------------------------------------


def _draw_cell(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    size: int,
    row: ItemRow | None,
    thumbs: _Thumbs,
) -> None:
    x, y = origin
    box = (x, y, x + size - 1, y + size - 1)
    picture = thumbs.image(row) if row is not None else None
    if row is None or picture is None:
        draw.rectangle(box, fill=EMPTY if row is None else GREY)
        text, colour = ("no item", BLACK) if row is None else (_state_text(row), WHITE)
        _text(draw, (x + PAD, y + PAD, size - 2 * PAD, size - 2 * PAD), text, fill=colour, center=True)
        return
    fitted = ImageOps.contain(picture, (size, size))
    canvas.paste(fitted, (x + (size - fitted.width) // 2, y + (size - fitted.height) // 2))
    if _failed_qa(row):
        draw.rectangle(box, outline=RED, width=BORDER)
        draw.rectangle((x, y + size - LINE - BORDER, x + size - 1, y + size - 1), fill=RED)
        _text(draw, (x, y + size - LINE - BORDER, size, LINE), "FAILED QA", fill=WHITE, center=True)
    similarities = (row.qa or {}).get("similarities") or []
    if similarities:
        text = "similarity " + ", ".join(f"{float(s):.2f}" for s in similarities)
        _text(draw, (x, y + size, size, CAPTION_H), text, center=True)


def _state_text(row: ItemRow) -> str:
    if row.state in SHOWN:
        return f"{row.state.replace('_', ' ')}\n(output missing or unreadable)"
    reason = f"\n{row.reasons[0]}" if row.state in ("failed", "blocked") and row.reasons else ""
    return row.state + reason


def _failed_qa(row: ItemRow) -> bool:
    return row.state == "failed_qa" or FAILED_QA_DIR in Path(row.output or "").parts


def _text(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    text: str,
    *,
    fill: tuple[int, int, int] = BLACK,
    center: bool = False,
) -> None:
    """Write ``text`` wrapped into ``box`` (x, y, width, height), centred vertically (and across)."""
    x, y, width, height = box
    lines = _wrap(draw, text, width, max(1, height // LINE))
    top = y + (height - len(lines) * LINE) // 2
    for index, line in enumerate(lines):
        shift = (width - draw.textlength(line, font=_font())) // 2 if center else 0
        draw.text((x + shift, top + index * LINE), line, fill=fill, font=_font())


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, max_lines: int) -> list[str]:
    """Word-wrapped lines of ``text`` (newlines kept); too long a word or too many lines end in '...'."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        start = len(lines)
        for word in paragraph.split():
            joined = f"{lines[-1]} {word}" if len(lines) > start else word
            if len(lines) > start and draw.textlength(joined, font=_font()) <= width:
                lines[-1] = joined
            else:
                lines.append(word)
    lines = [_cut(draw, line, width) for line in lines] or [""]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], _cut(draw, lines[max_lines - 1], width, force=True)]
    return lines


def _cut(draw: ImageDraw.ImageDraw, text: str, width: int, force: bool = False) -> str:
    if not force and draw.textlength(text, font=_font()) <= width:
        return text
    while text and draw.textlength(text + "...", font=_font()) > width:
        text = text[:-1]
    return text + "..."


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font (no font file needed); its bitmap font where Pillow lacks FreeType."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default()


# -- layout -----------------------------------------------------------------------------------------------


def _job(manifest: Manifest, name: str) -> Job | None:
    return next((job for job in manifest.jobs if job.name == name), None)


def _job_names(manifest: Manifest, rows: Sequence[ItemRow]) -> list[str]:
    """The jobs that have items: the manifest's order, then any no longer in it."""
    found = dict.fromkeys(row.job for row in rows)
    ordered = [job.name for job in manifest.jobs if job.name in found]
    return ordered + [name for name in found if name not in ordered]


def _layout(job: Job | None, values: Mapping[str, list[str]]) -> tuple[str | None, str | None]:
    """(rows, columns): the job's, else the first axis down and the seeds (or the second axis) across."""
    plain = [name for name in values if name != "seed"]
    rows = job.rows if job is not None and job.rows in values else None
    columns = job.columns if job is not None and job.columns in values else None
    if rows is None:
        rows = next((name for name in plain if name != columns), None)
    if columns is None:
        many_seeds = len(values.get("seed", ())) > 1
        columns = "seed" if many_seeds and rows != "seed" else next((n for n in plain if n != rows), None)
    return rows, columns


def _index(values: Sequence[str], item: ItemRow, axis: str | None) -> int | None:
    if axis is None:
        return 0
    value = item.axes.get(axis)
    return values.index(value) if value in values else None


# -- the HTML page ----------------------------------------------------------------------------------------


def _job_html(
    campaign: Campaign,
    job: str,
    items: Sequence[ItemRow],
    sheets: Sequence[Path],
    report_dir: Path,
    thumbs: _Thumbs,
) -> str:
    values = axis_values(campaign.manifest, _job(campaign.manifest, job), items)
    names = axis_names(campaign.manifest, items)
    order = {name: {v: i for i, v in enumerate(vs)} for name, vs in values.items()}
    ordered = sorted(items, key=lambda r: [order[n].get(r.axes.get(n, ""), -1) for n in [*names, "seed"]
                                           if n in order])  # fmt: skip
    links = " ".join(f"<a href='{html.escape(quote(p.name))}'>{html.escape(p.name)}</a>" for p in sheets)
    head = ["", "item", *names, "seed", "similarity", "QA reasons", "state", "attempts", "favourite", "file"]
    return "\n".join([
        f"<h2>{html.escape(job)} <small>({len(items)} items)</small></h2>",
        f"<p>Contact sheets: {links}</p>" if links else "",
        "<table class='items'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>",
        *(_item_html(row, names, campaign.folder, report_dir, thumbs) for row in ordered),
        "</table>",
    ])  # fmt: skip


def _item_html(row: ItemRow, names: Sequence[str], folder: Path, report_dir: Path, thumbs: _Thumbs) -> str:
    path = thumbs.path(row)
    href = html.escape(quote(Path(os.path.relpath(path, report_dir)).as_posix())) if path else ""
    preview = thumbs.preview(row)
    state = html.escape(row.state.replace("_", " "))
    picture = f"<img src='{preview}' alt='{state}'>" if preview else f"<div class='tile'>{state}</div>"
    similarities = (row.qa or {}).get("similarities") or []
    cells = [
        f"<a href='{href}'>{picture}</a>" if href else picture,
        f"<code title='{html.escape(row.id)}'>{html.escape(row.id[:12])}</code>",
        *(html.escape(row.axes.get(name, "")) for name in names),
        "" if row.seed is None else str(row.seed),
        html.escape(", ".join(f"{float(s):.3f}" for s in similarities)),
        "<br>".join(html.escape(reason) for reason in row.reasons),
        state,
        str(row.attempts),
        "&#9733;" if row.favourite else "",
        f"<a href='{href}'>full image</a>" if href else "",
    ]
    css = f"state-{row.state}" + (" failed-qa" if path and _failed_qa(row) else "")
    return f"<tr class='{css}'>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f2f2f2; }
.note { background: #fff7d6; border: 1px solid #e0c860; padding: 4px 8px; display: inline-block; }
td img { max-width: 160px; max-height: 160px; display: block; }
.tile { width: 120px; height: 120px; background: #787878; color: #fff; display: flex;
        align-items: center; justify-content: center; }
tr.failed-qa img { outline: 4px solid #d21e1e; }
tr.state-failed td, tr.state-blocked td { background: #fff4f4; }
</style></head>
<body>"""
