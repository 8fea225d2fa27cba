"""A real web studio (uvicorn on a free loopback port, in this process: ``serving``) on the tiny profile."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from skimage import data

from studio.config import load_config
from studio.imageio import write_image
from studio.web.service import WebStudio
from tests.conftest import tiny_overrides_in

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def web_overrides(kit: Path, work: Path, *extra: str) -> list[str]:
    """The tiny profile with every folder of its own under ``work``."""
    return [
        *tiny_overrides_in(kit, work),
        f"refine.identities_dir={str(work / 'ids')!r}",
        f"web.manifests={str(work / 'manifests')!r}",
        *extra,
    ]


def make_service(kit: Path, work: Path, *extra: str) -> WebStudio:
    overrides = web_overrides(kit, work, *extra)
    return WebStudio(load_config("tiny", overrides=overrides), profile="tiny", overrides=overrides)


def face_photo(path: Path, size: int = 256) -> Path:
    """scikit-image's public-domain astronaut photo (the tiny detector's fixture face is found in it)."""
    write_image(path, cv2.resize(data.astronaut()[:, :, ::-1], (size, size)))
    return path


FOUR_ITEMS = """
[campaign]
name = "{name}"
max_rerolls = 0
seed = 1
seeds = 2
[defaults]
steps = 2
[axes]
look = ["calm", "bold"]
[[jobs]]
name = "portraits"
prompt = "a {{look}} lighthouse keeper"
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (its own browser download is never used)."""
    if CHROMIUM is None:
        if os.environ.get("STUDIO_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing: `make test` installs Debian's chromium package.")
        pytest.skip("Chromium is not installed (apt-get install chromium); `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run",
        ])  # fmt: skip
        yield browser
        browser.close()
