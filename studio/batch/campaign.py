"""``Campaign``: the Python API of campaigns (the CLI and the web UI are thin clients over it).

    campaign = Campaign.load("examples/campaigns/concept-art.toml", profile="tiny")
    plan = campaign.plan()               # checked, nothing written
    summary = campaign.run()             # submits the plan, renders what is unfinished
    campaign.status(); campaign.retry(); campaign.reroll(item_id); campaign.report(); campaign.export(folder)

A campaign lives in ``<output_dir>/campaigns/<name>/``: ``campaign.sqlite`` (the store), ``drafts/``
(content-addressed drafts), ``outputs/<job>/`` (content-addressed outputs; ``outputs/failed-qa/``),
``report/`` (contact sheets, index.html). One coordinator at a time holds ``campaign.lock``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from studio.batch.engine import LocalPool, Pool, Progress, RunSummary, run_items
from studio.batch.manifest import Manifest, load_manifest
from studio.batch.plan import Plan, plan_campaign
from studio.batch.store import FINISHED, CampaignStore, ItemRow
from studio.config import StudioConfig, config_to_dict, load_config
from studio.errors import InputError
from studio.models.runtime import resolve_threads
from studio.provenance import Provenance

logger = logging.getLogger(__name__)

CAMPAIGNS_DIR = "campaigns"
STORE_FILE = "campaign.sqlite"
Engine = Literal["local", "ray"]
ExportLayout = Literal["folders", "csv", "json"]


@dataclass(frozen=True)
class ReportFiles:
    """What ``report`` wrote."""

    sheets: tuple[Path, ...]  # one labelled contact sheet (PNG) per job (and per value of extra axes)
    html: Path  # report/index.html, self-contained (opens offline)


_IGNORED = ("output_dir", "web", "explicit_keys")  # config keys that do not change what a campaign makes


@dataclass(frozen=True)
class Status:
    """Items per state and every item with its attempts' outcome."""

    name: str
    folder: Path
    counts: dict[str, int]
    items: list[ItemRow]


