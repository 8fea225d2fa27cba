"""The web studio over HTTP: what it serves and refuses, auth, uploads, the campaign API, a fuzzed schema."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from studio.errors import ConfigError, InputError
from studio.request import GenerateRequest
from studio.web.app import serving
from studio.web.security import Credentials, check_bind, credentials, served_folder
from studio.web.service import WebStudio
from tests.web.conftest import FOUR_ITEMS, face_photo, make_service


@pytest.fixture(scope="module")
def service(tiny_kit: Path, work: Path) -> WebStudio:
    service = make_service(tiny_kit, work, "web.max_upload_mb=1")
    service.enrol("anna", [face_photo(work / "anna.png")], _terms())
    return service


@pytest.fixture(scope="module")
def url(service: WebStudio) -> Iterator[str]:
    with serving(service) as url:
        yield url


@pytest.fixture(scope="module")
def output(service: WebStudio) -> Path:
    return service.generate(GenerateRequest("a lighthouse keeper", steps=2)).outputs[0]


def _terms():
    from studio.faces.consent import ConsentTerms

    return ConsentTerms("release #1, 2026-11-01")


# --- what is served --------------------------------------------------------------------------------


def test_file_route_serves_outputs_and_refuses_everything_else(
    url: str, service: WebStudio, output: Path
) -> None:
    identity_file = service.studio.identities.path_for("anna")
    audit_log = Path(service.config.audit.log)
    assert identity_file.is_file() and audit_log.is_file()
    served = httpx.get(f"{url}gradio_api/file={output}")
    assert served.status_code == 200 and served.content == output.read_bytes()  # the control
    for path in ("/etc/passwd", identity_file, audit_log, f"{service.outputs}/../ids/anna.identity"):
        refused = httpx.get(f"{url}gradio_api/file={path}")
        assert refused.status_code == 403, path
        assert b"anna" not in refused.content or b"not allowed" in refused.content


def test_api_lists_identities_without_their_embeddings(url: str) -> None:
    [anna] = httpx.get(f"{url}api/identities").json()
    assert anna["name"] == "anna" and anna["consent"] == "release #1, 2026-11-01"
    assert set(anna) == {"name", "consent", "scope", "expires", "granted_by", "created", "revoked", "photos"}


def test_an_output_folder_holding_a_private_folder_is_refused(tiny_kit: Path, tmp_path: Path) -> None:
    from studio.config import load_config

    config = load_config("tiny", overrides=[f"output_dir={str(tmp_path)!r}",
                                            f"refine.identities_dir={str(tmp_path / 'ids')!r}"])  # fmt: skip
    with pytest.raises(ConfigError, match="overlap"):
        served_folder(config)


# --- uploads ---------------------------------------------------------------------------------------


def test_an_upload_that_is_not_an_allowed_image_is_refused_with_a_message(url: str, work: Path) -> None:
    fake = work / "master.png"
    fake.write_text("#!/bin/sh\necho not an image\n")
    gif = work / "anim.gif"
    Image.new("RGB", (32, 32)).save(gif)
    disguised = work / "disguised.png"  # a GIF under an allowed name
    disguised.write_bytes(gif.read_bytes())
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False)
    for path, words in ((fake, "master.png"), (gif, "Invalid file type"), (disguised, "GIF")):
        with pytest.raises(AppError) as caught:
            client.predict(handle_file(str(path)), api_name="/find_faces")
        assert words in str(caught.value) and "Traceback" not in str(caught.value)
    # the same check on the API's campaign upload
    manifest = work / "m.toml"
    manifest.write_text(FOUR_ITEMS.format(name="upload-check"))
    sent = httpx.post(f"{url}api/campaigns", files=[("manifest", manifest.open("rb")),
                                                   ("files", ("master.png", fake.read_bytes()))])  # fmt: skip
    assert sent.status_code == 400 and "master.png" in sent.json()["error"]


def test_uploads_over_the_size_limit_are_refused(url: str, work: Path) -> None:
    big = os.urandom(1024 * 1024 + 10)  # web.max_upload_mb = 1 on this server
    api = httpx.post(f"{url}api/campaigns", files=[("manifest", ("m.toml", big))])
    assert api.status_code == 413 and "1 MB" in api.json()["error"]
    ui = httpx.post(f"{url}gradio_api/upload", files=[("files", ("big.png", big))])
    assert ui.status_code == 413


# --- auth and binding ------------------------------------------------------------------------------


def test_with_auth_requests_without_credentials_get_401(service: WebStudio, output: Path) -> None:
    auth = Credentials((("anna", "s3cret:x"),))
    with serving(service, auth) as url:
        assert httpx.get(f"{url}api/models").status_code == 401
        assert httpx.get(f"{url}api/models", auth=("anna", "wrong")).status_code == 401
        assert httpx.get(f"{url}api/models", auth=("anna", "s3cret:x")).status_code == 200
        assert httpx.get(f"{url}gradio_api/file={output}").status_code == 401
        assert httpx.get(f"{url}config").status_code == 401
        with httpx.Client(base_url=url) as browser:
            assert browser.post("login", data={"username": "anna", "password": "wrong"}).status_code == 400
            assert browser.post("login", data={"username": "anna", "password": "s3cret:x"}).status_code == 200
            assert browser.get(f"gradio_api/file={output}").status_code == 200


def test_a_non_loopback_address_without_auth_refuses_to_start() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "studio.example.com"):
        with pytest.raises(ConfigError, match="without authentication"):
            check_bind(host, None)
        check_bind(host, Credentials((("a", "b"),)))
    command = [sys.executable, "-c", "from studio.cli import main; main()", "web", "--host", "0.0.0.0"]
    done = subprocess.run([*command, "--profile", "tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        "Refusing to serve on 0.0.0.0 without authentication" in done.stderr
        and "Traceback" not in done.stderr
    )


def test_auth_options_are_checked(tmp_path: Path) -> None:
    assert credentials("anna:pa:ss", None) == Credentials((("anna", "pa:ss"),))
    with pytest.raises(InputError, match="USER:PASS"):
        credentials("anna", None)
    loose = tmp_path / "users"
    loose.write_text("# studio users\nanna:one\nkenji:two\n")
    loose.chmod(0o644)
    with pytest.raises(InputError, match="chmod 600"):
        credentials(None, loose)
    loose.chmod(0o600)
    both = credentials("ops:three", loose)
    assert both is not None and both.check("kenji", "two") and not both.check("kenji", "one")


# --- the campaign API ------------------------------------------------------------------------------


def test_api_submits_a_campaign_polls_it_and_fetches_outputs_with_recipes(url: str, work: Path) -> None:
    manifest = work / "four.toml"
    manifest.write_text(FOUR_ITEMS.format(name="api-four"))
    sent = httpx.post(f"{url}api/campaigns", files=[("manifest", manifest.open("rb"))])
    assert sent.status_code == 202, sent.text
    body = sent.json()
    assert (body["campaign"], body["items"], body["drafts"]) == ("api-four", 4, 4)
    deadline = time.monotonic() + 240
    while (status := httpx.get(body["status_url"]).json())["running"] or status["counts"]["done"] < 4:
        assert time.monotonic() < deadline and status["error"] is None, status
        time.sleep(0.5)
    assert status["counts"]["done"] == 4
    items = httpx.get(f"{url}api/campaigns/api-four/items", params={"state": "done"}).json()
    assert len(items) == 4 and {tuple(i["axes"].items()) for i in items} == {
        (("look", look), ("seed", seed)) for look in ("calm", "bold") for seed in ("1", "2")
    }
    for item in items:
        png = httpx.get(item["image_url"])
        assert png.headers["content-type"] == "image/png"
        Image.open(io.BytesIO(png.content)).verify()
        recipe = httpx.get(item["recipe_url"]).json()
        assert recipe["id"] == item["id"]  # an item is keyed by its output's recipe
    again = httpx.post(f"{url}api/campaigns", files=[("manifest", manifest.open("rb"))]).json()
    assert again["new_items"] == 0  # a resubmission adds nothing
    assert httpx.get(f"{url}api/campaigns/nope").status_code == 404
    assert httpx.get(f"{url}api/campaigns/api-four/items/ffff/image").status_code == 404
    bad_state = httpx.get(f"{url}api/campaigns/api-four/items", params={"state": "half"})
    assert bad_state.status_code == 400 and "pending" in bad_state.json()["error"]
    listed = {c["campaign"]: c for c in httpx.get(f"{url}api/campaigns").json()}
    assert listed["api-four"]["counts"]["done"] == 4
    schema = httpx.get(f"{url}api/openapi.json").json()
    assert {"/campaigns", "/campaigns/{name}", "/campaigns/{name}/items"} <= set(schema["paths"])
    assert json.dumps(schema)  # a valid JSON document


# --- the schema, fuzzed ----------------------------------------------------------------------------


def test_the_api_schema_fuzzed_gives_no_server_error(service: WebStudio) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from studio.web.api import build_api

    schema = schemathesis.openapi.from_asgi("/openapi.json", build_api(service, None))
    failures: list[str] = []
    calls: list[str] = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call()
            calls.append(f"{case.method} {case.path}")
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
                )

        fuzz()
    assert not failures, failures[:3]
    assert {"POST /campaigns", "GET /campaigns/{name}/items", "GET /identities"} <= set(calls)


# --- one queue slot per accelerator ------------------------------------------------------------------


def test_jobs_queue_on_one_slot_per_accelerator(service: WebStudio, monkeypatch: pytest.MonkeyPatch) -> None:
    from studio.web.ui import ACCELERATOR, build_ui

    assert service.slots == 1  # a CPU-only machine: one slot
    events = {fn.name: fn for fn in build_ui(service).fns.values()}
    for name in ("run_generate", "run_reface", "find_faces", "enrol", "reproduce"):
        assert (events[name].concurrency_id, events[name].concurrency_limit) == (ACCELERATOR, 1), name
    active, peak, lock = [0], [0], threading.Lock()

    def render(*_: object, **__: object) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1

    monkeypatch.setattr(service.studio, "generate", render)
    users = [threading.Thread(target=service.generate, args=(GenerateRequest("x"),)) for _ in range(3)]
    for user in users:
        user.start()
    for user in users:
        user.join()
    assert peak[0] == 1  # three users, one at a time on the accelerator
