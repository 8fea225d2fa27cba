"""The output sink: names that cannot collide across processes, stale temp files, write failures."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studio import files
from studio.config import load_config
from studio.errors import OutputError
from studio.files import TEMP_MARK, atomic_writer
from studio.imageio import read_image, read_metadata
from studio.output import OutputSink
from studio.recipe import Recipe
from tests.conftest import private_overrides

WRITER = """
import sys
from pathlib import Path
import numpy as np
from studio.output import OutputSink
from studio.recipe import Recipe
folder, value, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sink = OutputSink(folder, run_id="shared-run")  # both processes claim the very same names
image = np.full((32, 32, 3), value, np.uint8)
recipe = Recipe(request={"writer": value}, config={}, models={})
for _ in range(count):
    sink.write(image, recipe, "42")
"""


def test_two_processes_writing_one_folder_lose_nothing(tmp_path: Path) -> None:
    count = 25
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(value), str(count)])
        for value in (60, 200)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    written = sorted(tmp_path.glob("shared-run-42*.png"))
    assert len(written) == 2 * count  # every image has its own file: none overwritten, none lost
    values = [int(read_image(p)[0, 0, 0]) for p in written]
    assert values.count(60) == count and values.count(200) == count
    for path in written:  # each file is whole, and its recipe is the writer's own
        writer = read_metadata(path).recipe["request"]["writer"]  # type: ignore[index]
        assert np.all(read_image(path) == writer)
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


def test_a_run_writes_its_config_and_request_first(tmp_path: Path) -> None:
    config = load_config("tiny", overrides=[f"output_dir={str(tmp_path)!r}", *private_overrides(tmp_path)])
    sink = OutputSink(tmp_path)
    config_file = sink.start(config, {"prompt": "a {kind} keeper", "variables": {"kind": "lighthouse"}})
    assert config_file.name == f"{sink.run_id}-config.toml" and "tiny-sd15" in config_file.read_text()
    request = tmp_path / f"{sink.run_id}-request.json"
    assert '"prompt": "a {kind} keeper"' in request.read_text()  # the raw template, before any image


def test_stale_temp_files_of_ours_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    dead = tmp_path / f".x.png{TEMP_MARK}~{files._HOST}~999999~abc"  # a killed writer (no such pid)
    live = tmp_path / f".y.png{TEMP_MARK}~{files._HOST}~{os.getpid()}~abc"  # a writer still running
    foreign = tmp_path / ".z.png.tmp"  # not our naming: never touched
    for path in (dead, live, foreign):
        path.write_bytes(b"partial")
    OutputSink(tmp_path).start(load_config("tiny"), {})
    assert not dead.exists() and live.exists() and foreign.exists()


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission"),
    ],
)
def test_write_failures_are_one_line_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", fail)
    sink = OutputSink(tmp_path)
    with pytest.raises(OutputError) as info:
        sink.write(np.zeros((8, 8, 3), np.uint8), Recipe(request={}, config={}, models={}), "1")
    message = str(info.value)
    assert reason in message and str(tmp_path) in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file


def test_exclusive_writes_never_replace_a_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError), atomic_writer(target, exclusive=True) as handle:
        handle.write(b"second")
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
