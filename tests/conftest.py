"""Shared fixtures: one tiny model kit per test session, offline Hugging Face settings."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as studio.batch.ray_engine: see UV_HOOK there


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: the tiny models gain nothing from intra-op threads and lose a lot on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a socket fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny faithful model kit built once for the whole session."""
    from studio.models.tiny import make_tiny_kit

    return make_tiny_kit(tmp_path_factory.mktemp("kit") / "tiny-kit")


@pytest.fixture
def tiny_overrides(tiny_kit: Path, tmp_path: Path) -> list[str]:
    """--set overrides for the tiny profile: this session's kit, a private models and output folder."""
    return tiny_overrides_in(tiny_kit, tmp_path)


def tiny_overrides_in(kit: Path, work: Path) -> list[str]:
    """The tiny profile on ``kit`` with its models, outputs, audit log and signing CA under ``work``."""
    return [
        f"models.tiny_kit={str(kit)!r}",
        f"models.dir={str(work / 'models')!r}",
        f"output_dir={str(work / 'out')!r}",
        *private_overrides(work),
    ]


def private_overrides(work: Path) -> list[str]:
    """A test's own audit log and signing CA (never the user's), and no marks (see UNMARKED)."""
    return [
        f"audit.log={str(work / 'audit' / 'audit.jsonl')!r}",
        f"provenance.data_dir={str(work / 'studio-data')!r}",
        *UNMARKED,
    ]


# Most tests compare pixels between outputs: they run without the watermark and the C2PA signature (each
# output's audit entry says so). tests/test_provenance.py runs the studio with every mark on.
UNMARKED = ("provenance.watermark=false", "provenance.c2pa=false")
