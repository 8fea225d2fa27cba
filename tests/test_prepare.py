"""Request → draft request: precedence (flags > --set > style > profile) and the tiny profile's caps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from studio.cli import common
from studio.config import load_config
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.prepare import build_draft_request
from studio.request import GenerateRequest

STYLE = "fantasy-character-sheet"  # 512x768, 30 steps, cfg 7, DPM++ 2M Karras


def _draft(tiny_overrides: list[str], *extra: str, **request: object):
    config = load_config("tiny", overrides=[*tiny_overrides, *extra])
    draft, _ = build_draft_request(
        GenerateRequest("elf ranger", style=STYLE, **request), open_catalogue(config), config, ModelCache()
    )
    return draft


def test_the_tiny_profile_caps_what_a_style_asks_for(tiny_overrides: list[str]) -> None:
    draft = _draft(tiny_overrides)
    assert (draft.width, draft.height, draft.steps) == (64, 64, 4)  # not 512x768 at 30 steps
    assert draft.prompt.startswith("fantasy character concept sheet of elf ranger")  # the style still applies


def test_set_beats_the_style_and_flags_beat_set(tiny_overrides: list[str]) -> None:
    by_set = _draft(tiny_overrides, "draft.width=128", "draft.steps=6", "draft.sampler=Euler")
    assert (by_set.width, by_set.height, by_set.steps, by_set.sampler) == (128, 64, 6, "Euler")
    by_flag = _draft(tiny_overrides, "draft.width=128", "draft.steps=6", width=96, steps=3)
    assert (by_flag.width, by_flag.steps) == (96, 3)
    default = load_config("default", overrides=["draft.steps=12"])
    assert default.explicit_keys == ("draft.steps",) and not default.draft.cap_styles


def test_a_style_is_not_capped_outside_the_tiny_profile(tiny_overrides: list[str]) -> None:
    draft = _draft(tiny_overrides, "draft.cap_styles=false")
    assert (draft.width, draft.height, draft.steps) == (512, 768, 30)


def test_the_progress_bar_shows_steps_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=screen, force_terminal=True, width=80))
    with common.step_progress() as update:
        assert update is not None
        update(3, 8)
    assert "drafting" in screen.getvalue() and "3/8" in screen.getvalue()
    monkeypatch.setattr(common, "err_console", Console(file=io.StringIO(), force_terminal=False))
    with common.step_progress() as update:
        assert update is None  # a pipe or a log: no bar
