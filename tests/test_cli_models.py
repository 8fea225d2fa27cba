"""`studio models pull / verify / make-tiny` as a user runs them (subprocesses, a server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

STUDIO = [sys.executable, "-c", "from studio.cli import main; main()"]
DATA = os.urandom(3 << 20)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "220"}
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300, env=env)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "good.pth").write_bytes(DATA)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _catalogue(tmp_path: Path, url: str, sha: str) -> list[str]:
    path = tmp_path / "extra.toml"
    path.write_text(
        f'[up]\nkind = "upscaler"\nfilename = "up.pth"\nsource = {{ url = "{url}" }}\nsha256 = "{sha}"\n'
        f'size = {len(DATA)}\nlicence = "BSD-3-Clause"\ncommercial = true\n'
    )
    return [
        "--set",
        f"models.catalogues=[{str(path)!r}]",
        "--set",
        f"models.dir={str(tmp_path / 'models')!r}",
    ]


def test_pull_then_verify_then_corrupt(tmp_path: Path, served: str) -> None:
    sets = _catalogue(tmp_path, served + "/good.pth", hashlib.sha256(DATA).hexdigest())
    proc = _run("models", "pull", "up", *sets)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "models" / "upscaler" / "up.pth"
    assert target.read_bytes() == DATA and "up:" in proc.stdout
    proc = _run("models", "verify", *sets)
    assert proc.returncode == 0 and "up: present" in proc.stdout
    target.write_bytes(DATA[:-1] + b"!")
    proc = _run("models", "verify", *sets)
    assert proc.returncode == 4 and "up: corrupt" in proc.stdout and "studio models pull" in proc.stderr


def test_pull_with_wrong_checksum_fails_and_leaves_nothing(tmp_path: Path, served: str) -> None:
    proc = _run("models", "pull", "up", *_catalogue(tmp_path, served + "/good.pth", "0" * 64))
    assert proc.returncode == 4 and "discarded" in proc.stderr
    assert not list((tmp_path / "models").rglob("up.pth*"))


def test_pull_unknown_model_lists_choices(tmp_path: Path, served: str) -> None:
    proc = _run("models", "pull", "nope", *_catalogue(tmp_path, served + "/good.pth", "0" * 64))
    assert proc.returncode == 4 and "Unknown model 'nope'" in proc.stderr and "up" in proc.stderr


def test_make_tiny_builds_a_verified_kit(tmp_path: Path) -> None:
    proc = _run("models", "make-tiny", str(tmp_path / "kit"))
    assert proc.returncode == 0, proc.stderr
    assert "not portraits" in proc.stdout
    proc = _run(
        "models",
        "verify",
        "--profile",
        "tiny",
        "--set",
        f"models.tiny_kit={str(tmp_path / 'kit')!r}",
        "--set",
        f"models.dir={str(tmp_path / 'models')!r}",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": present") == 20
