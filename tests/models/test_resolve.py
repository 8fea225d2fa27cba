"""The one resolver: names, paths and repo ids become path + sha256 + licence, with the commercial policy."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from studio.config import StudioConfig, load_config
from studio.errors import LicenceError, ModelError
from studio.files import sha256_file
from studio.models import open_catalogue
from studio.models.resolve import resolve


@pytest.fixture
def config(tiny_overrides: list[str], tmp_path: Path) -> StudioConfig:
    return load_config("tiny", overrides=[*tiny_overrides, f"draft.lora_dir={str(tmp_path / 'loras')!r}"])


def _commercial(config: StudioConfig, licences: Path | None = None) -> StudioConfig:
    return replace(config, commercial=True, models=replace(config.models, licences=licences))


def test_a_catalogue_name_resolves_with_its_entry_and_licence(config: StudioConfig) -> None:
    catalogue = open_catalogue(config)
    model = resolve("tiny-style-kohya", "lora", config, catalogue)
    entry = catalogue["tiny-style-kohya"]
    assert model.entry is entry and model.sha256 == entry.sha256 and model.licence == entry.licence
    assert model.path.is_file() and sha256_file(model.path) == entry.sha256


def test_a_catalogued_model_given_by_path_keeps_its_catalogue_licence(
    config: StudioConfig, tmp_path: Path
) -> None:
    # a LoRA catalogued as non-commercial (research only), as a user's own catalogue would list it
    lora = tmp_path / "research-style.safetensors"
    shutil.copy(resolve("tiny-style-kohya", "lora", config, open_catalogue(config)).path, lora)
    digest = sha256_file(lora)
    (tmp_path / "mine.toml").write_text(
        f'[research-style]\nkind = "lora"\nfilename = "{lora.name}"\nsource = {{ local = "{lora.name}" }}\n'
        f'sha256 = "{digest}"\nsize = {lora.stat().st_size}\nlicence = "research only"\ncommercial = false\n'
    )
    models = replace(config.models, catalogues=(*config.models.catalogues, tmp_path / "mine.toml"))
    strict = replace(_commercial(config), models=replace(models, licences=None))
    catalogue = open_catalogue(strict)
    with pytest.raises(LicenceError, match=r"research-style has licence 'research only'"):
        resolve("research-style", "lora", strict, catalogue)  # by name
    renamed = tmp_path / "elsewhere" / "innocent.safetensors"
    renamed.parent.mkdir()
    shutil.copy(lora, renamed)
    with pytest.raises(LicenceError, match=r"research-style has licence 'research only'"):
        resolve(str(renamed), "lora", strict, catalogue)  # by path: matched to the entry by its sha256
    relaxed = replace(strict, commercial=False)
    assert resolve(str(renamed), "lora", relaxed, catalogue).entry is catalogue["research-style"]


def test_an_uncatalogued_file_needs_a_declared_licence_in_commercial_mode(
    config: StudioConfig, tmp_path: Path
) -> None:
    catalogue = open_catalogue(config)
    base = resolve("tiny-sd15", "base", config, catalogue)
    mine = tmp_path / "my-finetune.safetensors"
    mine.write_bytes(base.path.read_bytes()[:-4] + b"\0\0\0\0")  # same layout, different content
    loose = resolve(str(mine), "base", config, catalogue)
    assert loose.entry is None and loose.licence == "unknown" and loose.sha256 == sha256_file(mine)
    strict = _commercial(config, tmp_path / "licences.toml")
    with pytest.raises(LicenceError) as info:
        resolve(str(mine), "base", strict, catalogue)
    message = str(info.value)
    assert "my-finetune.safetensors" in message and "'unknown'" in message and "models.licences" in message
    (tmp_path / "licences.toml").write_text(
        f'[[model]]\nsha256 = "{loose.sha256}"\nlicence = "CreativeML OpenRAIL-M"\ncommercial = true\n'
    )
    declared = resolve(str(mine), "base", strict, catalogue)
    assert declared.licence == "CreativeML OpenRAIL-M" and declared.commercial


def test_uncatalogued_folders_and_repo_ids_are_checked_too(
    config: StudioConfig, tiny_kit: Path, tmp_path: Path
) -> None:
    strict = _commercial(config)
    catalogue = open_catalogue(strict)
    folder = tmp_path / "my-sdxl"  # a diffusers folder that is not the catalogued one
    shutil.copytree(tiny_kit / "tiny-sdxl", folder)
    (folder / "NOTES.txt").write_text("my own fine-tune")
    assert resolve(str(folder), "base", config, catalogue).licence == "unknown"
    with pytest.raises(LicenceError, match=r"my-sdxl .*'unknown'"):
        resolve(str(folder), "base", strict, catalogue)
    with pytest.raises(LicenceError, match=r"some-org/some-model .*'unknown'"):
        resolve("some-org/some-model", "base", strict, catalogue)


def test_unknown_references_say_what_was_tried(config: StudioConfig) -> None:
    catalogue = open_catalogue(config)
    with pytest.raises(ModelError, match=r"The lora model 'nope' is not a catalogue name.*tiny-style-kohya"):
        resolve("nope", "lora", config, catalogue)
    with pytest.raises(ModelError, match=r"base model 'nothing here' is not a catalogue name.*tiny-sd15"):
        resolve("nothing here", "base", config, catalogue)


def test_a_damaged_file_given_by_path_is_one_model_error(config: StudioConfig, tmp_path: Path) -> None:
    catalogue = open_catalogue(config)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(resolve("tiny-sd15", "base", config, catalogue).path.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"cut\.safetensors is damaged") as info:
        resolve(str(cut), "base", config, catalogue)
    assert "\n" not in str(info.value)
