"""The README's Python example runs as written (a fresh process, the tiny profile, a private home)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_notebook_example_returns_pil_images(tmp_path: Path) -> None:
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(block.strip().splitlines()) <= 5  # a five-line notebook example
    check = "\nassert len(images) == 2 and all(type(i).__name__ == 'Image' for i in images), images\n"
    check += "assert drafts[0].recipe.request['variables'] == {'age': '70'}\nprint('OK', images[0].size)\n"
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}  # the tiny kit builds in this home
    proc = subprocess.run(
        [sys.executable, "-c", block + check],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK (64, 64)"
    assert not list(tmp_path.glob("outputs/*.png"))  # in memory: nothing written
