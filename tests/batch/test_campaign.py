"""Campaigns end to end on the tiny profile: manifest checks, planning, the store, the engine, resume."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from skimage import data

from studio import files
from studio.batch.campaign import Campaign
from studio.batch.engine import Crash, run_items
from studio.batch.manifest import ManifestError, load_manifest
from studio.batch.store import CampaignStore
from studio.batch.worker import Outcome, Task, Worker
from studio.config import config_to_dict, load_config
from studio.faces.identity import IdentityLibrary
from studio.files import TEMP_MARK
from studio.imageio import read_metadata, write_image
from studio.pipeline import TINY_NOTE, Studio
from studio.qa import NO_CONTENT_CHECK_NOTE, reroll_seed

NAMES = [f"p{i}" for i in range(8)]


@pytest.fixture
def overrides(tiny_overrides: list[str], tmp_path: Path) -> list[str]:
    return [*tiny_overrides, f"refine.identities_dir={str(tmp_path / 'ids')!r}"]


@pytest.fixture
def enrolled(overrides: list[str], tmp_path: Path) -> list[str]:
    """Eight tiny identities (the tiny detector is a fixture: one photo serves them all)."""
    photo = tmp_path / "photo.png"
    write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
    studio = Studio(load_config("tiny", overrides=overrides))
    for name in NAMES:
        studio.enrol(name, [photo], consent=f"release {name}, 2026-11-01")
    return overrides


def manifest(tmp_path: Path, body: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


K8 = """
[campaign]
name = "k8"
max_rerolls = 1
[defaults]
steps = 2
[axes]
identity = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]
[[jobs]]
name = "faces"
prompt = "a portrait of a lighthouse keeper"
identity = "{identity}"
"""


# --- the manifest: every error names the file, the key and the fix -------------------------------


@pytest.mark.parametrize(
    ("body", "key", "fix"),
    [
        ('[campaign]\nname = "x"\nmax_reroll = 2\n[[jobs]]\nprompt = "a"', "campaign.max_reroll",
         "max_rerolls"),
        ('[campaign]\nname = "x"\n[axes.m]\nlocale = ["a", "b"]\nidentity = ["p0"]\n'
         '[[jobs]]\nprompt = "{locale}"',
         "axes.m", "same length"),
        ('[campaign]\nname = "x"\n[axes]\ncharacter = ["elf"]\n[[jobs]]\nprompt = "a {charcter}"', "jobs[0]",
         "{character}"),
        ('[campaign]\nname = "x"\n[[jobs]]\nkind = "refine"\nimage = "m.png"', "jobs[0].identity", "cast"),
        ('[campaign]\nname = "x"\n[[jobs]]\nkind = "paint"\nprompt = "a"', "jobs[0].kind", '"generate" or'),
        ('[campaign]\nname = "x"\nseeds = 0\n[[jobs]]\nprompt = "a"', "campaign.seeds", "count"),
        ('[campaign]\nname = "x"\n[axes.m]\nlocale = ["a", "a"]\nidentity = ["p0", "p0"]\n'
         '[[jobs]]\nprompt = "{locale}"', "axes.m", "twice"),
    ],
)  # fmt: skip
def test_manifest_errors_name_file_key_and_fix(tmp_path: Path, body: str, key: str, fix: str) -> None:
    path = manifest(tmp_path, body)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}:") and fix in message and "\n" not in message


def test_plan_checks_identities_models_and_files_before_any_work(enrolled: list[str], tmp_path: Path) -> None:
    IdentityLibrary(tmp_path / "ids").revoke("p3")
    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    with pytest.raises(ManifestError, match=r"jobs\[0\] \(faces\) at identity=p3.*revoked"):
        campaign.plan()
    missing = K8.replace(
        'prompt = "a portrait of a lighthouse keeper"', 'kind = "refine"\nimage = "gone.png"'
    )
    with pytest.raises(ManifestError, match=r"gone\.png"):
        Campaign.load(manifest(tmp_path, missing), "tiny", overrides=enrolled).plan()
    lora = K8.replace("steps = 2", 'steps = 2\nloras = ["no-such-lora:0.5"]')
    with pytest.raises(ManifestError, match="no-such-lora"):
        Campaign.load(manifest(tmp_path, lora), "tiny", overrides=enrolled).plan()
    assert not campaign.folder.exists()  # nothing was written


def test_plan_is_deterministic_and_shares_one_draft(enrolled: list[str], tmp_path: Path) -> None:
    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    first, second = campaign.plan(), campaign.plan()
    assert [i.id for i in first.items] == [i.id for i in second.items] and len(first.items) == 8
    assert first.drafts == 1 and len({i.draft_key for i in first.items}) == 1
    assert {i.seed for i in first.items} == {42}
    assert first.counts() == {"jobs": {"faces": 8}, "axes": {"identity": 8, "seed": 1}}
    assert campaign.submit(first) == 8 and campaign.submit(second) == 0  # the same manifest adds nothing


def test_zip_groups_vary_together_and_items_group_by_lora_set(enrolled: list[str], tmp_path: Path) -> None:
    body = """
