"""Atomic file writes and checksums: every file the studio writes goes through here."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from studio.errors import OutputError

_CHUNK = 1 << 20
_FILE_MODE = 0o644
_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "host"
TEMP_MARK = "~studio-tmp"  # every temp file of ours: .<name>~studio-tmp~<host>~<pid>~<random>
_TEMP = re.compile(rf"^\..+{TEMP_MARK}~(?P<host>[^~]+)~(?P<pid>\d+)~[^~]+$")
_STALE_FOREIGN_S = 24 * 3600  # a temp file of another host's process is stale after a day


@contextlib.contextmanager
def atomic_writer(path: Path, *, exclusive: bool = False, mode: int = _FILE_MODE) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only once fully written and fsynced.

    ``exclusive``: never replace an existing ``path`` (FileExistsError instead; the rename is a hard link,
    atomic and no-clobber, so two processes can never overwrite each other). On any exception the temp
    file is removed and ``path`` is left as it was; an OSError becomes a one-line OutputError.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}{TEMP_MARK}~{_HOST}~{os.getpid()}~"
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        tmp = Path(tmp_name)
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs and models are shared files (0644)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _commit(tmp, path, exclusive)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno is None:  # not the file system's: e.g. an encoder writing into the file failed
            raise
        raise _output_error(path, err) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _commit(tmp: Path, path: Path, exclusive: bool) -> None:
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with FileExistsError if path exists: no check-then-replace race
    except FileExistsError:
        raise
    except OSError as err:  # a filesystem without hard links (some SMB/FUSE shares): claim, then fill;
        # a crash between the two leaves an empty file at the name, never a truncated image
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
        os.replace(tmp, path)


def _output_error(path: Path, err: OSError) -> OutputError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the folder is on a read-only file system",
    }.get(err.errno or 0, err.strerror or str(err))
    return OutputError(
        f"Could not write {path}: {reason}; nothing partial was left.",
        fix="free disk space or make the folder writable (or choose another), then run again.",
    )


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files of ours (own naming only) whose writer is gone (a dead local process, or old),
    in ``folder`` and its immediate subfolders (where a run also writes: ``failed-qa/``, ``drafts/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        folders = [folder, *(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))]
    removed = []
    for path in (found for sub in folders for found in sub.glob(f".*{TEMP_MARK}~*")):
        match = _TEMP.match(path.name)
        if match is None or (match["host"] == _HOST and _alive(int(match["pid"]))):
            continue
        with contextlib.suppress(OSError):
            if match["host"] == _HOST or time.time() - path.stat().st_mtime > _STALE_FOREIGN_S:
                path.unlink()
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """(size, mtime, inode) of ``path``, () when it is missing: what any change to it alters (a rewrite in
    place changes the mtime, an atomic replace the inode). One ``os.stat``: checked on every refine."""
    try:
        stat = os.stat(path)
    except OSError:
        return ()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def write_bytes_atomic(path: Path, data: bytes, mode: int = _FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically (file ``mode``: 0644 unless told otherwise)."""
    with atomic_writer(path, mode=mode) as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename on POSIX; directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_sha256(folder: Path) -> str:
    """Checksum of a folder: sha256 over its sorted ``relative/path\\0<file sha256>`` lines."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def tree_size(path: Path) -> int:
    """Size in bytes of a file, or of every file below a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
