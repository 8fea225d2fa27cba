"""`studio identity ...`, `studio template ...` and `studio refine` as a user runs them (tiny profile)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from skimage import data

from studio.cli import main
from studio.imageio import read_metadata, write_image

STUDIO = [sys.executable, "-c", "from studio.cli import main; main()"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "220"}
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300, env=env)


def test_enrol_refine_revoke(tiny_overrides: list[str], tmp_path: Path) -> None:
    sets = [
        a
        for item in [*tiny_overrides, f"refine.identities_dir={str(tmp_path / 'ids')!r}"]
        for a in ("--set", item)
    ]
    photo, master = tmp_path / "anna.png", tmp_path / "master.png"
    write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    write_image(master, cv2.resize(data.coffee()[:, :, ::-1], (384, 384)))  # RGB -> BGR
    added = _run(
        "identity",
        "add",
        "anna",
        str(photo),
        "--consent",
        "release #123, 2026-11-01",
        "--profile",
        "tiny",
        *sets,
    )
    assert added.returncode == 0, added.stderr
    assert "enrolled anna from 1 photo" in added.stdout and (tmp_path / "ids" / "anna.safetensors").is_file()
    listed = _run("identity", "list", "--profile", "tiny", *sets)
    assert "release #123, 2026-11-01" in listed.stdout and "active" in listed.stdout
    refined = _run("refine", str(master), "--identity", "anna", "--profile", "tiny", *sets)
    assert refined.returncode == 0, refined.stderr
    assert "master.png: 1 face found" in refined.stdout and "similarity" in refined.stdout
    out = next((tmp_path / "out").glob("*-master-anna.png"))  # <run id>-<source>-<cast>.png
    assert read_metadata(out).recipe["refine"]["status"] == "ok"
    few = _run("refine", str(master), "--identity", "0=anna,1=anna", "--profile", "tiny", *sets)
    assert few.returncode == 7 and "Traceback" not in few.stderr
    assert "refine changed nothing: master.png: 1 face found, mapping needs 2" in few.stderr
    assert not list((tmp_path / "out").glob("*-master-0-anna+1-anna*.png"))  # no unchanged copy
    assert _run("identity", "revoke", "anna", "--profile", "tiny", *sets).returncode == 0
    refused = _run("refine", str(master), "--identity", "anna", "--profile", "tiny", *sets)
    assert refused.returncode == 3 and "revoked" in refused.stderr and "Traceback" not in refused.stderr
    bad = _run("identity", "add", "../evil", str(photo), "--consent", "x", "--profile", "tiny", *sets)
    assert bad.returncode == 3 and "name" in bad.stderr


def test_template_commands(tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`studio template add/list/show/remove` and `refine --template --cast`, in process (each subprocess
    would add seconds of imports); errors still go through ``main``: one line, an exit code, no traceback."""
    private = [
        f"refine.identities_dir={str(tmp_path / 'ids')!r}",
        f"refine.templates_dir={str(tmp_path / 'tpl')!r}",
    ]
    sets = ["--profile", "tiny", *(a for item in [*tiny_overrides, *private] for a in ("--set", item))]
    master = tmp_path / "master.png"
    write_image(master, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR

    def studio(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["studio", *args, *sets])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        return exited.value.code, captured.out, captured.err

    code, out, err = studio("template", "add", "solo", str(master))
    assert code == 0, err
    assert "added template solo with 1 slot(s)" in out and "slot 0: box " in out
    code, out, _ = studio("template", "list")
    assert code == 0 and "solo" in out and "256x256" in out
    code, out, _ = studio("template", "show", "solo")
    assert code == 0 and "solo.master.png" in out and "slot 0: box " in out
    code, _, err = studio("template", "add", "solo", str(master))
    assert code == 3 and "already exists" in err and "--replace" in err and "Traceback" not in err
    assert studio("identity", "add", "anna", str(master), "--consent", "release #1")[0] == 0
    code, out, err = studio("refine", "--template", "solo", "--cast", "0=anna")  # no image: the master
    assert code == 0, err
    assert "solo.master.png: 1 face found, template 'solo': slot 0 = face 0 -> anna" in out
    code, _, err = studio("refine", "--template", "solo", "--cast", "0=anna,1=anna")
    assert code == 3 and "Template 'solo' has 1 slot but the cast maps 2: 0=anna,1=anna." in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, _ = studio("template", "remove", "solo")
    assert code == 0 and "removed solo" in out
    code, _, err = studio("template", "show", "solo")
    assert code == 3 and "No template 'solo'" in err and len(err.strip().splitlines()) == 1
