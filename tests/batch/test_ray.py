"""The Ray engine on one real local Ray instance: same items and pixels as the local engine, crashes
reported and replaced, workers that cannot start stop the run with their own error."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from studio.batch.campaign import Campaign
from studio.batch.engine import Crash, run_items
from studio.batch.ray_engine import RayPool
from studio.batch.worker import Outcome, Task
from studio.config import config_to_dict, load_config
from studio.errors import ConfigError, RuntimeSetupError
from studio.imageio import read_image

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

MANIFEST = """\
[campaign]
name = "raytest"
seeds = 2
[defaults]
steps = 2
[axes]
character = ["elf", "dwarf"]
[[jobs]]
name = "chars"
prompt = "portrait of a {character}"
"""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the whole module: starting one takes about ten seconds."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "raytest.toml"
    path.write_text(MANIFEST, encoding="utf-8")
    return path


def _campaign(manifest: Path, overrides: list[str], out: Path) -> Campaign:
    return Campaign.load(manifest, "tiny", overrides=[*overrides, f"output_dir='{out}'"])


def _outputs(campaign: Campaign) -> dict[str, str]:
    """Item id → output path (relative to the campaign folder), for every item."""
    return {row.id: row.output or "" for row in campaign.store.items()}


def test_ray_engine_matches_local_engine(
    ray_cluster: None, manifest: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    local = _campaign(manifest, tiny_overrides, tmp_path / "local")
    on_ray = _campaign(manifest, tiny_overrides, tmp_path / "ray")
    try:
        local.run()
        summary = on_ray.run("ray", workers=2)
        assert summary.counts.get("done") == 4 == local.store.counts().get("done")
        want, got = _outputs(local), _outputs(on_ray)
        assert sorted(got) == sorted(want)
        assert got == want  # the same content-addressed file names
        for item, output in want.items():
            expected = read_image(local.folder / output)
            actual = read_image(on_ray.folder / got[item])
            assert np.array_equal(actual, expected), f"item {item[:12]}: pixels differ"
        assert ray.is_initialized()  # the pool joined the module's instance and left it running
    finally:
        local.close()
        on_ray.close()


class _KillFirst:
    """A RayPool whose actor is killed under the first task it is given."""

    def __init__(self, pool: RayPool) -> None:
        self.pool, self.size, self.killed = pool, pool.size, False

    def submit(self, task: Task) -> None:
        self.pool.submit(task)
        if not self.killed:
            self.killed = True
            ray.kill(self.pool._actors[0].handle, no_restart=True)

    def next(self) -> Outcome | Crash:
        return self.pool.next()

    def close(self) -> None:
        self.pool.close()


def test_killed_actor_is_a_crash_and_the_run_finishes(
    ray_cluster: None, manifest: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    campaign = _campaign(manifest, tiny_overrides, tmp_path / "out")
    try:
        campaign.submit()
        first = campaign.store.items()[0]
        pool = _KillFirst(RayPool(config_to_dict(campaign.config), size=1))
        try:
            run_items(campaign.store, campaign.folder, pool, max_rerolls=0)
        finally:
            pool.close()
        assert pool.killed
        attempts = campaign.store.attempts(first.id)
        assert [a.state for a in attempts] == ["crashed", "done"]
        assert "Ray actor died" in (attempts[0].message or "")
        assert campaign.store.counts().get("done") == 4  # the replacement actor ran everything
        assert all((campaign.folder / output).is_file() for output in _outputs(campaign).values())
    finally:
        campaign.close()


def test_worker_that_cannot_start_stops_the_pool(
    ray_cluster: None, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = config_to_dict(load_config("tiny", overrides=tiny_overrides))
    record["draft"] = {**record["draft"], "steps": -3}  # rejected when the actor builds its config
    with pytest.raises(ConfigError, match="steps"):
        RayPool(record, size=1)
    # without Ray installed: a setup error that says how to install it
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeSetupError, match="needs Ray") as err:
        RayPool(record, size=1)
    assert err.value.fix is not None and "--extra ray" in err.value.fix
