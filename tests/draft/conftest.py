"""A module-wide Studio on the tiny profile, so the base pipeline loads once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.config import StudioConfig, load_config
from studio.pipeline import Studio
from tests.conftest import private_overrides


@pytest.fixture(scope="module")
def tiny_config(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> StudioConfig:
    work = tmp_path_factory.mktemp("draft")
    return load_config(
        "tiny",
        overrides=[
            f"models.tiny_kit={str(tiny_kit)!r}",
            f"models.dir={str(work / 'models')!r}",
            f"output_dir={str(work / 'out')!r}",
            *private_overrides(work),
            f"draft.lora_dir={str(work / 'loras')!r}",
        ],
    )


@pytest.fixture(scope="module")
def studio(tiny_config: StudioConfig) -> Studio:
    return Studio(tiny_config)
