"""The wheel works outside the checkout: configs/, prompts/ and the offline base configs ship inside it.

Builds the sdist and, from it, the wheel (``uv build``), installs the wheel into a fresh venv in a temp
folder and runs its ``studio`` command there, with the working folder and HOME outside the checkout.
The third-party dependencies (torch & co.) are not installed again: a .pth file in the new venv exposes
this environment's site-packages, which holds them but not the studio itself (it is an editable install,
whose finder that .pth does not load), so ``studio`` is imported from the wheel; the test checks that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.test_cli_styles import EXPECTED

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("configs", "prompts")  # top-level folders that ship as studio/_data/<name>/
WHERE = (
    "import json, studio, studio.config as c, studio.styles as s;"
    "print(json.dumps([studio.__file__, str(c.config_dir()), str(s.styles_dir()), str(c.project_dir())]))"
)


def _uv() -> list[str]:
    """The uv command: on PATH, or a module of this or the system python (``make setup`` installs it)."""
    if shutil.which("uv"):
        return ["uv"]
    for python in filter(None, (sys.executable, shutil.which("python3"))):
        if subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "uv"]
    pytest.skip("uv is not installed (`make setup` installs it)")


def _build_wheel(out: Path) -> Path:
    """The sdist, then the wheel built from it, in ``out``; returns the wheel."""
    command = [*_uv(), "build", "--out-dir", str(out), str(ROOT)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = out.glob("portrait_studio-*.whl")
    return wheel


def _fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new venv in ``folder`` holding the wheel; returns its bin/ folder."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    install = [*_uv(), "pip", "install", "--offline", "--no-deps", "--python", str(python), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    query = [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    site = Path(subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_studio_test_deps.pth").write_text("".join(f"{p}\n" for p in ours), encoding="utf-8")
    return folder / "bin"


def _run(command: Path, *args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``command args`` with the working folder and HOME in ``home`` (outside the checkout)."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "STUDIO_CONFIG_DIR"}
    base = {k: v for k, v in os.environ.items() if k not in drop}
    env = {**base, "HOME": str(home), "COLUMNS": "220", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([command, *args], capture_output=True, text=True, cwd=home, env=env, timeout=300)


def test_wheel_runs_outside_the_checkout(tiny_kit: Path, tmp_path: Path) -> None:
    # 1. the wheel carries every file of configs/ and prompts/ (the base configs included)
    wheel = _build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in SHIPPED:
        files = [p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()]
        assert files and not [f for f in files if f"studio/_data/{f}" not in names], folder
    assert "studio/_data/configs/base/sdxl/unet/config.json" in names
    # 2. installed in a fresh venv outside the checkout, the studio finds them in its own package
    venv_dir, home = tmp_path / "venv", tmp_path / "home"
    bin_dir = _fresh_venv(venv_dir, wheel)
    home.mkdir()
    where = _run(bin_dir / "python", "-c", WHERE, home=home)
    assert where.returncode == 0, where.stderr
    module, configs, prompts, project = map(Path, json.loads(where.stdout))
    assert module.is_relative_to(venv_dir) and not module.is_relative_to(ROOT)
    assert configs.is_relative_to(venv_dir) and prompts.is_relative_to(venv_dir) and project == Path("None")
    # 3. a user's own config folder still wins
    mine = _run(bin_dir / "python", "-c", WHERE, home=home, STUDIO_CONFIG_DIR=str(home / "my-configs"))
    assert json.loads(mine.stdout)[1] == str(home / "my-configs")
    # 4. the installed command: a tiny generate and the style presets
    out = tmp_path / "out"
    sets = {"models.tiny_kit": tiny_kit, "models.dir": home / "models", "output_dir": out}
    args = ["generate", "a lighthouse keeper", "--profile", "tiny", "--seed", "3"]
    args += [a for key, value in sets.items() for a in ("--set", f"{key}={str(value)!r}")]
    run = _run(bin_dir / "studio", *args, home=home)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "NOT portraits" in run.stdout and len(list(out.glob("*-3.png"))) == 1
    styles = _run(bin_dir / "studio", "styles", "list", home=home)
    assert styles.returncode == 0 and all(name in styles.stdout for name in EXPECTED), styles.stderr
