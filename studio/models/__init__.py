"""Models: the catalogue, finding and verifying files, downloads, runtime choice, the load cache."""

from __future__ import annotations

import logging

from studio.config import StudioConfig
from studio.models.catalogue import Catalogue, load_catalogue

logger = logging.getLogger(__name__)


def open_catalogue(config: StudioConfig) -> Catalogue:
    """The merged catalogue for ``config``; on a tiny-kit profile the kit is built first if missing."""
    kit = config.models.tiny_kit
    if kit is not None and not (kit / "models.toml").is_file():
        from studio.models.tiny import make_tiny_kit  # torch/onnx builders: import only when needed

        logger.warning("building the tiny model kit in %s (first use, a few seconds)", kit)
        make_tiny_kit(kit)
    return load_catalogue(config.models)
