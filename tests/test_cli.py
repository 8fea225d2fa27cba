"""The command line end to end: a real subprocess on the tiny profile, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import studio
from studio.imageio import read_image, read_metadata

STUDIO = [sys.executable, "-c", "from studio.cli import main; main()"]


def _run(*args: str, cwd: Path | None = None, columns: int = 220) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}  # wide by default, so rich tables do not wrap names
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_generate_tiny_end_to_end(tiny_overrides: list[str], tmp_path: Path) -> None:
    proc = _run(
        "generate",
        "a portrait of a lighthouse keeper",
        "--profile",
        "tiny",
        "-n",
        "2",
        "--seed",
        "7",
        *_sets(tiny_overrides),
        columns=40,  # a narrow pipe: printed paths must still come out whole, one per line
    )
    assert proc.returncode == 0, proc.stderr
    wrote = [line.removeprefix("wrote ") for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert sorted(wrote) == sorted(str(p) for p in (tmp_path / "out").glob("*.png"))
    assert "NOT portraits" in proc.stdout
    assert "draft" in proc.stdout and "refine skipped: no --identity given" in proc.stdout
    outputs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name.split("-")[-1] for p in outputs] == ["7.png", "8.png"]
    image = read_image(outputs[0])
    assert image.shape == (64, 64, 3) and image.std() > 0
    meta = read_metadata(outputs[1])
    assert meta.parameters is not None and "Seed: 8" in meta.parameters
    assert meta.recipe is not None
    assert meta.recipe["draft"]["seed"] == 8 and meta.recipe["draft"]["model"]["label"] == "tiny-sd15"
    assert len(list((tmp_path / "out").glob("*-config.toml"))) == 1


def test_user_error_is_one_line_with_exit_code(tiny_overrides: list[str]) -> None:
    proc = _run("generate", "x", "--profile", "tiny", "--set", "draft.steps=0", *_sets(tiny_overrides))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "draft.steps" in proc.stderr and "from 1 to 500" in proc.stderr


def test_debug_shows_traceback(tiny_overrides: list[str]) -> None:
    proc = _run("generate", "x", "--profile", "tiny", "--width", "65", "--debug", *_sets(tiny_overrides))
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr and "multiple of 8" in proc.stderr


def test_models_list_shows_status_licence_and_fixtures(tiny_overrides: list[str]) -> None:
    proc = _run("models", "list", "--profile", "tiny", *_sets(tiny_overrides))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "tiny-det" in text and "FIXTURE" in text and "present" in text
    assert "inswapper_128" in text and "missing" in text and "non-commercial" in text
    row = next(line for line in proc.stdout.splitlines() if "inswapper_128 " in line)
    assert [cell.strip() for cell in row.split("│")][2:5] == ["swapper", "missing", "no"]


def test_missing_model_names_pull_command(tmp_path: Path) -> None:
    proc = _run("generate", "x", "--set", f"models.dir={str(tmp_path)!r}")
    assert proc.returncode == 4
    assert "studio models pull sd15" in proc.stderr


def test_commercial_refuses_non_commercial_model_by_name(tmp_path: Path) -> None:
    catalogue = tmp_path / "mine.toml"
    catalogue.write_text(
        '[research-sd]\nkind = "sd15"\nfilename = "r.safetensors"\n'
        'source = { url = "http://127.0.0.1:9/r" }\n'
        f'sha256 = "{"0" * 64}"\nsize = 1\nlicence = "research only"\ncommercial = false\n'
    )
    proc = _run(
        "generate",
        "x",
        "--set",
        "commercial=true",
        "--set",
        "draft.model='research-sd'",
        "--set",
        f"models.catalogues=['models.toml', {str(catalogue)!r}]",
    )
    assert proc.returncode == 4
    assert "research-sd has licence 'research only'" in proc.stderr and "commercial" in proc.stderr


def test_a_damaged_model_file_is_one_line(tiny_overrides: list[str], tiny_kit: Path, tmp_path: Path) -> None:
    whole = (tiny_kit / "tiny-sd15.safetensors").read_bytes()
    cut, bloated = tmp_path / "cut.safetensors", tmp_path / "bloated.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    bloated.write_bytes((8 << 30).to_bytes(8, "little") + whole[8:])  # a header that claims 8 GiB
    for path, problem in ((cut, "truncated"), (bloated, "header claims")):
        proc = _run(
            "generate", "x", "--profile", "tiny", *_sets([*tiny_overrides, f"draft.model={str(path)!r}"])
        )
        assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and path.name in lines[0] and problem in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "elf", "--seed", "abc"], "Invalid value for '--seed'"),
        (["generate", "elf", "--sampler", "euler"], "'euler' is not one of"),
        (["generate", "elf", "--steps", "0"], "Invalid value for '--steps'"),
        (["generate", "elf", "--bogus"], "No such option: --bogus"),
        (["generate"], "Missing argument 'prompt'"),
        (["gen", "x"], "No such command 'gen'"),
        (["identity", "add", "anna"], "Missing argument 'photos'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and fragment in lines[0] and lines[1].startswith("usage: see `studio"), lines


def test_missing_input_files_are_one_line(tiny_overrides: list[str], tmp_path: Path) -> None:
    for args in (["--init-image", str(tmp_path / "nothere.png")], ["--pose", str(tmp_path / "nothere.json")]):
        proc = _run("generate", "x", "--profile", "tiny", *args, *_sets(tiny_overrides))
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "nothere" in lines[0] and "does not exist" in lines[0], lines


def test_no_arguments_prints_help_and_version_prints_the_version() -> None:
    bare = _run()
    assert bare.returncode == 0 and "Usage: studio" in bare.stdout and "generate" in bare.stdout
    assert bare.stderr == ""
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"studio {studio.__version__}"


def test_every_option_has_help_and_shows_its_default() -> None:
    from studio.cli.main import app

    def walk(command: object, path: str) -> list[tuple[str, object]]:
        found = [(path, command)]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, f"{path} {name}")
        return found

    commands = walk(typer.main.get_command(app), "studio")
    assert len(commands) > 15
    for path, command in commands:
        for param in command.params:  # type: ignore[attr-defined]
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{path} --{param.name} has no help text"
                assert param.show_default is not False, f"{path} --{param.name} hides its default"


def test_json_result_and_reproduce_under_the_recipes_profile(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    made = _run("generate", "x", "--profile", "tiny", "--json", *_sets(tiny_overrides))
    assert made.returncode == 0, made.stderr
    result = json.loads(made.stdout)
    assert len(result["outputs"]) == 1 and Path(result["outputs"][0]).is_file() and result["run_id"]
    assert set(result["timings_s"]) >= {"startup", "load", "draft", "write"}
    assert 0.1 < result["timings_s"]["startup"] < 600  # process start to a Studio ready: imports included
    again = _run(
        "reproduce", result["outputs"][0], "--json", "--set", f"output_dir={str(tmp_path / 'again')!r}"
    )
    assert again.returncode == 0, again.stderr  # no --profile tiny: the recipe says which profile
    assert json.loads(again.stdout)["identical"] is True
