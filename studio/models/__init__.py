"""Models: the catalogue, finding and verifying files, downloads, runtime choice, the load cache."""

from __future__ import annotations

import logging
from pathlib import Path

from studio.config import StudioConfig
from studio.models.catalogue import KIT_CATALOGUE, Catalogue, load_catalogue

logger = logging.getLogger(__name__)


def open_catalogue(config: StudioConfig) -> Catalogue:
    """The merged catalogue for ``config``; on a tiny-kit profile the kit is built first if missing."""
    if config.models.tiny_kit is not None:
        ensure_tiny_kit(config.models.tiny_kit)
    return load_catalogue(config.models)


def ensure_tiny_kit(folder: Path) -> Path:
    """The tiny model kit in ``folder``, built there first if it has no catalogue yet; returns ``folder``."""
    folder = Path(folder)
    if not (folder / KIT_CATALOGUE).is_file():
        # the one production door to the kit builder (torch/onnx builders: imported only when needed)
        from studio.models.tiny import make_tiny_kit

        logger.warning("building the tiny model kit in %s (first use, a few seconds)", folder)
        make_tiny_kit(folder)
    return folder
