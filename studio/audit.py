"""The audit log: every identity enrolment, use, revocation and removal, and every output, in order.

An append-only JSONL file. Each entry carries the hash of the one before it (``prev``) and its own
``hash`` (sha256 of its canonical JSON without ``hash``), so an edited, removed or reordered entry breaks
the chain (``verify``); every output's C2PA manifest carries the head hash at the time it was written, so a
cut tail is detected against any later output. Appends hold an exclusive file lock and are fsynced. Entries
hold names, purposes and hashes (identity files, recipes, outputs), never images or embeddings. The file is
0600 in a 0700 folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from studio.errors import OutputError

logger = logging.getLogger(__name__)

GENESIS = "0" * 64  # the ``prev`` of the first entry
_TAIL = 1 << 16  # bytes read from the end to find the last entry (entries are far smaller)


@dataclass(frozen=True)
class AuditEntry:
    """One line of the log."""

    seq: int
    time: str  # ISO-8601 UTC
    event: str  # enrol, revoke, remove, output, blocked
    identities: Mapping[str, str] = field(default_factory=dict)  # name -> identity file sha256
    data: Mapping[str, Any] = field(default_factory=dict)  # hashes and facts, never biometrics
    prev: str = GENESIS
    hash: str = ""

    def digest(self) -> str:
        """sha256 of the entry's canonical JSON without its own hash."""
        body = {k: v for k, v in asdict(self).items() if k != "hash"}
        return hashlib.sha256(_canonical(body).encode()).hexdigest()


@dataclass(frozen=True)
class AuditCheck:
    """What ``verify`` found: the entries read, the head hash, and every break in the chain."""

    entries: int
    head: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the chain is intact."""
        return not self.problems


class AuditLog:
    """The log at ``path`` (created with its folder on the first append)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()

    def append(self, event: str, *, identities: Mapping[str, str] | None = None, **data: Any) -> AuditEntry:
        """Append one entry (under an exclusive lock, fsynced) and return it."""
        with self._locked() as handle:
            last = _last_entry(handle, self.path)
            entry = AuditEntry(
                seq=0 if last is None else last.seq + 1,
                time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                event=event,
                identities=dict(identities or {}),
                data=data,
                prev=GENESIS if last is None else last.hash,
            )
            entry = AuditEntry(**{**asdict(entry), "hash": entry.digest()})
            handle.seek(0, os.SEEK_END)
            handle.write((_canonical(asdict(entry)) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        return entry

    def head(self) -> str:
        """The hash of the last entry (GENESIS for an empty or missing log)."""
        if not self.path.is_file():
            return GENESIS
        with open(self.path, "rb") as handle:
            last = _last_entry(handle, self.path)
        return GENESIS if last is None else last.hash

    def entries(self, identity: str | None = None) -> list[AuditEntry]:
        """Every entry in order (only those naming ``identity``, if given)."""
        found = [entry for _, entry in self._read()]
        return [e for e in found if identity is None or identity in e.identities]

    def find(self, recipe_id_prefix: str) -> list[AuditEntry]:
        """Output entries whose recipe id starts with ``recipe_id_prefix``."""
        return [e for e in self.entries() if str(e.data.get("recipe_id", "")).startswith(recipe_id_prefix)]

    def verify(self) -> AuditCheck:
        """Check every entry's hash and the chain: an edited, removed or reordered entry is a problem."""
        problems, prev, count = [], GENESIS, 0
        for number, entry in self._read(strict=False):
            count += 1
            if entry is None:
                problems.append(f"line {number}: not a readable entry")
                continue
            if entry.digest() != entry.hash:
                problems.append(
                    f"line {number} (seq {entry.seq}): its content does not match its hash (edited)"
                )
            if entry.prev != prev:
                problems.append(
                    f"line {number} (seq {entry.seq}): does not follow the entry before it "
                    "(an entry was removed, inserted or reordered)"
                )
            if entry.seq != count - 1:
                problems.append(f"line {number}: sequence number {entry.seq}, expected {count - 1}")
            prev = entry.hash
        return AuditCheck(count, prev, tuple(problems))

    def contains(self, entry_hash: str) -> bool:
        """Whether an entry with this hash is in the log (GENESIS counts: the log was empty then)."""
        return entry_hash == GENESIS or any(e.hash == entry_hash for e in self.entries())

    # -- internals ------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as err:
            raise OutputError(
                f"Cannot open the audit log {self.path} ({err.strerror}).",
                fix="check the folder's permissions and free space, or set audit.log to a writable path.",
            ) from err
        with os.fdopen(descriptor, "r+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self, strict: bool = True) -> Iterator[tuple[int, Any]]:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                entry = _parse(line)
                if entry is None and strict:
                    raise OutputError(
                        f"The audit log {self.path} has an unreadable line {number}.",
                        fix="run `studio audit verify` to see what was changed.",
                    )
                yield number, entry


def _last_entry(handle: Any, path: Path) -> AuditEntry | None:
    """The last entry of an open log (read from its tail)."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - _TAIL))
    lines = [line for line in handle.read().splitlines() if line.strip()]
    if not lines:
        return None
    entry = _parse(lines[-1].decode("utf-8", "replace"))
    if entry is None:
        raise OutputError(
            f"The audit log {path} ends with an unreadable line; nothing more is appended to it.",
            fix="run `studio audit verify` and restore the log from a backup.",
        )
    return entry


def _parse(line: str) -> AuditEntry | None:
    try:
        data = json.loads(line)
        return AuditEntry(**data)
    except (json.JSONDecodeError, TypeError):
        return None


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
