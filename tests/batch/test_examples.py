"""The example campaigns (examples/campaigns/) end to end from the command line, on the tiny profile.

Each example runs as a user runs it (a real ``studio`` subprocess per command, in temp folders): plan
(its printed counts), run (every item done), run again (nothing rendered), plan again (nothing new),
report (contact sheets and the HTML page) and export (a copy per item and the index). The identities the
ad-localisation example needs are enrolled first, under the names examples/campaigns/README.md gives.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
from skimage import data
from typer.testing import CliRunner

from studio.imageio import read_image, write_image

pytestmark = pytest.mark.slow  # two campaigns of 96 and 30 items, each with its worker start-up: ~2 min

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"
STUDIO = [sys.executable, "-c", "from studio.cli import main; main()"]


@dataclass(frozen=True)
class Workspace:
    """Temp folders shared by the module: the identities (enrolled once), the --set arguments."""

    root: Path
    sets: list[str]  # --profile tiny and --set arguments for every command

    def studio(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``studio ARGS`` (campaign commands get --out <root>/out) with this workspace's settings."""
        extra = ["--out", str(self.root / "out")] if args[0] == "campaign" else []
        env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(
            [*STUDIO, *args, *self.sets, *extra], capture_output=True, text=True, timeout=600, env=env
        )


def _readme_identities() -> list[str]:
    """The identities examples/campaigns/README.md enrols (``studio identity add NAME ...``)."""
    text = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    return re.findall(r"studio identity add (\S+) ", text)