[campaign]
name = "zip"
seeds = [7, 9]
[axes]
style = ["film-noir", "studio-headshot"]
[axes.market]
locale = ["de-DE", "fr-FR", "ja-JP", "de-AT"]
identity = ["p0", "p1", "p2", "p0"]
[[jobs]]
prompt = "an ad portrait, {locale} market"
style = "{style}"
identity = "{identity}"
"""
    plan = Campaign.load(manifest(tmp_path, body), "tiny", overrides=enrolled).plan()
    pairs = {(i.axes["market"], i.request["identity"]) for i in plan.items}
    assert pairs == {("de-DE / p0", "p0"), ("fr-FR / p1", "p1"), ("ja-JP / p2", "p2"), ("de-AT / p0", "p0")}
    assert len(plan.items) == 2 * 4 * 2 and plan.drafts == 16  # two markets may share one identity
    loras = [i.loras for i in plan.items]
    assert sum(a != b for a, b in itertools.pairwise(loras)) <= 1  # the LoRA set changes once


# --- the store: interruptions are not crashes; two crashes quarantine ---------------------------


def test_store_recovers_interrupted_and_quarantines_after_two_crashes(
    enrolled: list[str], tmp_path: Path
) -> None:
    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    campaign.submit()
    store = campaign.store
    a, b = (row.id for row in store.items()[:2])
    store.start(a, 42, "w")  # a coordinator killed mid-item leaves it running
    assert store.recover() == 1 and store.item(a).state == "pending" and store.item(a).crashes == 0
    assert store.attempts(a)[0].state == "interrupted"
    for n in (1, 2):
        attempt = store.start(b, 42, "w")
        state = store.fail(b, attempt, "crashed", error_class="WorkerCrash", stage="worker", message="died")
        assert state == ("pending" if n == 1 else "failed")
    assert "quarantined" in store.item(b).reasons[0]
    assert store.requeue(["failed"]) == 1 and store.item(b).state == "pending"


class _CrashingPool:
    """One in-process Worker; crashes (like a dead worker process) on the items it is told to."""

    size = 1

    def __init__(self, config: dict, crash: set[str]) -> None:
        self.worker, self.crash, self.task = Worker(config), crash, None

    def submit(self, task: Task) -> None:
        self.task = task

    def next(self) -> Outcome | Crash:
        task, self.task = self.task, None
        assert task is not None
        return Crash(task, "segfault") if task.item in self.crash else self.worker.run(task)

    def close(self) -> None:
        pass


def test_a_crashing_item_is_quarantined_without_blocking_the_rest(
    enrolled: list[str], tmp_path: Path
) -> None:
    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    campaign.submit()
    bad = campaign.store.items()[3].id
    pool = _CrashingPool(config_to_dict(campaign.config), {bad})
    summary = run_items(campaign.store, campaign.folder, pool, max_rerolls=1)
    assert summary.counts["done"] == 7 and summary.counts["failed"] == 1
    assert TINY_NOTE in campaign.store.notes() and NO_CONTENT_CHECK_NOTE in campaign.store.notes()
    assert [a.state for a in campaign.store.attempts(bad)] == ["crashed", "crashed"]
    assert summary.drafts_rendered == 1 and summary.drafts_reused == 6  # 1 draft; the 8th item crashed
    for row in campaign.store.items(["done"]):
        recipe = read_metadata(campaign.folder / row.output).recipe  # type: ignore[operator]
        assert row.output == f"outputs/faces/{row.id}.png" and recipe["request"]["identity"] in NAMES
    again = pool.worker.studio.reproduce(campaign.folder / row.output)  # type: ignore[operator]
    assert again.identical, again.differences  # a campaign output's recipe is complete


def test_qa_failures_reroll_with_derived_seeds_then_go_apart(enrolled: list[str], tmp_path: Path) -> None:
    body = (
        K8.replace("max_rerolls = 1", "max_rerolls = 2")
        .replace("[defaults]", '[config]\n"refine.min_similarity" = 0.999\n[defaults]')
        .replace('["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]', '["p0"]')
    )
    campaign = Campaign.load(manifest(tmp_path, body), "tiny", overrides=enrolled)
    campaign.submit()
    pool = _CrashingPool(config_to_dict(campaign.config), set())
    run_items(campaign.store, campaign.folder, pool, max_rerolls=2)
    (row,) = campaign.store.items()
    assert row.state == "failed_qa" and row.output == f"outputs/failed-qa/{Path(row.output).stem}.png"
    seeds = [a.seed for a in campaign.store.attempts(row.id)]
    assert seeds == [42, reroll_seed(row.id, 1), reroll_seed(row.id, 2)]
    assert all("similarity" in a.qa["reasons"][0] for a in campaign.store.attempts(row.id))  # type: ignore[index]


def test_revoked_identity_blocks_its_items_with_the_reason(enrolled: list[str], tmp_path: Path) -> None:
    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    campaign.submit()  # planned while consent held
    IdentityLibrary(tmp_path / "ids").revoke("p5")  # revoked mid-campaign
    pool = _CrashingPool(config_to_dict(campaign.config), set())
    summary = run_items(campaign.store, campaign.folder, pool, max_rerolls=1)
    (blocked,) = campaign.store.items(["blocked"])
    assert blocked.request["identity"] == "p5" and "revoked" in blocked.reasons[0]
    assert campaign.store.attempts(blocked.id)[0].stage == "consent"
    assert summary.counts["done"] == 7


# --- real worker processes: a killed worker is a crash; kill -9 of the whole run loses nothing -----


def test_local_pool_reports_a_killed_worker_as_a_crash(enrolled: list[str], tmp_path: Path) -> None:
    from studio.batch.engine import LocalPool

    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    campaign.submit()
    row = campaign.store.items()[0]
    pool = LocalPool(config_to_dict(campaign.config), size=1)
    try:
        task = Task(row.id, 1, row.kind, row.request)
        pool.submit(task)
        os.kill(pool._workers[0].process.pid, signal.SIGKILL)
        crash = pool.next()
        assert isinstance(crash, Crash) and crash.task == task and "died" in crash.message
        pool.submit(task)  # the replacement worker runs it
        outcome = pool.next()
        assert isinstance(outcome, Outcome) and outcome.state == "done"
    finally:
        pool.close()


KILL = """
[campaign]
name = "kill"
[defaults]
steps = 2
[axes]
character = ["elf", "dwarf", "orc", "gnome", "troll", "giant"]
identity = ["p0", "p1"]
[[jobs]]
prompt = "a {character}"
identity = "{identity}"
"""


def test_kill_9_at_random_points_loses_and_duplicates_nothing(enrolled: list[str], tmp_path: Path) -> None:
    path = manifest(tmp_path, KILL)
    studio_exe = str(Path(sys.executable).parent / "studio")
    command = [studio_exe, "campaign", "run", str(path), "--profile", "tiny"]
    for item in enrolled:
        command += ["--set", item]
    campaign = Campaign.load(path, "tiny", overrides=enrolled)
    total = len(campaign.plan().items)
    store_path = campaign.folder / "campaign.sqlite"
    rng = random.Random(20261203)
    kills = []
    for _trial in range(5):
        target = rng.randint(0, total - 1)  # kill once this many more items are done, plus a random delay
        before = _done(store_path)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and _done(store_path) < min(before + target, total):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills.append(_done(store_path))
    print(f"kill -9 trials: items done at each kill {kills} of {total}")  # shown with pytest -s
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    store = CampaignStore(store_path)
    rows = store.items()
    assert len(rows) == total and all(row.state == "done" for row in rows), kills
    for row in rows:  # done exactly once, never rendered again once done
        states = [a.state for a in store.attempts(row.id)]
        assert states.count("done") == 1 and states[-1] == "done", states
    outputs = sorted(p.name for p in (campaign.folder / "outputs").rglob("*.png"))
    assert outputs == sorted(f"{row.id}.png" for row in rows)  # no duplicate, nothing extra
    drafts = list((campaign.folder / "drafts").glob("*.png"))
    assert len(drafts) == len({row.draft_key for row in rows})
    assert not [p for p in campaign.folder.rglob("*") if "~studio-tmp~" in p.name]  # no partial file


class _IdlePool:
    """A pool for a campaign with nothing pending: handed no task."""

    size = 1

    def submit(self, task: Task) -> None:
        raise AssertionError(f"no task was expected, got {task}")

    def next(self) -> Outcome | Crash:
        raise AssertionError("no task was submitted")

    def close(self) -> None:
        pass


def test_a_run_removes_temp_files_killed_writers_left_in_every_campaign_folder(tmp_path: Path) -> None:
    """A writer killed mid-file leaves its temp file where the output was going: a job's folder under
    outputs/ (two levels down), failed-qa/, drafts/. The next run removes them all; a live writer's stays."""
    folder = tmp_path / "campaigns" / "c"
    subs = ["", "drafts", "outputs/faces", "outputs/failed-qa"]
    dead = [folder / sub / f".x.png{TEMP_MARK}~{files._HOST}~999999~abc" for sub in subs]  # no such pid
    live = folder / "outputs" / "faces" / f".y.png{TEMP_MARK}~{files._HOST}~{os.getpid()}~abc"
    for path in [*dead, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    run_items(CampaignStore(folder / "campaign.sqlite"), folder, _IdlePool(), max_rerolls=0)
    assert [p for p in dead if p.exists()] == [] and live.exists()


def _done(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM items WHERE state = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_worker_that_cannot_start_stops_the_run_with_its_error(enrolled: list[str], tmp_path: Path) -> None:
    from studio.batch.engine import LocalPool
    from studio.errors import ConfigError

    campaign = Campaign.load(manifest(tmp_path, K8), "tiny", overrides=enrolled)
    campaign.submit()
    row = campaign.store.items()[0]
    record = config_to_dict(campaign.config)
    pool = LocalPool({**record, "draft": {**record["draft"], "steps": -3}}, size=1)
    with pytest.raises(ConfigError, match="steps"):
        pool.submit(Task(row.id, 1, row.kind, row.request))
    assert all(not w.process.is_alive() for w in pool._workers)  # closed, nothing left running


def test_a_blocked_item_is_never_written_and_its_scores_are_kept(enrolled: list[str], tmp_path: Path) -> None:
    closed = ["safety.checker='nudenet'", "safety.required=true", "safety.model='no-such-model'"]
    body = K8.replace('["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]', '["p0"]')
    campaign = Campaign.load(manifest(tmp_path, body), "tiny", overrides=[*enrolled, *closed])
    campaign.submit()
    pool = _CrashingPool(config_to_dict(campaign.config), set())
    summary = run_items(campaign.store, campaign.folder, pool, max_rerolls=1)
    (row,) = campaign.store.items()
    assert row.state == "blocked" and row.output is None and summary.counts["blocked"] == 1
    attempts = campaign.store.attempts(row.id)
    assert len(attempts) == 2 and all(a.qa["blocked"] for a in attempts)  # type: ignore[index]  # re-rolled once
    assert "safety.required" in row.reasons[0] and not list(campaign.folder.rglob("*.png"))  # no draft kept


def test_status_of_a_campaign_never_run_creates_nothing(enrolled: list[str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from studio.cli.main import app

    path = manifest(tmp_path, K8)
    options = [part for item in enrolled for part in ("--set", item)]
    result = CliRunner().invoke(app, ["campaign", "status", str(path), "--profile", "tiny", *options])
    assert result.exit_code == 0 and "has not been run yet" in result.output
    assert not Campaign.load(path, "tiny", overrides=enrolled).folder.exists()


# --- templates: a refine job may name a template instead of an image ------------------------------

TEMPLATED = """
[campaign]
name = "tpl"
[axes]
identity = ["p0", "p1"]
[[jobs]]
name = "reface"
kind = "refine"
template = "solo"
identity = "0={identity}"
"""


def test_a_refine_job_naming_a_template_plans_and_runs(enrolled: list[str], tmp_path: Path) -> None:
    overrides = [*enrolled, f"refine.templates_dir={str(tmp_path / 'tpl')!r}"]
    studio = Studio(load_config("tiny", overrides=overrides))
    master = studio.templates.image_path(studio.add_template("solo", tmp_path / "photo.png"))
    campaign = Campaign.load(manifest(tmp_path, TEMPLATED), "tiny", overrides=overrides)
    plan = campaign.plan()
    assert len(plan.items) == 2 and {i.source for i in plan.items} == {str(master)}
    assert {(i.request["template"], i.request["identity"]) for i in plan.items} == {
        ("solo", "0=p0"),
        ("solo", "0=p1"),
    }
    campaign.submit(plan)
    pool = _CrashingPool(config_to_dict(campaign.config), set())
    summary = run_items(campaign.store, campaign.folder, pool, max_rerolls=0)
    assert summary.counts["done"] == 2
    recipe = read_metadata(campaign.folder / campaign.store.items(["done"])[0].output).recipe  # type: ignore[operator]
    assert recipe["refine"]["template"]["name"] == "solo"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('template = "sol"', "No template 'sol' in the library .* Fix: did you mean 'solo'"),
        ('identity = "0={identity},1=p2"', "Template 'solo' has 1 slot but the cast maps 2: 0=p0,1=p2"),
    ],
)
def test_a_template_that_does_not_fit_fails_at_plan(enrolled: list[str], tmp_path: Path, line: str,
                                                     problem: str) -> None:  # fmt: skip
    overrides = [*enrolled, f"refine.templates_dir={str(tmp_path / 'tpl')!r}"]
    Studio(load_config("tiny", overrides=overrides)).add_template("solo", tmp_path / "photo.png")
    job = TEMPLATED.split("[[jobs]]")[1]
    key = line.split(" = ")[0]
    changed = "\n".join(line if old.startswith(f"{key} = ") else old for old in job.splitlines())
    body = TEMPLATED.replace(job, changed)
    campaign = Campaign.load(manifest(tmp_path, body), "tiny", overrides=overrides)
    with pytest.raises(ManifestError, match=rf"jobs\[0\] \(reface\) at identity=p0: {problem}") as caught:
        campaign.plan()
    assert "\n" not in str(caught.value) and not campaign.folder.exists()


def test_a_refine_job_needs_an_image_or_a_template(tmp_path: Path) -> None:
    path = manifest(tmp_path, TEMPLATED.replace('template = "solo"\n', ""))
    with pytest.raises(ManifestError, match=r"jobs\[0\]\.image: is missing.*template = \"NAME\""):
        load_manifest(path)


# --- refine options: processors, blend and masks per job ---------------------------------------------

REFINE_OPTIONS_MANIFEST = """
[campaign]
name = "options"
[[jobs]]
name = "plain"
kind = "refine"
image = "photo.png"
identity = "p0"
[[jobs]]
name = "enhanced"
kind = "refine"
image = "photo.png"
identity = "p0"
processors = ["swap", "enhance"]
blend = "poisson"
occlusion = true
regions = ["skin", "nose"]
"""


def test_refine_options_are_job_options_and_part_of_the_item_id(enrolled: list[str], tmp_path: Path) -> None:
    campaign = Campaign.load(manifest(tmp_path, REFINE_OPTIONS_MANIFEST), "tiny", overrides=enrolled)
    plain, enhanced = campaign.plan().items
    assert plain.id != enhanced.id and "processors" not in plain.request
    assert enhanced.request["processors"] == ["swap", "enhance"] and enhanced.request["blend"] == "poisson"
    assert enhanced.request["occlusion"] is True and enhanced.request["regions"] == ["skin", "nose"]
    bad = REFINE_OPTIONS_MANIFEST.replace('["swap", "enhance"]', '["swap", "blur"]')
    with pytest.raises(ManifestError, match=r"enhanced.*--processors 'blur' is not allowed"):
        Campaign.load(manifest(tmp_path, bad), "tiny", overrides=enrolled).plan()
