"""The campaign store: one SQLite database per campaign (WAL, one transaction per state change).

It holds the manifest and config a campaign runs under, every item with its state, and every attempt with
its seed, outcome, error class, stage and message. States: pending → running → done | failed_qa | failed |
blocked. Only the coordinator writes it; durability lives here, not in a worker or in Ray. A coordinator
killed mid-item leaves an attempt ``running``: ``recover`` marks it interrupted and the item pending again
(an interruption is not the item's fault); a worker that dies under an item is a crash, and an item that
crashed two workers is quarantined as failed.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from studio.batch.plan import Item
from studio.errors import OutputError

ItemState = Literal["pending", "running", "done", "failed_qa", "failed", "blocked"]
STATES: tuple[ItemState, ...] = ("pending", "running", "done", "failed_qa", "failed", "blocked")
FINISHED: tuple[ItemState, ...] = ("done", "failed_qa", "failed", "blocked")
MAX_CRASHES = 2  # an item that crashed this many workers is quarantined (failed)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, job TEXT NOT NULL, kind TEXT NOT NULL,
    axes TEXT NOT NULL, request TEXT NOT NULL, source TEXT, draft_key TEXT, identities TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    rerolls INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0, seed INTEGER,
    output TEXT, qa TEXT, reasons TEXT, favourite INTEGER NOT NULL DEFAULT 0, updated TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, position);
CREATE TABLE IF NOT EXISTS attempts (
    item TEXT NOT NULL REFERENCES items (id), n INTEGER NOT NULL, seed INTEGER, state TEXT NOT NULL,
    started TEXT NOT NULL, finished TEXT, worker TEXT, draft_rendered INTEGER NOT NULL DEFAULT 0,
    error_class TEXT, stage TEXT, message TEXT, qa TEXT, output TEXT, seconds REAL,
    PRIMARY KEY (item, n)
);
"""


@dataclass(frozen=True)
class ItemRow:
    """An item as the store holds it."""

    id: str
    position: int
    job: str
    kind: str
    axes: Mapping[str, str]
    request: Mapping[str, Any]
    source: str | None
    draft_key: str | None
    identities: tuple[str, ...]
    state: ItemState
    attempts: int
    rerolls: int  # QA re-rolls (and manual re-rolls) so far: the next attempt's seed derives from it
    crashes: int
    seed: int | None  # the last attempt's seed
    output: str | None  # relative to the campaign folder
    qa: Mapping[str, Any] | None  # similarities and reasons of the last attempt
    reasons: tuple[str, ...]
    favourite: bool


@dataclass(frozen=True)
class AttemptRow:
    """One attempt at an item."""

    item: str
    n: int
    seed: int | None
    state: str  # running, done, failed_qa, failed, blocked, crashed, interrupted
    started: str
    finished: str | None
    worker: str | None
    draft_rendered: bool
    error_class: str | None
    stage: str | None
    message: str | None
    qa: Mapping[str, Any] | None
    output: str | None
    seconds: float | None