@pytest.fixture(scope="module")
def workspace(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A private tiny kit, models and identities folder, with the README's six identities enrolled."""
    from studio.cli.main import app

    root = tmp_path_factory.mktemp("examples")
    settings = {
        "models.tiny_kit": tiny_kit,
        "models.dir": root / "models",
        "refine.identities_dir": root / "ids",
        "audit.log": root / "audit.jsonl",
        "provenance.data_dir": root / "studio-data",
    }
    sets = ["--profile", "tiny", *(a for k, v in settings.items() for a in ("--set", f"{k}={str(v)!r}"))]
    photo = root / "astronaut.png"
    write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    manifest = tomllib.loads((EXAMPLES / "ad-localisation.toml").read_text(encoding="utf-8"))
    names = _readme_identities()
    assert names == manifest["axes"]["market"]["identity"], "the README enrols the manifest's identities"
    runner = CliRunner()  # in process: six `identity add` subprocesses would add half a minute of imports
    for name in names:
        consent = "demo: scikit-image astronaut sample photo, public domain"
        added = runner.invoke(
            app, ["identity", "add", name, str(photo), "--consent", consent, "--scope", "ads", *sets]
        )
        assert added.exit_code == 0, added.output
        assert f"enrolled {name}" in added.output
    return Workspace(root, sets)


def _json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_plan(ws: Workspace, manifest: Path, items: int, drafts: int, lines: list[str]) -> None:
    proc = ws.studio("campaign", "plan", str(manifest))
    assert proc.returncode == 0, proc.stderr
    name = tomllib.loads(manifest.read_text(encoding="utf-8"))["campaign"]["name"]
    head = f"campaign {name}: {items} items ({items} not yet in the store), {drafts} drafts to render"
    assert proc.stdout.splitlines()[0] == head
    for line in lines:
        assert f"  {line}\n" in proc.stdout
    assert not (ws.root / "out" / "campaigns" / name).exists()  # planning writes nothing


def _check_run_rerun_report_export(
    ws: Workspace, manifest: Path, items: int, drafts: int, sheets: list[str]
) -> list[dict]:
    """Run, run again, plan again, status, report and export; returns the items of `status --json`."""
    name = tomllib.loads(manifest.read_text(encoding="utf-8"))["campaign"]["name"]
    folder = ws.root / "out" / "campaigns" / name
    # 1. run: every item done, each draft rendered once
    first = _json(ws.studio("campaign", "run", str(manifest), "--json"))
    assert first["counts"]["done"] == items == sum(first["counts"].values()), first
    assert first["attempts"] >= items and first["drafts_rendered"] == drafts
    # 2. run again, plan again: nothing is rendered, nothing is new
    again = _json(ws.studio("campaign", "run", str(manifest), "--json"))
    assert again["attempts"] == 0 and again["drafts_rendered"] == 0
    assert again["counts"]["done"] == items
    plan = _json(ws.studio("campaign", "plan", str(manifest), "--json"))
    assert plan["items"] == items and plan["new_items"] == 0
    # 3. status: every item done, its output a file in the campaign folder
    status = _json(ws.studio("campaign", "status", str(manifest), "--json"))
    assert {row["state"] for row in status["items"]} == {"done"} and len(status["items"]) == items
    outputs = [Path(row["output"]) for row in status["items"]]
    assert len(set(outputs)) == items and all(p.is_file() and folder in p.parents for p in outputs)
    # 4. report: one contact sheet per job (and per extra axis value), the offline page
    report = ws.studio("campaign", "report", str(manifest))
    assert report.returncode == 0, report.stderr
    wrote = [
        Path(line.removeprefix("wrote ")) for line in report.stdout.splitlines() if line.startswith("wrote ")
    ]
    assert [p.name for p in wrote] == [*(f"{s}.png" for s in sheets), "index.html"]
    for sheet in wrote[:-1]:
        assert read_image(sheet).std() > 0
    assert wrote[-1].is_file() and "<table" in wrote[-1].read_text(encoding="utf-8")
    # 5. export: a copy of every output under readable folders, and the index
    to = ws.root / f"export-{name}"
    exported = ws.studio("campaign", "export", str(manifest), "--to", str(to))
    assert exported.returncode == 0, exported.stderr
    assert f"exported {items + 1} file(s) into {to}" in exported.stdout.replace("\n", "")
    copies = sorted(to.rglob("*.png"))
    assert len(copies) == items
    with (to / "index.csv").open(encoding="utf-8") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == items and {row["state"] for row in index} == {"done"}
    assert all((to / row["exported"]).is_file() for row in index)
    return status["items"]


def test_concept_art_example(workspace: Workspace) -> None:
    manifest = EXAMPLES / "concept-art.toml"
    table = tomllib.loads(manifest.read_text(encoding="utf-8"))
    characters, styles = len(table["axes"]["character"]), len(table["axes"]["style"])
    seeds = table["campaign"]["seeds"]
    items = characters * styles * seeds  # every item its own draft: no identity, nothing to share
    lines = [f"job characters: {items} items", f"axis character: {characters} values",
             f"axis style: {styles} values", f"axis seed: {seeds} values"]  # fmt: skip
    _check_plan(workspace, manifest, items, items, lines)
    first_seed = table["campaign"]["seed"]
    sheets = [f"characters-seed={first_seed + n}" for n in range(seeds)]  # rows character, columns style
    rows = _check_run_rerun_report_export(workspace, manifest, items, items, sheets)
    assert {row["axes"]["style"] for row in rows} == set(table["axes"]["style"])


def test_ad_localisation_example(workspace: Workspace) -> None:
    manifest = EXAMPLES / "ad-localisation.toml"
    table = tomllib.loads(manifest.read_text(encoding="utf-8"))
    markets, seeds = len(table["axes"]["market"]["locale"]), table["campaign"]["seeds"]
    assert markets == 6 and seeds == 4 and table["campaign"]["max_rerolls"] == 2
    items, drafts = markets + markets * seeds, markets * seeds  # the master re-faced, and the variants
    lines = [f"job master-refaced: {markets} items", f"job variants: {markets * seeds} items",
             f"axis market: {markets} values", f"axis seed: {seeds} values"]  # fmt: skip
    _check_plan(workspace, manifest, items, drafts, lines)
    rows = _check_run_rerun_report_export(workspace, manifest, items, drafts, ["master-refaced", "variants"])
    # the zip group: each locale with its own identity (6 markets, not 36 combinations)
    pairs = {
        f"{locale} / {identity}" for locale, identity in zip(*table["axes"]["market"].values(), strict=True)
    }
    assert {row["axes"]["market"] for row in rows} == pairs
    refaced = [row for row in rows if row["job"] == "master-refaced"]
    master = read_image(EXAMPLES / "master.png")
    for row in refaced:  # the master creative re-faced: its size, other pixels
        assert row["qa"]["passed"] and row["qa"]["similarities"]
        image = read_image(Path(row["output"]))
        assert image.shape == master.shape and (image != master).any()
    # every output is marked, signed and audited: a re-faced master and a variant, as a user checks them
    variant = next(row for row in rows if row["job"] == "variants")
    verified = workspace.studio("verify", refaced[0]["output"], variant["output"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("verdict: signed, watermarked and audited") == 2
