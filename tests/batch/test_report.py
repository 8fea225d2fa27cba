"""Contact sheets, the offline HTML page and exports, on a store filled by hand (no model is run)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from studio.batch.campaign import Campaign
from studio.batch.export import safe_name
from studio.batch.manifest import load_manifest
from studio.batch.plan import Item
from studio.batch.report import (
    CAPTION_H,
    GAP,
    GREY,
    HEADER_H,
    LABEL_W,
    RED,
    THUMB,
    TITLE_H,
    SheetGeometry,
)
from studio.config import load_config
from studio.errors import OutputError
from studio.imageio import write_image

MANIFEST = """\
[campaign]
name = "sheets"
seeds = 2

[axes]
style = ["ink", "oil paint"]
mood = ["calm", "angry"]
light = ["dim", "bright"]

[[jobs]]
name = "portraits"
prompt = "a {style} portrait"

[[jobs]]
name = "moods"
prompt = "a {style} {mood} face in {light} light"
seeds = [7]
rows = "mood"
columns = "style"
"""

# RGB colours of the synthetic outputs (written as BGR arrays)
RED_OUT, GREEN_OUT, BLUE_OUT, YELLOW_OUT = (230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 10)


def _id(job: str, seed: int, **axes: str) -> str:
    return hashlib.sha256(f"{job}{sorted(axes.items())}{seed}".encode()).hexdigest()


def _item(campaign: Campaign, job: str, axes: dict[str, str], seed: int, position: int) -> str:
    item_id = _id(job, seed, **axes)
    axes = {**axes, "seed": str(seed)}
    request = {"prompt": "a portrait", "seed": seed}
    campaign.store.add_items([Item(item_id, job, "generate", axes, request, None, None, (), "", position)])
    return item_id


def _done(campaign: Campaign, item_id: str, seed: int, rgb: tuple[int, int, int], **qa: object) -> None:
    """Finish an item with a solid-colour 40x30 output (failed_qa: under outputs/failed-qa/)."""
    state = "failed_qa" if qa.pop("failed", False) else "done"
    job = campaign.store.item(item_id).job
    relative = f"outputs/{'failed-qa' if state == 'failed_qa' else job}/{item_id}.png"
    write_image(campaign.folder / relative, np.full((30, 40, 3), rgb[::-1], np.uint8))  # HxWx3 BGR
    n = campaign.store.start(item_id, seed, "test")
    campaign.store.finish(item_id, n, state, output=relative, qa={"similarities": [], "reasons": [], **qa},
                          draft_rendered=False, seconds=0.1)  # fmt: skip


@pytest.fixture
def campaign(tmp_path: Path) -> Iterator[Campaign]:
    """Campaign "sheets": 4 portraits (2 done, 1 failed QA, 1 pending) and 8 moods in every state.

    Item ids are ``_id(job, seed, **axes)``."""
    path = tmp_path / "sheets.toml"
    path.write_text(MANIFEST, encoding="utf-8")
    config = load_config("tiny", overrides=[f"output_dir={str(tmp_path / 'out')!r}"])
    campaign = Campaign(load_manifest(path), config)
    ids = {}
    for style in ("ink", "oil paint"):
        for seed in (42, 43):
            ids[style, seed] = _item(campaign, "portraits", {"style": style}, seed, len(ids))
    _done(campaign, ids["ink", 42], 42, RED_OUT, similarities=[0.7134, 0.65])
    _done(campaign, ids["ink", 43], 43, GREEN_OUT)
    _done(campaign, ids["oil paint", 42], 42, BLUE_OUT, failed=True, reasons=["faces: similarity 0.1"])
    for light in ("dim", "bright"):
        for mood in ("calm", "angry"):
            for style in ("ink", "oil paint"):
                axes = {"style": style, "mood": mood, "light": light}
                ids[style, mood, light] = _item(campaign, "moods", axes, 7, len(ids))
    _done(campaign, ids["ink", "calm", "dim"], 7, YELLOW_OUT)
    n = campaign.store.start(ids["oil paint", "calm", "dim"], 7, "test")
    campaign.store.fail(ids["oil paint", "calm", "dim"], n, "failed", error_class="X", stage="draft",
                        message="out of memory")  # fmt: skip
    n = campaign.store.start(ids["ink", "angry", "dim"], 7, "test")
    campaign.store.fail(ids["ink", "angry", "dim"], n, "blocked", error_class="IdentityError",
                        stage="consent", message="consent withdrawn")  # fmt: skip
    campaign.store.start(ids["oil paint", "angry", "dim"], 7, "test")
    campaign.store.set_favourite(ids["ink", 43])
    yield campaign
    campaign.close()


def _rgb(sheet: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(sheet.getpixel(xy))  # type: ignore[arg-type]


def _close(found: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    return all(abs(a - b) <= 2 for a, b in zip(found, wanted, strict=True))


def test_contact_sheet_is_the_labelled_grid(campaign: Campaign) -> None:
    files = campaign.report()
    names = sorted(p.name for p in files.sheets)
    assert names == ["moods-light=bright.png", "moods-light=dim.png", "portraits.png"]
    assert all(p.parent == campaign.folder / "report" for p in files.sheets)
    sheet = Image.open(campaign.folder / "report" / "portraits.png").convert("RGB")
    # rows: style (ink, oil paint); columns: seed (42, 43); label column, header, title
    width = LABEL_W + 2 * (THUMB + GAP) + GAP
    height = TITLE_H + HEADER_H + 2 * (THUMB + CAPTION_H + GAP) + GAP
    assert sheet.size == (width, height)
    geometry = SheetGeometry(rows=2, columns=2, cell=THUMB, label_w=LABEL_W, header_h=HEADER_H)
    assert geometry.size == (width, height)
    centre = THUMB // 2
    x, y = geometry.origin(0, 0)  # ink, seed 42: done, red
    assert _close(_rgb(sheet, (x + centre, y + centre)), RED_OUT)
    x, y = geometry.origin(0, 1)  # ink, seed 43: done, green
    assert _close(_rgb(sheet, (x + centre, y + centre)), GREEN_OUT)
    x, y = geometry.origin(1, 0)  # oil paint, seed 42: failed QA, blue in a red frame
    assert _close(_rgb(sheet, (x + centre, y + centre)), BLUE_OUT)
    assert _rgb(sheet, (x + 1, y + centre)) == RED
    x, y = geometry.origin(1, 1)  # oil paint, seed 43: pending, a grey tile
    assert _rgb(sheet, (x + 2, y + 2)) == GREY
    assert _rgb(sheet, (x + THUMB - 3, y + THUMB - 3)) == GREY


def test_extra_axis_gives_one_sheet_per_value(campaign: Campaign) -> None:
    campaign.report()
    folder = campaign.folder / "report"
    geometry = SheetGeometry(rows=2, columns=2, cell=THUMB, label_w=LABEL_W, header_h=HEADER_H)
    dim = Image.open(folder / "moods-light=dim.png").convert("RGB")
    bright = Image.open(folder / "moods-light=bright.png").convert("RGB")
    assert dim.size == bright.size == geometry.size
    # rows: mood (calm, angry); columns: style (ink, oil paint), as the job asks
    x, y = geometry.origin(0, 0)
    assert _close(_rgb(dim, (x + THUMB // 2, y + THUMB // 2)), YELLOW_OUT)
    for row, column in ((0, 1), (1, 0), (1, 1)):  # failed, blocked, running: grey tiles
        x, y = geometry.origin(row, column)
        assert _rgb(dim, (x + 2, y + 2)) == GREY
    for row, column in ((0, 0), (0, 1), (1, 0), (1, 1)):  # everything pending
        x, y = geometry.origin(row, column)
        assert _rgb(bright, (x + 2, y + 2)) == GREY


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [(tag, key, value or "") for key, value in attrs if key in ("href", "src")]


def test_html_page_is_self_contained(campaign: Campaign) -> None:
    campaign.store.add_notes(["tiny profile: the pictures are <NOT> portraits"])
    page = campaign.report().html
    assert page == campaign.folder / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "tiny profile: the pictures are &lt;NOT&gt; portraits" in text  # placeholders are labelled
    for row in campaign.store.items():
        assert row.id[:12] in text
        assert all(f"<td>{value}</td>" in text for value in row.axes.values())
    for state in ("pending", "running", "done", "failed qa", "failed", "blocked"):
        assert state in text
    assert "0.713" in text and "faces: similarity 0.1" in text and "consent withdrawn" in text
    parser = _Refs()
    parser.feed(text)
    sources = [value for tag, key, value in parser.refs if key == "src"]
    assert len(sources) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    links = {value for tag, key, value in parser.refs if key == "href"}
    assert all((page.parent / unquote(link)).resolve().is_file() for link in links)
    outputs = {(page.parent / unquote(link)).resolve() for link in links if link.startswith("../outputs/")}
    shown = [r for r in campaign.store.items() if r.state in ("done", "failed_qa")]
    assert outputs == {(campaign.folder / r.output).resolve() for r in shown if r.output}
    assert {"portraits.png", "moods-light=dim.png"} <= {unquote(link) for link in links}


def test_export_folders_links_every_output(campaign: Campaign, tmp_path: Path) -> None:
    to = tmp_path / "export"
    written = campaign.export(to, "folders")
    moods = {"style": "ink", "mood": "calm", "light": "dim"}
    expected = {
        to / "portraits" / "style=ink" / "42.png": _id("portraits", 42, style="ink"),
        to / "portraits" / "style=ink" / "43.png": _id("portraits", 43, style="ink"),
        to / "portraits" / "style=oil paint" / "42-failed-qa.png": _id("portraits", 42, style="oil paint"),
        to / "moods" / "style=ink" / "mood=calm" / "light=dim" / "7.png": _id("moods", 7, **moods),
    }
    assert written == [*expected, to / "index.csv"]
    for path, item_id in expected.items():
        source = campaign.folder / (campaign.store.item(item_id).output or "")
        assert path.read_bytes() == source.read_bytes() and path.samefile(source)  # a hard link
    assert sorted(p for p in to.rglob("*") if p.is_file()) == sorted(written)
    with open(to / "index.csv", newline="", encoding="utf-8") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    assert rows[_id("portraits", 42, style="ink")]["exported"] == "portraits/style=ink/42.png"
    assert rows[_id("moods", 7, **{**moods, "light": "bright"})]["exported"] == ""
    assert campaign.export(to, "folders") == written  # again: identical files are kept, nothing refused


def test_export_copies_across_file_systems(
    campaign: Campaign, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("studio.batch.export.os.link", no_link)
    written = campaign.export(tmp_path / "export", "folders")
    copy = tmp_path / "export" / "portraits" / "style=ink" / "42.png"
    source = campaign.folder / (campaign.store.item(_id("portraits", 42, style="ink")).output or "")
    assert copy in written and copy.read_bytes() == source.read_bytes()
    assert not copy.samefile(source)


def test_export_refuses_to_overwrite_a_different_file(campaign: Campaign, tmp_path: Path) -> None:
    to = tmp_path / "export"
    mine = to / "portraits" / "style=ink" / "42.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"someone else's picture")
    with pytest.raises(OutputError, match=r"42\.png") as caught:
        campaign.export(to, "folders")
    assert "\n" not in str(caught.value) and "Fix:" in str(caught.value)
    assert mine.read_bytes() == b"someone else's picture"
    assert sorted(p for p in to.rglob("*") if p.is_file()) == [mine]  # refused before writing anything


@pytest.mark.parametrize("layout", ["csv", "json"])
def test_export_index_rows_are_the_store_items(campaign: Campaign, tmp_path: Path, layout: str) -> None:
    to = tmp_path / "index"
    written = campaign.export(to, layout)  # type: ignore[arg-type]
    assert written == [to / f"index.{layout}"]
    if layout == "json":
        rows = json.loads(written[0].read_text(encoding="utf-8"))
    else:
        with open(written[0], newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0])[:7] == ["id", "job", "kind", "state", "style", "mood", "light"]
    items = campaign.store.items()
    assert [row["id"] for row in rows] == [item.id for item in items]
    for row, item in zip(rows, items, strict=True):
        assert (row["job"], row["kind"], row["state"]) == (item.job, item.kind, item.state)
        assert all(row[name] == item.axes.get(name, "") for name in ("style", "mood", "light"))
        output = str((campaign.folder / item.output).resolve()) if item.output else ""
        assert row["output"] == output
        similarities = list((item.qa or {}).get("similarities", []))
        if layout == "json":
            assert (row["seed"], row["attempts"]) == (item.seed, item.attempts)
            assert row["favourite"] is item.favourite
            assert row["similarities"] == similarities and row["reasons"] == list(item.reasons)
        else:
            assert (row["seed"], row["attempts"]) == (str(item.seed), str(item.attempts))
            assert row["favourite"] == ("true" if item.favourite else "false")
            assert row["similarities"] == "; ".join(str(s) for s in similarities)
            assert row["reasons"] == "; ".join(item.reasons)


def test_safe_names_never_merge_two_values() -> None:
    assert safe_name("oil paint") == "oil paint"
    assert safe_name("style=ink") == "style=ink"
    assert "/" not in safe_name("a/b") and safe_name("a/b") != safe_name("a_b")
    assert safe_name("..") not in ("", ".", "..")
    assert safe_name("CON").upper() != "CON"
    assert len(safe_name("x" * 300)) <= 64 and safe_name("x" * 300) != safe_name("x" * 301)


def test_report_of_an_empty_campaign(tmp_path: Path) -> None:
    path = tmp_path / "sheets.toml"
    path.write_text(MANIFEST, encoding="utf-8")
    config = load_config("tiny", overrides=[f"output_dir={str(tmp_path / 'out')!r}"])
    campaign = Campaign(load_manifest(path), config)
    try:
        files = campaign.report()
    finally:
        campaign.close()
    assert files.sheets == ()
    assert "Campaign sheets" in files.html.read_text(encoding="utf-8")
