"""Downloading catalogued models: resumable, checksum-verified, atomic.

Bytes go to ``<target>.part``; an interrupted transfer is resumed with an HTTP Range request (here, and
on the next run of the same command). Only a file whose sha256 matches the catalogue is fsynced and
renamed into place, so the model folder never holds a truncated or unverified model.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from studio.config import ModelsConfig
from studio.errors import ChecksumError, DownloadError, ModelError
from studio.files import sha256_file
from studio.models.catalogue import ModelEntry
from studio.models.store import check, own_path

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def source_url(entry: ModelEntry) -> str:
    """The download URL of an entry; Hugging Face sources honour HF_ENDPOINT."""
    src = entry.source
    if src.hf_repo and src.hf_file:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        file = urllib.parse.quote(src.hf_file)
        return f"{endpoint}/{src.hf_repo}/resolve/{urllib.parse.quote(src.revision, safe='')}/{file}"
    if src.url:
        return src.url
    raise DownloadError(
        f"Model {entry.name!r} has a local source ({src.local}) and cannot be downloaded.",
        fix="build the tiny kit with `studio models make-tiny`.",
    )


def pull(
    entry: ModelEntry, models: ModelsConfig, *, progress: Progress | None = None, attempts: int = 3
) -> Path:
    """Download ``entry`` into the studio's model folder and verify it; returns the final path."""
    # 1. nothing to do when a verified copy exists
    target = _destination(entry, models)
    if check(entry, models).status == "present":
        logger.info("%s already present", entry.name)
        return target
    if entry.format != "file":
        raise DownloadError(f"Model {entry.name!r} is a folder; only single files can be pulled.")
    if entry.source.hf_repo and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DownloadError(
            f"Cannot download {entry.name!r}: HF_HUB_OFFLINE=1 forbids network access.",
            fix="unset HF_HUB_OFFLINE, or copy the file into a models.search_paths folder.",
        )
    # 2. transfer, resuming after interruptions
    url, part = source_url(entry), target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    for attempt in range(1, attempts + 1):
        done = _transfer(url, part, entry.size, progress)
        if done >= entry.size:
            break
        logger.warning("download of %s stopped at %d of %d bytes; resuming", entry.name, done, entry.size)
        time.sleep(0.2 * attempt)
    if done < entry.size:
        raise DownloadError(
            f"Download of {entry.name!r} stopped at {done} of {entry.size} bytes after {attempts} attempts.",
            fix=f"run `studio models pull {entry.name}` again: it resumes from {part.name}.",
        )
    # 3. verify, then move into place
    _verify_part(entry, part, url)
    os.replace(part, target)
    logger.info("pulled %s to %s", entry.name, target)
    return target


def _destination(entry: ModelEntry, models: ModelsConfig) -> Path:
    """Where ``entry`` is pulled to; it must stay inside its models sub-folder (the catalogue checks too)."""
    target = own_path(entry, models)
    folder = Path(os.path.abspath(models.dir / entry.kind))  # lexical: a symlinked kind folder is fine
    final = Path(os.path.abspath(target))  # "..", "/abs" and "" in the filename show up here
    if final.parent != folder:
        raise ModelError(
            f"Model {entry.name!r}: filename {entry.filename!r} would be written to {final}, "
            f"outside the models folder {folder}.",
            fix="make the catalogue entry's filename a plain file name.",
        )
    return target


def _transfer(url: str, part: Path, total: int, progress: Progress | None) -> int:
    """Append what the server sends to ``part``; returns the bytes now in it. HTTP errors are final."""
    done = part.stat().st_size if part.exists() else 0
    if done >= total:
        return done
    request = urllib.request.Request(url, headers=_headers(done))
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"Download of {url} failed: HTTP {err.code} {err.reason}.",
            fix="check the catalogue source, your network, and HF_TOKEN for gated repositories.",
        ) from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"Cannot reach {url}: {err}.", fix="check the network and try again.") from err
    with response:
        if response.status != 206:
            done = 0  # the server ignored the Range request: start over
        with open(part, "ab" if done else "wb") as handle:
            done = _copy(response, handle, done, total, progress)
            handle.flush()
            os.fsync(handle.fileno())
    return done


def _copy(
    response: http.client.HTTPResponse, handle: BinaryIO, done: int, total: int, progress: Progress | None
) -> int:
    try:
        while chunk := response.read(_CHUNK):
            handle.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    except (http.client.IncompleteRead, OSError) as err:
        logger.debug("connection lost after %d bytes: %s", done, err)
    return done


def _headers(offset: int) -> dict[str, str]:
    headers = {"User-Agent": "portrait-studio"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _verify_part(entry: ModelEntry, part: Path, url: str) -> None:
    size, got = part.stat().st_size, sha256_file(part)
    if got != entry.sha256 or size != entry.size:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"Downloaded {entry.name!r} from {url} has sha256 {got[:16]}… and {size} bytes; the "
            f"catalogue expects {entry.sha256[:16]}… and {entry.size} bytes. The file was discarded.",
            fix="the source changed or is wrong: fix the catalogue entry or the source URL.",
        )
