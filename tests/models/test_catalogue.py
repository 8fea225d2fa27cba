"""The model catalogue: schema validation, real entries, licence policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.config import ModelsConfig, config_dir, load_config
from studio.errors import ConfigError, ModelError
from studio.models.catalogue import (
    ModelEntry,
    ModelSource,
    load_catalogue,
    read_catalogue_file,
)
from studio.models.pull import pull
from studio.types import MODEL_KINDS

REAL = {
    "sd15",
    "sdxl",
    "controlnet_openpose_sd15",
    "det_10g",
    "w600k_r50",
    "inswapper_128",
    "realesrgan_x2plus",
    "realesrgan_x4plus",
}


def test_real_catalogue_has_every_product_model() -> None:
    catalogue = load_catalogue(load_config("default").models)
    assert set(catalogue) >= REAL
    for entry in catalogue.values():
        assert entry.kind in MODEL_KINDS
        assert entry.size > 0 and len(entry.sha256) == 64 and entry.licence
        assert entry.source.hf_repo or entry.source.url
        assert not entry.is_fixture
    assert not catalogue["inswapper_128"].commercial
    assert catalogue["realesrgan_x4plus"].commercial


def test_entry_lookup_by_kind_lists_choices() -> None:
    catalogue = load_catalogue(load_config("default").models)
    assert catalogue.entry("det_10g", "detector").filename == "det_10g.onnx"
    with pytest.raises(ModelError, match=r"Unknown swapper model 'det_10g'.*inswapper_128"):
        catalogue.entry("det_10g", "swapper")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('kind = "toaster"', "kind 'toaster'"),
        ('sha256 = "abc"', "not 64 lowercase hex"),
        ("size = -1\nextra = 1", "unknown keys ['extra']"),
        ('source = { ftp = "x" }', "source"),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, body: str, fragment: str) -> None:
    base = {
        "kind": '"detector"',
        "filename": '"x.onnx"',
        "source": '{ url = "http://127.0.0.1/x" }',
        "sha256": '"' + "0" * 64 + '"',
        "size": "1",
        "licence": '"MIT"',
        "commercial": "true",
    }
    for line in body.splitlines():
        key, _, value = line.partition(" = ")
        base[key] = value
    path = tmp_path / "cat.toml"
    path.write_text("[x]\n" + "\n".join(f"{k} = {v}" for k, v in base.items()))
    with pytest.raises(ConfigError, match="entry \\[x\\]") as info:
        read_catalogue_file(path)
    assert fragment in str(info.value)


@pytest.mark.parametrize("filename", ["../x", "a/b.onnx", "/abs", "", "..", "a\\\\b.onnx"])
def test_filenames_must_be_plain_names(tmp_path: Path, filename: str) -> None:
    path = tmp_path / "cat.toml"
    path.write_text(
        f'[x]\nkind = "detector"\nfilename = "{filename}"\nsource = {{ url = "http://127.0.0.1/x" }}\n'
        f'sha256 = "{"0" * 64}"\nsize = 1\nlicence = "MIT"\ncommercial = true\n'
    )
    with pytest.raises(ConfigError, match="entry \\[x\\]: filename") as info:
        read_catalogue_file(path)
    assert str(path) in str(info.value) and "plain" in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("filename", ["../escape.onnx", "/tmp/abs.onnx", "sub/x.onnx", ""])
def test_pull_refuses_a_destination_outside_the_models_folder(tmp_path: Path, filename: str) -> None:
    entry = ModelEntry(  # built directly, past the catalogue's own check: pull must refuse it too
        name="x",
        kind="detector",
        filename=filename,
        source=ModelSource(url="http://127.0.0.1:9/x"),
        sha256="0" * 64,
        size=1,
        licence="MIT",
        commercial=True,
    )
    with pytest.raises(ModelError, match="outside the models folder"):
        pull(entry, ModelsConfig(dir=tmp_path / "models"))
    assert not (tmp_path / "escape.onnx").exists()


def test_catalogue_file_is_in_config_dir() -> None:
    assert (config_dir() / "models.toml").is_file()
