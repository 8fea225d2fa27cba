"""The command line imports only what a command needs (each command in its own subprocess).

Light commands (help, identity records, model and style lists) import no model library; `refine` and
`identity add` load face models but never the draft stage. Each subprocess runs the command through
``studio.cli.main`` and, after it has finished, reports the modules it imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from skimage import data

from studio.imageio import write_image

MODEL_LIBRARIES = ("torch", "diffusers", "compel")
DRAFT_STAGE = ("diffusers", "compel", "studio.draft.pipeline", "studio.draft.load", "studio.draft.embeds")
WATCHED = sorted({*MODEL_LIBRARIES, *DRAFT_STAGE})
MARK = "IMPORTED-AFTER-COMMAND:"

# argv[1]: the command's arguments (JSON); argv[2]: the modules to look for once the command is done
RUN_AND_REPORT = f"""
import json, sys
args, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["studio", *args]
from studio.cli import main
code = 0
try:
    main()
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
print({MARK!r} + json.dumps({{"code": code, "loaded": [m for m in watched if m in sys.modules]}}))
"""


def _run(*args: str) -> tuple[int, list[str], str]:
    """(exit code, watched modules imported by the end of the command, stdout + stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, json.dumps(args), json.dumps(WATCHED)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"no report from the subprocess:\n{done.stdout}\n{done.stderr}"
    report = json.loads(lines[-1].removeprefix(MARK))
    return report["code"], report["loaded"], done.stdout + done.stderr


def _settings(kit: Path, root: Path) -> list[str]:
    """--profile tiny with this session's kit and private folders under ``root``."""
    values = {
        "models.tiny_kit": kit,
        "models.dir": root / "models",
        "output_dir": root / "out",
        "refine.identities_dir": root / "ids",
    }
    return ["--profile", "tiny", *(a for k, v in values.items() for a in ("--set", f"{k}={str(v)!r}"))]


@pytest.fixture(scope="module")
def enrolled(
    tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, tuple[int, list[str], str]]:
    """A folder whose ids/ holds identity 'anna', enrolled by `studio identity add` (and what it imported)."""
    root = tmp_path_factory.mktemp("enrolled")
    photo = root / "anna.png"
    write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    added = _run("identity", "add", "anna", str(photo), "--consent", "release #1", *_settings(tiny_kit, root))
    return root, added


@pytest.fixture
def root(enrolled: tuple[Path, tuple[int, list[str], str]], tmp_path: Path) -> Path:
    """A private copy of the enrolled library: each command may change it."""
    shutil.copytree(enrolled[0] / "ids", tmp_path / "ids")
    return tmp_path


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["identity", "list"],
        ["identity", "show", "anna"],
        ["identity", "revoke", "anna"],
        ["identity", "remove", "anna"],
        ["models", "list"],
        ["styles", "list"],
    ],
    ids=" ".join,
)
def test_light_commands_import_no_model_library(command: list[str], tiny_kit: Path, root: Path) -> None:
    settings = [] if command in (["--help"], ["styles", "list"]) else _settings(tiny_kit, root)
    code, loaded, output = _run(*command, *settings)
    assert code == 0, output
    assert "Traceback" not in output
    assert [m for m in loaded if m in MODEL_LIBRARIES] == [], f"`studio {' '.join(command)}` imported them"


def test_identity_add_does_not_import_the_draft_stage(
    enrolled: tuple[Path, tuple[int, list[str], str]],
) -> None:
    code, loaded, output = enrolled[1]
    assert code == 0 and "enrolled anna from 1 photo" in output, output
    assert [m for m in loaded if m in DRAFT_STAGE] == []


def test_refine_does_not_import_the_draft_stage(tiny_kit: Path, root: Path) -> None:
    master = root / "master.png"
    write_image(master, cv2.resize(data.coffee()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    no_upscaler = ["--set", "refine.upscale='off'"]  # keeps the test fast: basicsr/torch take ~15 s to import
    code, loaded, output = _run(
        "refine", str(master), "--identity", "anna", *_settings(tiny_kit, root), *no_upscaler
    )
    assert code == 0 and "1 face found" in output, output
    assert [m for m in loaded if m in DRAFT_STAGE] == []