class Campaign:
    """One manifest under one config, and its store."""

    def __init__(self, manifest: Manifest, config: StudioConfig) -> None:
        self.manifest = manifest
        self.config = config
        self.folder = Path(config.output_dir) / CAMPAIGNS_DIR / manifest.name
        self._store: CampaignStore | None = None

    @property
    def store(self) -> CampaignStore:
        """The campaign store, created on first use (``plan`` alone writes nothing)."""
        if self._store is None:
            self._store = CampaignStore(self.folder / STORE_FILE)
            self._check_same_config()
        return self._store

    @property
    def exists(self) -> bool:
        """Whether the campaign has a store (it was run or submitted before)."""
        return (self.folder / STORE_FILE).is_file()

    @classmethod
    def load(
        cls,
        path: Path,
        profile: str = "default",
        *,
        user_file: Path | None = None,
        overrides: Sequence[str] = (),
    ) -> Campaign:
        """The campaign of the manifest at ``path``; its ``[config]`` table layers over ``overrides``."""
        manifest = load_manifest(Path(path))
        config = load_config(profile, user_file=user_file, overrides=[*manifest.overrides, *overrides])
        return cls(manifest, config)

    def plan(self) -> Plan:
        """Every item, checked (identities and consent, models and licences, files); nothing is written."""
        from studio.pipeline import Studio

        return plan_campaign(self.manifest, Studio(self.config))

    def new_items(self, plan: Plan) -> int:
        """How many of the plan's items the store does not hold yet (all, before the first run)."""
        if not self.exists:
            return len(plan.items)
        known = {row.id for row in self.store.items()}
        return sum(item.id not in known for item in plan.items)

    def summary(self, plan: Plan) -> dict[str, Any]:
        """What ``plan`` makes: items, how many are new, drafts to render, per job and axis (JSON-ready)."""
        counts = plan.counts()
        return {
            "campaign": self.manifest.name,
            "items": len(plan.items),
            "new_items": self.new_items(plan),
            "drafts": plan.drafts,
            "jobs": counts["jobs"],
            "axes": counts["axes"],
            "folder": str(self.folder),
        }

    def submit(self, plan: Plan | None = None) -> int:
        """Add the plan's items to the store; returns how many are new (the same manifest twice adds none)."""
        return self.store.add_items((plan or self.plan()).items)

    def run(
        self,
        engine: Engine = "local",
        *,
        workers: int = 1,
        address: str | None = None,
        progress: Progress | None = None,
    ) -> RunSummary:
        """Submit the manifest, then render every unfinished item (a rerun renders only what is left)."""
        with self._lock():
            finished = self.exists and not any(self.store.counts()[s] for s in ("pending", "running"))
            # local workers start first unless the campaign was finished (their imports overlap planning)
            early = self._pool(engine, workers, address) if engine == "local" and not finished else None
            try:
                self.submit()
                self.store.recover()  # a killed run's items first become pending again
            except BaseException:
                if early is not None:
                    early.close()
                raise
            if not self.store.counts()["pending"]:
                if early is not None:
                    early.close()
                return RunSummary(self.store.counts())  # nothing unfinished: no worker is started
            pool = early or self._pool(engine, workers, address)
            try:
                return run_items(
                    self.store,
                    self.folder,
                    pool,
                    max_rerolls=self.manifest.max_rerolls,
                    provenance=Provenance(self.config),
                    progress=progress,
                )
            finally:
                pool.close()

    def status(self) -> Status:
        """Items per state, and every item."""
        return Status(self.manifest.name, self.folder, self.store.counts(), self.store.items())

    def item_record(self, row: ItemRow) -> dict[str, Any]:
        """One item with its output file and every attempt (JSON-ready: status --json, the HTTP API)."""
        return item_record(self.store, self.folder, row)

    def retry(self, *, failed: bool = True, failed_qa: bool = False, items: Sequence[str] = ()) -> int:
        """Queue failed and blocked items again (``failed``), and those that failed QA with a new seed
        (``failed_qa``); ``items`` limits either to those ids. Returns how many were queued."""
        ids = [self.store.item(i).id for i in items] or None
        count = self.store.requeue(["failed", "blocked"], ids) if failed else 0
        if failed_qa:
            count += self.store.requeue(["failed_qa"], ids, reroll=True)
        return count

    def reroll(self, item_id: str) -> ItemRow:
        """Queue one finished item again with a new seed (its earlier attempts stay on record)."""
        row = self.store.item(item_id)
        if row.kind != "generate":
            raise InputError(
                f"Item {row.id[:12]} re-faces an existing image: a re-roll would give the same pixels.",
                fix="re-roll generate items; change the refine settings for re-face items.",
            )
        if row.state not in FINISHED:
            raise InputError(f"Item {row.id[:12]} is {row.state}.", fix="wait until it has finished.")
        self.store.requeue(FINISHED, [row.id], reroll=True)
        return self.store.item(row.id)

    def favourite(self, item_id: str, favourite: bool = True) -> ItemRow:
        """Mark (or unmark) an item as a favourite, in the store."""
        row = self.store.item(item_id)
        self.store.set_favourite(row.id, favourite)
        return self.store.item(row.id)

    def report(self) -> ReportFiles:
        """Write the contact sheets (one per job) and the offline HTML page into ``report/``."""
        from studio.batch.report import write_report

        return write_report(self)

    def export(self, to: Path, layout: ExportLayout = "folders") -> list[Path]:
        """Human-readable copies of the outputs: a folder per axis value, or a flat CSV/JSON index."""
        from studio.batch.export import export_campaign

        return export_campaign(self, Path(to), layout)

    def close(self) -> None:
        """Close the store."""
        if self._store is not None:
            self._store.close()

    # -- internals ------------------------------------------------------------------------------------

    def _pool(self, engine: Engine, workers: int, address: str | None) -> Pool:
        record = config_to_dict(self.config)
        if engine == "ray":
            from studio.batch.ray_engine import RayPool

            # a Ray actor holds one CPU: one thread each (a cluster's cores are Ray's to share out)
            return RayPool(record, size=workers, address=address)
        if address is not None:
            raise InputError("--address is for --engine ray.", fix="add --engine ray or drop --address.")
        threads = max(1, resolve_threads(self.config.runtime.threads) // workers)  # the cores, shared out
        return LocalPool(record, size=workers, threads=threads)

    def _check_same_config(self) -> None:
        """A campaign's items are keyed by its config: a different one would mix two campaigns."""
        record = {k: v for k, v in config_to_dict(self.config).items() if k not in _IGNORED}
        text = json.dumps(record, sort_keys=True)
        stored = self.store.meta("config")
        if stored is None:
            self.store.set_meta("name", self.manifest.name)
            self.store.set_meta("config", text)
            self.store.set_meta("profile", self.config.profile)
            self.store.set_meta("created", datetime.now(UTC).isoformat(timespec="seconds"))
        elif stored != text:
            before = json.loads(stored)
            differs = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
            raise InputError(
                f"Campaign {self.manifest.name!r} in {self.folder} was made under another config "
                f"(profile {self.store.meta('profile')!r}; [{'], ['.join(differs)}] differ).",
                fix="run it with the same --profile/--set, or give the manifest another campaign.name.",
            )
        self.store.set_meta("manifest", self.manifest.text)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One coordinator per campaign: a second ``run`` is refused while the first holds the lock."""
        path = self.store.path.parent / "campaign.lock"  # the store creates the folder
        handle = open(path, "a+")  # noqa: SIM115  (held for the whole run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.close()
            raise InputError(
                f"Campaign {self.manifest.name!r} is being run by another process (lock {path}).",
                fix="wait for it to finish, or stop it; a killed run leaves no lock behind.",
            ) from err
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def item_record(store: CampaignStore, folder: Path, row: ItemRow) -> dict[str, Any]:
    """One item of the campaign in ``folder`` with its output file and every attempt (JSON-ready)."""
    attempts = [
        {"n": a.n, "seed": a.seed, "state": a.state, "error_class": a.error_class, "stage": a.stage,
         "message": a.message, "qa": a.qa, "draft_rendered": a.draft_rendered}
        for a in store.attempts(row.id)
    ]  # fmt: skip
    output = str(folder / row.output) if row.output else None
    return {"id": row.id, "job": row.job, "state": row.state, "axes": dict(row.axes), "seed": row.seed,
            "output": output, "qa": row.qa, "favourite": row.favourite, "attempts": attempts}  # fmt: skip
