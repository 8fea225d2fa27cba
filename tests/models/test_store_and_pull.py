"""Finding models (own folder, ComfyUI/A1111 installs), verifying them, and pulling them over HTTP.

The HTTP server runs on 127.0.0.1 in a thread; it honours Range requests and can cut a transfer short.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from studio.config import ModelsConfig
from studio.errors import ChecksumError, DownloadError, ModelNotFoundError
from studio.models.catalogue import ModelEntry, ModelSource
from studio.models.pull import pull, source_url
from studio.models.store import check, locate, own_path, require

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, known content


@dataclass
class Server:
    """Files by URL path; ``cut`` makes the next N responses stop half way."""

    files: dict[str, bytes]
    cut: int = 0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(files={})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            chunk = body[start:]
            if state.cut:
                state.cut -= 1
                chunk = chunk[: len(chunk) // 2]
            self.wfile.write(chunk)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def _entry(source: ModelSource, data: bytes = PAYLOAD, kind: str = "upscaler") -> ModelEntry:
    return ModelEntry(
        name="esrgan",
        kind=kind,
        filename="RealESRGAN_x2plus.pth",
        source=source,  # type: ignore[arg-type]
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        licence="BSD-3-Clause",
        commercial=True,
    )


def _models(tmp_path: Path, *search: Path) -> ModelsConfig:
    return ModelsConfig(dir=tmp_path / "models", search_paths=tuple(search))


def test_pull_good_file_lands_verified_and_atomically(tmp_path: Path, server: Server) -> None:
    server.files["/m/x.pth"] = PAYLOAD
    entry, models = _entry(ModelSource(url=server.url + "/m/x.pth")), _models(tmp_path)
    seen: list[int] = []
    path = pull(entry, models, progress=lambda done, total: seen.append(done))
    assert path == own_path(entry, models) and path.read_bytes() == PAYLOAD
    assert seen[-1] == len(PAYLOAD)
    assert check(entry, models).status == "present"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .part left
    pull(entry, models)  # already present: no second request
    assert len(server.requests) == 1


def test_pull_wrong_checksum_discards_the_file(tmp_path: Path, server: Server) -> None:
    server.files["/m/x.pth"] = PAYLOAD[::-1]
    entry, models = _entry(ModelSource(url=server.url + "/m/x.pth")), _models(tmp_path)
    with pytest.raises(ChecksumError, match="catalogue expects") as info:
        pull(entry, models)
    assert "discarded" in str(info.value)
    assert not own_path(entry, models).exists()
    assert not list(own_path(entry, models).parent.iterdir())


def test_pull_resumes_an_interrupted_transfer_with_range(tmp_path: Path, server: Server) -> None:
    server.files["/m/x.pth"] = PAYLOAD
    server.cut = 1
    entry, models = _entry(ModelSource(url=server.url + "/m/x.pth")), _models(tmp_path)
    path = pull(entry, models)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0][1] is None
    assert server.requests[1][1] == f"bytes={len(PAYLOAD) // 2}-"


def test_pull_resumes_a_part_file_left_by_an_earlier_run(tmp_path: Path, server: Server) -> None:
    server.files["/m/x.pth"] = PAYLOAD
    server.cut = 5  # every attempt of the first run is cut
    entry, models = _entry(ModelSource(url=server.url + "/m/x.pth")), _models(tmp_path)
    with pytest.raises(DownloadError, match="stopped at"):
        pull(entry, models, attempts=1)
    part = own_path(entry, models).with_name("RealESRGAN_x2plus.pth.part")
    assert part.stat().st_size == len(PAYLOAD) // 2 and not own_path(entry, models).exists()
    server.cut = 0
    assert pull(entry, models).read_bytes() == PAYLOAD
    assert server.requests[-1][1] == f"bytes={len(PAYLOAD) // 2}-"


def test_pull_from_hugging_face_source_uses_hf_endpoint(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server.files["/org/repo/resolve/main/sub/x.pth"] = PAYLOAD
    entry = _entry(ModelSource(hf_repo="org/repo", hf_file="sub/x.pth"))
    assert source_url(entry) == server.url + "/org/repo/resolve/main/sub/x.pth"
    assert pull(entry, _models(tmp_path)).read_bytes() == PAYLOAD


def test_pull_http_error_and_offline_mode(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, models = _entry(ModelSource(url=server.url + "/missing")), _models(tmp_path)
    with pytest.raises(DownloadError, match="HTTP 404"):
        pull(entry, models)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        pull(_entry(ModelSource(hf_repo="org/repo", hf_file="x.pth")), models)
    assert not server.requests[1:]


@pytest.mark.parametrize("layout", ["models/upscale_models", "models/ESRGAN", "."])
def test_existing_comfyui_or_a1111_install_is_found(tmp_path: Path, layout: str) -> None:
    install = tmp_path / "ComfyUI"
    (install / layout).mkdir(parents=True)
    (install / layout / "RealESRGAN_x2plus.pth").write_bytes(PAYLOAD)
    entry, models = _entry(ModelSource(url="http://127.0.0.1:9/x")), _models(tmp_path, install)
    assert locate(entry, models) == install / layout / "RealESRGAN_x2plus.pth"
    assert check(entry, models).status == "present"


def test_missing_model_error_names_model_places_and_pull_command(tmp_path: Path) -> None:
    entry, models = _entry(ModelSource(url="http://127.0.0.1:9/x")), _models(tmp_path, tmp_path / "A1111")
    with pytest.raises(ModelNotFoundError) as info:
        require(entry, models)
    text = str(info.value)
    assert "'esrgan'" in text and "studio models pull esrgan" in text
    assert str(tmp_path / "models" / "upscaler") in text and "A1111" in text


def test_corrupt_file_is_reported_and_rechecked(tmp_path: Path) -> None:
    entry, models = _entry(ModelSource(url="http://127.0.0.1:9/x")), _models(tmp_path)
    path = own_path(entry, models)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD[:-1] + b"\0")  # same size, different content
    assert check(entry, models).status == "corrupt"
    path.write_bytes(PAYLOAD[:10])
    assert check(entry, models).status == "corrupt"
    path.write_bytes(PAYLOAD)
    assert check(entry, models, recheck=True).status == "present"
    assert check(replace(entry, sha256="0" * 64), models).status == "corrupt"


def test_every_model_kind_has_its_search_folders(tmp_path: Path) -> None:
    from typing import get_args

    from studio.models.store import KIND_FOLDERS
    from studio.types import ModelKind

    assert set(KIND_FOLDERS) == set(get_args(ModelKind))
    # a FaceFusion install's model folder is searched for its enhancer
    root = tmp_path / "facefusion"
    (root / ".assets" / "models").mkdir(parents=True)
    (root / ".assets" / "models" / "gfpgan_1.4.onnx").write_bytes(b"x")
    entry = ModelEntry(
        name="gfpgan_1_4", kind="enhancer", description="", filename="gfpgan_1.4.onnx",
        source=ModelSource(url="https://example.invalid/gfpgan_1.4.onnx"), sha256="0" * 64, size=1,
        licence="Apache-2.0", commercial=False,
    )  # fmt: skip
    found = locate(entry, ModelsConfig(dir=tmp_path / "own", search_paths=(root,)))
    assert found == root / ".assets" / "models" / "gfpgan_1.4.onnx"
