"""Offline diffusers configs for real SD 1.5 and SDXL single-file checkpoints.

``from_single_file(checkpoint, config=folder, local_files_only=True)`` builds each pipeline component
from the model repo's config files. ``configs/base/<name>/`` ships those files verbatim from the public
repos (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``)
except the tokenizers' 1.5 MB ``vocab.json`` / ``merges.txt``: ``ensure_base_config`` rebuilds those,
byte for byte, from the CLIP BPE list in the ``open_clip_torch`` wheel, so no hub access is ever needed.

The names are the catalogue's model kinds: ``ensure_base_config(entry.kind, cache_dir)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast, get_args

from studio.config import shipped_dir
from studio.errors import ConfigError, ModelError
from studio.files import tree_sha256, write_bytes_atomic, write_text_atomic
from studio.models.tokenizer import write_tokenizer

logger = logging.getLogger(__name__)

BaseConfigName = Literal["sd15", "sdxl"]
BASE_CONFIG_NAMES: tuple[BaseConfigName, ...] = get_args(BaseConfigName)
TOKENIZER_FOLDERS: dict[BaseConfigName, tuple[str, ...]] = {
    "sd15": ("tokenizer",),
    "sdxl": ("tokenizer", "tokenizer_2"),
}
# sha256 of tokenizer/vocab.json and merges.txt in both upstream repos (the same two files in each).
VOCAB_SHA256 = "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349"
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
_STAMP = ".studio-base-config"  # written last; holds the tree sha256 of the shipped folder it was built from


def ensure_base_config(name: str, cache_dir: Path, *, shipped: Path | None = None) -> Path:
    """The complete config folder for real ``name`` checkpoints, built once in ``cache_dir/name``."""
    # 1. check the name and find the shipped configs (default: the studio's configs/base/<name>)
    kind = _check_name(name)
    source = _shipped_folder(kind, shipped)
    target = Path(cache_dir) / kind
    digest = tree_sha256(source)
    # 2. already built from these very configs: nothing to do
    if _is_complete(target, kind, digest):
        return target
    # 3. stage a copy plus the rebuilt vocabulary, then swap it in whole
    vocab, merges = _tokenizer_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{kind}.", suffix=".tmp", dir=target.parent))
    try:
        shutil.copytree(source, stage, dirs_exist_ok=True)
        stage.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary config folder
        for folder in TOKENIZER_FOLDERS[kind]:
            write_bytes_atomic(stage / folder / "vocab.json", vocab)
            write_bytes_atomic(stage / folder / "merges.txt", merges)
        write_text_atomic(stage / _STAMP, digest + "\n")
        _swap_in(stage, target, lambda: _is_complete(target, kind, digest))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("offline %s base config written to %s", kind, target)
    return target


def _check_name(name: str) -> BaseConfigName:
    """``name`` as a known base model, or a ConfigError listing the known ones."""
    if name not in BASE_CONFIG_NAMES:
        raise ConfigError(
            f"no offline base config for model kind {name!r}; "
            f"expected one of {', '.join(BASE_CONFIG_NAMES)}.",
            fix="give the model's own diffusers config folder as its catalogue 'config'",
        )
    return cast(BaseConfigName, name)


def _shipped_folder(name: BaseConfigName, shipped: Path | None) -> Path:
    """``shipped/name``, by default the studio's ``configs/base/name``; it must hold a model_index.json."""
    source = (Path(shipped) if shipped is not None else shipped_dir("configs") / "base") / name
    if not (source / "model_index.json").is_file():
        raise ConfigError(
            f"the offline {name} base config is missing: {source / 'model_index.json'} does not exist.",
            fix="restore configs/base/ from the studio's sources (or reinstall portrait-studio)",
        )
    return source


def _is_complete(target: Path, name: BaseConfigName, digest: str) -> bool:
    """True when ``target`` was fully built from shipped configs with tree sha256 ``digest``."""
    stamp = target / _STAMP
    if not stamp.is_file() or stamp.read_text(encoding="utf-8").strip() != digest:
        return False
    folders = TOKENIZER_FOLDERS[name]
    return all((target / f / part).is_file() for f in folders for part in ("vocab.json", "merges.txt"))


def _tokenizer_files() -> tuple[bytes, bytes]:
    """``vocab.json`` and ``merges.txt`` exactly as upstream ships them, checked against their sha256."""
    with tempfile.TemporaryDirectory(prefix="studio-clip-bpe-") as scratch:
        write_tokenizer(Path(scratch))
        vocab_map = json.loads((Path(scratch) / "vocab.json").read_text(encoding="utf-8"))
        merges = (Path(scratch) / "merges.txt").read_bytes()
    # upstream's layout: keys sorted, 2-space indent, raw UTF-8, trailing newline
    vocab = (json.dumps(vocab_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    for label, data, expected in (("vocab.json", vocab, VOCAB_SHA256), ("merges.txt", merges, MERGES_SHA256)):
        if hashlib.sha256(data).hexdigest() != expected:
            raise ModelError(
                f"the CLIP {label} rebuilt from open_clip's BPE list does not match the SD tokenizer's "
                f"(sha256 {hashlib.sha256(data).hexdigest()}, expected {expected}).",
                fix="install the open_clip_torch version pinned in pyproject.toml",
            )
    return vocab, merges


def _swap_in(stage: Path, target: Path, done_by_other: Callable[[], bool]) -> None:
    """Move the finished ``stage`` to ``target``; an outdated ``target`` is replaced, a current one kept."""
    if done_by_other():  # another process finished first: keep its folder
        return
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(stage, target)
    except OSError:
        if not done_by_other():  # lost a race to a process that left something unusable
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