class CampaignStore:
    """One campaign's database. Every method that changes state is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed state change survives a power cut
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise OutputError(
                f"Cannot open the campaign store {self.path} ({err}).",
                fix="check that the folder is writable and the disk is not full.",
            ) from err
        if self.meta("schema") is None:
            self.set_meta("schema", str(SCHEMA_VERSION))

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # -- campaign metadata --------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A stored campaign value (name, manifest, config, profile, created)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Store a campaign value."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def notes(self) -> tuple[str, ...]:
        """What the outputs' recipes say about how they were made (e.g. the tiny profile's placeholders)."""
        return tuple(json.loads(self.meta("notes") or "[]"))

    def add_notes(self, notes: Iterable[str]) -> None:
        """Remember the outputs' notes (kept in first-seen order, each once)."""
        merged = tuple(dict.fromkeys((*self.notes(), *notes)))
        if merged != self.notes():
            self.set_meta("notes", _json(list(merged)))

    # -- items --------------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Item]) -> int:
        """Add planned items; ones already stored (same id) are left as they are. Returns how many are new."""
        with self._tx() as db:
            start = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM items").fetchone()[0]
            before = db.total_changes
            for offset, item in enumerate(items):
                db.execute(
                    "INSERT OR IGNORE INTO items (id, position, job, kind, axes, request, source, draft_key,"
                    " identities, seed, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.id, start + offset, item.job, item.kind, _json(item.axes), _json(item.request),
                        item.source, item.draft_key, _json(list(item.identities)), item.seed, _now(),
                    ),
                )  # fmt: skip
            return db.total_changes - before

    def items(self, states: Iterable[str] | None = None, job: str | None = None) -> list[ItemRow]:
        """Items in run order, optionally only those in ``states`` and of ``job``."""
        sql, args = "SELECT * FROM items WHERE 1", []
        if states is not None:
            wanted = list(states)
            sql += f" AND state IN ({','.join('?' * len(wanted))})"
            args += wanted
        if job is not None:
            sql += " AND job = ?"
            args.append(job)
        return [_item_row(row) for row in self._query(sql + " ORDER BY position", args)]

    def item(self, item_id: str) -> ItemRow:
        """One item by id (a unique prefix of at least 6 characters also works)."""
        rows = self._query("SELECT * FROM items WHERE id LIKE ? ORDER BY position", [item_id + "%"])
        if len(item_id) < 6 or len(rows) != 1:
            from studio.errors import InputError

            found = "no item" if not rows else f"{len(rows)} items"
            raise InputError(
                f"{found} matches id {item_id!r} in {self.path}.", fix="see `studio campaign status`."
            )
        return _item_row(rows[0])

    def sharers(self, draft_key: str, item_id: str) -> int:
        """Unfinished items other than ``item_id`` that use the draft ``draft_key``."""
        return self._db.execute(
            "SELECT COUNT(*) FROM items WHERE draft_key = ? AND id != ? AND state IN ('pending', 'running')",
            (draft_key, item_id),
        ).fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Items per state (every state listed)."""
        found = dict(self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        return {state: found.get(state, 0) for state in STATES}

    def attempts(self, item_id: str | None = None) -> list[AttemptRow]:
        """Every attempt (of one item), oldest first."""
        sql, args = "SELECT * FROM attempts", []
        if item_id is not None:
            sql, args = sql + " WHERE item = ?", [item_id]
        return [_attempt_row(row) for row in self._query(sql + " ORDER BY started, item, n", args)]

    # -- state changes (one transaction each) ----------------------------------------------------------

    def recover(self) -> int:
        """After a killed coordinator: attempts left running are interrupted, their items pending again."""
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET state = 'interrupted', finished = ? WHERE state = 'running'", (_now(),)
            )
            return db.execute(
                "UPDATE items SET state = 'pending', updated = ? WHERE state = 'running'", (_now(),)
            ).rowcount

    def start(self, item_id: str, seed: int | None, worker: str) -> int:
        """Mark the item running and open its next attempt; returns the attempt number."""
        with self._tx() as db:
            n = db.execute("SELECT attempts FROM items WHERE id = ?", (item_id,)).fetchone()[0] + 1
            db.execute(
                "UPDATE items SET state = 'running', attempts = ?, seed = ?, updated = ? WHERE id = ?",
                (n, seed, _now(), item_id),
            )
            db.execute(
                "INSERT INTO attempts (item, n, seed, state, started, worker)"
                " VALUES (?, ?, ?, 'running', ?, ?)",
                (item_id, n, seed, _now(), worker),
            )
            return n

    def finish(
        self,
        item_id: str,
        n: int,
        state: ItemState,
        *,
        output: str | None,
        qa: Mapping[str, Any],
        draft_rendered: bool,
        seconds: float,
        reroll: bool = False,
    ) -> None:
        """Close attempt ``n`` with its outcome; ``reroll``: it failed QA and goes again (pending)."""
        item_state = "pending" if reroll else state
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET state = ?, finished = ?, draft_rendered = ?, qa = ?, output = ?,"
                " seconds = ? WHERE item = ? AND n = ?",
                (state, _now(), int(draft_rendered), _json(qa), output, seconds, item_id, n),
            )
            db.execute(
                "UPDATE items SET state = ?, output = ?, qa = ?, reasons = ?, rerolls = rerolls + ?,"
                " updated = ? WHERE id = ?",
                (
                    item_state, output, _json(qa), _json(list(qa.get("reasons", ()))), int(reroll), _now(),
                    item_id,
                ),
            )  # fmt: skip

    def fail(
        self,
        item_id: str,
        n: int,
        state: Literal["failed", "blocked", "crashed"],
        *,
        error_class: str,
        stage: str,
        message: str,
        seconds: float = 0.0,
    ) -> ItemState:
        """Close attempt ``n`` as failed, blocked or crashed; returns the item's new state.

        A crash (the worker died) sends the item back to pending, or quarantines it as failed at
        MAX_CRASHES crashes."""
        with self._tx() as db:
            crashes = db.execute("SELECT crashes FROM items WHERE id = ?", (item_id,)).fetchone()[0]
            crashes += state == "crashed"
            if state == "crashed":
                item_state: ItemState = "failed" if crashes >= MAX_CRASHES else "pending"
                if item_state == "failed":
                    message += f" (quarantined: crashed {crashes} workers)"
            else:
                item_state = state
            db.execute(
                "UPDATE attempts SET state = ?, finished = ?, error_class = ?, stage = ?, message = ?,"
                " seconds = ? WHERE item = ? AND n = ?",
                (state, _now(), error_class, stage, message, seconds, item_id, n),
            )
            db.execute(
                "UPDATE items SET state = ?, crashes = ?, reasons = ?, updated = ? WHERE id = ?",
                (item_state, crashes, _json([message]), _now(), item_id),
            )
            return item_state

    def requeue(
        self, states: Iterable[str], item_ids: Iterable[str] | None = None, *, reroll: bool = False
    ) -> int:
        """Put items in ``states`` (or the given ones) back to pending; ``reroll``: with a new seed.

        Their crash count is cleared (a retry is a fresh chance); their attempts stay on record."""
        wanted = list(states)
        sql = (
            f"UPDATE items SET state = 'pending', crashes = 0, rerolls = rerolls + ?, updated = ?"
            f" WHERE state IN ({','.join('?' * len(wanted))})"
        )
        args: list[Any] = [int(reroll), _now(), *wanted]
        if item_ids is not None:
            ids = list(item_ids)
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            args += ids
        with self._tx() as db:
            return db.execute(sql, args).rowcount

    def set_favourite(self, item_id: str, favourite: bool = True) -> None:
        """Mark (or unmark) an item as a favourite."""
        with self._tx() as db:
            db.execute(
                "UPDATE items SET favourite = ?, updated = ? WHERE id = ?", (int(favourite), _now(), item_id)
            )

    # -- internals ----------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE: one writer at a time), committed or rolled back whole."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise _store_error(self.path, err) from err
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as err:
            raise _store_error(self.path, err) from err

    def _query(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        cursor = self._db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]  # type: ignore[misc]


def worker_name(extra: str = "") -> str:
    """``host:pid`` (plus a worker label): who ran an attempt."""
    return f"{socket.gethostname()}:{os.getpid()}{':' + extra if extra else ''}"


def _item_row(row: Mapping[str, Any]) -> ItemRow:
    return ItemRow(
        id=row["id"],
        position=row["position"],
        job=row["job"],
        kind=row["kind"],
        axes=json.loads(row["axes"]),
        request=json.loads(row["request"]),
        source=row["source"],
        draft_key=row["draft_key"],
        identities=tuple(json.loads(row["identities"])),
        state=row["state"],
        attempts=row["attempts"],
        rerolls=row["rerolls"],
        crashes=row["crashes"],
        seed=row["seed"],
        output=row["output"],
        qa=json.loads(row["qa"]) if row["qa"] else None,
        reasons=tuple(json.loads(row["reasons"])) if row["reasons"] else (),
        favourite=bool(row["favourite"]),
    )


def _attempt_row(row: Mapping[str, Any]) -> AttemptRow:
    values = dict(row)
    values["qa"] = json.loads(row["qa"]) if row["qa"] else None
    values["draft_rendered"] = bool(row["draft_rendered"])
    return AttemptRow(**values)


def _store_error(path: Path, err: sqlite3.Error) -> OutputError:
    return OutputError(
        f"The campaign store {path} cannot be written ({err}).",
        fix="check free disk space and permissions; another `campaign run` may hold it.",
    )


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
