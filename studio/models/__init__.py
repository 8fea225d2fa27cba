"""Models: the catalogue, finding and verifying files, downloads, runtime choice, the load cache."""

from __future__ import annotations

import logging
from pathlib import Path

from studio.config import StudioConfig
from studio.models.catalogue import KIT_CATALOGUE, KIT_VERSION, KIT_VERSION_FILE, Catalogue, load_catalogue

logger = logging.getLogger(__name__)


def open_catalogue(config: StudioConfig) -> Catalogue:
    """The merged catalogue for ``config``; on a tiny-kit profile the kit is built first if missing."""
    if config.models.tiny_kit is not None:
        ensure_tiny_kit(config.models.tiny_kit)
    return load_catalogue(config.models)


def ensure_tiny_kit(folder: Path) -> Path:
    """The tiny model kit in ``folder``, built there first if it has none, or one older than this release's
    (a kit gains models as the studio does); returns ``folder``."""
    folder = Path(folder)
    if not kit_is_current(folder):
        # the one production door to the kit builder (torch/onnx builders: imported only when needed)
        from studio.models.tiny import make_tiny_kit

        logger.warning("building the tiny model kit in %s (first use, a few seconds)", folder)
        make_tiny_kit(folder)  # rebuilds an older kit too: it is not current
    return folder


def kit_is_current(folder: Path) -> bool:
    """Whether ``folder`` holds a tiny kit built by this release's kit builder."""
    try:
        version = (Path(folder) / KIT_VERSION_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return version == KIT_VERSION and (Path(folder) / KIT_CATALOGUE).is_file()
