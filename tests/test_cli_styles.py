"""`studio styles list/show` and the shipped presets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from studio.errors import InputError
from studio.styles import list_styles, load_style

EXPECTED = {
    "studio-headshot",
    "editorial",
    "film-noir",
    "watercolor",
    "anime-cel",
    "cyberpunk-concept",
    "fantasy-character-sheet",
    "corporate-ad",
    "vintage-film",
    "3d-render",
}


def test_ten_presets_ship_and_validate() -> None:
    presets = {p.name: p for p in list_styles()}
    assert set(presets) >= EXPECTED
    for preset in presets.values():
        assert "{prompt}" in preset.prompt and preset.negative
        assert preset.width % 8 == 0 and preset.height % 8 == 0 and 10 <= preset.steps <= 60


def test_unknown_style_lists_known_ones() -> None:
    with pytest.raises(InputError, match="known styles: 3d-render, anime-cel"):
        load_style("nope")
    with pytest.raises(InputError, match="Unknown style"):
        load_style("../configs/default")


def test_styles_cli() -> None:
    env = {**os.environ, "COLUMNS": "220"}
    run = [sys.executable, "-c", "from studio.cli import main; main()", "styles"]
    listed = subprocess.run([*run, "list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and all(name in listed.stdout for name in EXPECTED)
    shown = subprocess.run([*run, "show", "film-noir"], capture_output=True, text=True, env=env, timeout=120)
    assert "venetian blind" in shown.stdout and "DPM++ 2M Karras" in shown.stdout
    missing = subprocess.run([*run, "show", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 3 and "Unknown style 'nope'" in missing.stderr
