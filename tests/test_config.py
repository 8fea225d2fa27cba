"""Config loading: profiles, overrides, validation messages, resolved config written to disk."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from studio.config import (
    StudioConfig,
    config_dir,
    config_from_dict,
    config_to_toml,
    load_config,
)
from studio.errors import ConfigError


def test_default_and_tiny_profiles_load() -> None:
    default = load_config("default")
    tiny = load_config("tiny")
    assert default.draft.model == "sd15" and default.models.tiny_kit is None
    assert tiny.draft.model == "tiny-sd15" and tiny.models.tiny_kit is not None
    assert tiny.draft.width == 64 and tiny.profile == "tiny"
    assert tiny.refine.mask == default.refine.mask  # tiny inherits what it does not set
    assert (tiny.runtime.device, tiny.runtime.threads, default.runtime.threads) == (
        default.runtime.device,
        1,
        0,
    )


def test_overrides_are_typed_and_win() -> None:
    config = load_config("tiny", overrides=["draft.steps=9", "draft.sampler=Euler a", "commercial=true"])
    assert config.draft.steps == 9
    assert config.draft.sampler == "Euler a"
    assert config.commercial is True


def test_user_file_layers_over_profile(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text('[draft]\ncfg = 4.5\n[models]\nsearch_paths = ["~/ComfyUI"]\n')
    config = load_config("tiny", user_file=user)
    assert config.draft.cfg == 4.5
    assert config.models.search_paths == (Path("~/ComfyUI").expanduser(),)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("draft.steps=0", ["draft.steps", "0", "from 1 to 500"]),
        ("draft.steps=abc", ["draft.steps", "'abc'", "an integer"]),
        ("draft.sampler=Heun", ["draft.sampler", "'Heun'", "'DPM++ 2M Karras'"]),
        ("runtime.device=tpu", ["runtime.device", "'tpu'", "'cuda'"]),
        ("draft.stepz=3", ["draft.stepz", "known keys", "steps"]),
        ("commercial=1", ["commercial", "true or false"]),
        ("nonsense", ["section.key=value"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", overrides=[override])
    for fragment in names:
        assert fragment in str(info.value)


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known profiles: default, tiny"):
        load_config("huge")


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[draft\nsteps = 3")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config("default", user_file=bad)


def test_resolved_config_loads_back_equal() -> None:
    config = load_config("tiny", overrides=["draft.steps=7", "refine.mask.blur=0.4", "commercial=true"])
    table = tomllib.loads(config_to_toml(config))
    assert table["draft"]["steps"] == 7 and table["profile"] == "tiny"
    assert config_from_dict(table) == config  # every key, nested sections and paths included


def test_default_toml_equals_the_dataclass_defaults() -> None:
    """configs/default.toml restates every default: one definition, checked against the dataclasses."""
    default = load_config("default")
    written = tomllib.loads((config_dir() / "default.toml").read_text())
    built = config_from_dict({**written, "profile": "default"})
    assert built == default
    for section in ("models", "runtime", "performance", "images", "draft", "refine", "adapter"):
        from_dataclass = type(getattr(default, section))()  # every field at its dataclass default
        from_file = getattr(default, section)
        # loading expands ~; the dataclass keeps the raw default
        for name in ("dir", "identities_dir", "templates_dir"):
            if hasattr(from_dataclass, name):
                raw = getattr(from_dataclass, name)
                from_dataclass = dataclasses.replace(from_dataclass, **{name: raw.expanduser()})
        assert from_file == from_dataclass, section
    assert set(written) - {"models"} <= {f.name for f in dataclasses.fields(StudioConfig)}
    assert default.commercial is False and default.output_dir == Path("outputs")


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("refine.mask.padding=0.49", None),
        ("refine.mask.padding=0.5", "from 0.0 to 0.49"),
        ("refine.detect.threshold=0.99", None),
        ("refine.detect.threshold=1.0", "from 0.05 to 0.99"),
        ("refine.detect.det_size=330", "a multiple of 32"),
        ("draft.width=100", "a multiple of 8"),
    ],
)
def test_one_range_per_setting(override: str, allowed: str | None) -> None:
    if allowed is None:
        load_config("default", overrides=[override])
        return
    with pytest.raises(ConfigError, match=allowed):
        load_config("default", overrides=[override])
