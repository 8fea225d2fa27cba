"""The web studio in a real browser: Debian's Chromium driven by Playwright, on the tiny profile.

Each test saves a screenshot under its tmp dir (``screenshot.png``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from studio.imageio import read_metadata
from studio.web.app import serving
from studio.web.service import WebStudio
from tests.web.conftest import FOUR_ITEMS, face_photo, make_service

TIMEOUT_MS = 180_000  # a tiny render is seconds; a campaign starts a worker process


def wait_text(page: Any, selector: str, text: str, prop: str = "innerText") -> None:
    """Wait until the element (rendered or not yet: Gradio renders a tab when it is opened) shows ``text``."""
    page.wait_for_function(
        "([s, t, p]) => ((document.querySelector(s) || {})[p] || '').includes(t)", arg=[selector, text, prop]
    )


@pytest.fixture(scope="module")
def service(tiny_kit: Path, work: Path) -> WebStudio:
    return make_service(tiny_kit, work)


@pytest.fixture(scope="module")
def url(service: WebStudio) -> Iterator[str]:
    with serving(service) as url:
        yield url


@pytest.fixture
def page(browser: Any, url: str, tmp_path: Path) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#gen-prompt textarea")
    yield page
    page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
    page.close()


def test_generate_two_images_and_see_them_with_their_parameters(page: Any, service: WebStudio) -> None:
    page.fill("#gen-prompt textarea", "a lighthouse keeper, {age} years old")
    page.fill("#gen-vars textarea", "age=70")
    page.fill("#gen-count input", "2")
    page.fill("#gen-seed input", "7")
    page.fill("#gen-steps textarea", "3")
    page.click("#gen-run")
    page.wait_for_function("document.querySelectorAll('#gen-gallery .thumbnail-item img').length == 2")
    status = page.inner_text("#gen-status")
    assert "wrote" in status and "tiny profile" in status
    written = re.findall(r"wrote (\S+\.png)", status)
    assert len(written) == 2 and all((service.outputs / name).is_file() for name in written)
    page.locator("#gen-gallery .thumbnail-item").nth(1).click()
    wait_text(page, "#gen-params textarea", "Seed: 8", "value")
    params = page.input_value("#gen-params textarea")
    assert params.startswith("a lighthouse keeper, 70 years old")
    assert "Steps: 3" in params and "Seed: 8" in params and "Model: tiny-sd15" in params

    page.click("#gen-reproduce")  # the same recipe again: the same pixels
    wait_text(page, "#gen-status", "reproduced")
    assert "identical pixels" in page.inner_text("#gen-status")
    page.click("#gen-to-reface")  # the selected output becomes the re-face master, its faces numbered
    wait_text(page, "#rf-faces", "face(s) found")
    assert page.get_by_role("tab", name="Re-face").get_attribute("aria-selected") == "true"


def test_models_tab_lists_the_catalogue_with_status_and_licence(page: Any) -> None:
    page.get_by_role("tab", name="Models").click()
    page.wait_for_selector("#models-table")
    table = page.inner_text("#models-table")
    assert re.search(r"tiny-sd15\s+sd15\s+present", table) and "CreativeML OpenRAIL-M" in table
    assert re.search(r"inswapper_128\s+\S+\s+missing", table)


def test_enrol_with_consent_then_reface_an_uploaded_image(page: Any, work: Path) -> None:
    page.get_by_role("tab", name="Identities").click()
    page.fill("#id-name textarea", "kenji")
    page.set_input_files("#id-photos input[type=file]", str(face_photo(work / "kenji.png")))
    page.wait_for_selector("#id-photos .file-preview")
    page.click("#id-enrol")  # no consent record yet: refused, and nothing enrolled
    page.wait_for_selector(".toast-body", state="visible")
    assert "consent" in page.inner_text(".toast-body").lower()
    page.fill("#id-consent textarea", "model release #7, 2026-11-01")
    page.fill("#id-scope textarea", "internal,ads")
    page.click("#id-enrol")
    wait_text(page, "#id-status", "enrolled kenji")
    assert "kenji" in page.inner_text("#id-table")

    page.get_by_role("tab", name="Re-face").click()
    page.set_input_files("#rf-master input[type=file]", str(face_photo(work / "master.png", 192)))
    wait_text(page, "#rf-faces", "face(s) found")
    assert "face 0" in page.inner_text("#rf-faces")
    assert page.input_value("#rf-cast textarea") == "0=kenji"
    page.get_by_label("enhance").check()  # the face enhancer after the swap, pasted with Poisson blending
    page.get_by_label("poisson").check()
    page.click("#rf-run")
    wait_text(page, "#rf-status", "similarity")
    status = page.inner_text("#rf-status")
    assert re.search(r"face 0 similarity -?\d\.\d{3}", status) and "wrote" in status
    (name,) = re.findall(r"wrote (\S+\.png)", status)
    (written,) = work.rglob(name)
    request = read_metadata(written).recipe["request"]
    assert request["processors"] == ["swap", "enhance"] and request["blend"] == "poisson"
    page.wait_for_selector("#rf-result img")
    page.wait_for_selector("#rf-original img")


def test_a_four_item_campaign_runs_to_done_in_the_browser(page: Any, work: Path) -> None:
    manifest = work / "browser-four.toml"
    manifest.write_text(FOUR_ITEMS.format(name="browser-four"))
    page.get_by_role("tab", name="Campaigns").click()
    page.set_input_files("#cp-upload input[type=file]", str(manifest))
    wait_text(page, "#cp-plan", "browser-four")
    page.click("#cp-plan-button")
    wait_text(page, "#cp-plan", "4 items")
    assert "4 drafts to render" in page.inner_text("#cp-plan")
    page.click("#cp-run")
    page.wait_for_function(
        "(() => { const t = (document.querySelector('#cp-counts') || {}).innerText || '';"
        " return t.startsWith('idle') && t.includes('done 4'); })()"
    )
    page.wait_for_function("document.querySelectorAll('#cp-gallery .thumbnail-item img').length == 4")
    page.locator("#cp-gallery .thumbnail-item").first.click()
    wait_text(page, "#cp-detail", "attempt 1")
    page.click("#cp-favourite")
    wait_text(page, "#cp-detail", "marked")
