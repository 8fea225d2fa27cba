"""Workarounds for third-party incompatibilities, each in exactly one place.

basicsr 1.4.2 (needed by realesrgan) imports ``torchvision.transforms.functional_tensor``, a private
module that torchvision 0.17 removed; its only use is ``rgb_to_grayscale``, which lives on in
``torchvision.transforms.functional``. We alias the old module name before basicsr is imported
instead of forking basicsr.

diffusers, transformers and peft print progress bars and developer warnings (component loading bars,
"LOAD REPORT ... newly initialized", "Already found a peft_config") from their own loggers and tqdm; in
library use the studio reports its own progress, so ``quiet_model_libraries`` mutes them while models load
and LoRAs switch (``--debug`` shows them: the CLI sets STUDIO_DEBUG_LIBRARIES).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import types
import warnings
from collections.abc import Iterator

_NOISY = ("diffusers", "transformers", "peft", "huggingface_hub")


def import_realesrgan() -> types.ModuleType:
    """Import ``realesrgan`` (and basicsr) on torchvision >= 0.17."""
    legacy = "torchvision.transforms.functional_tensor"
    if legacy not in sys.modules:
        try:
            importlib.import_module(legacy)
        except ModuleNotFoundError:
            from torchvision.transforms import functional

            shim = types.ModuleType(legacy)
            shim.rgb_to_grayscale = functional.rgb_to_grayscale  # type: ignore[attr-defined]
            sys.modules[legacy] = shim
    return importlib.import_module("realesrgan")


@contextlib.contextmanager
def quiet_model_libraries() -> Iterator[None]:
    """Mute third-party progress bars and warnings inside the block (not with STUDIO_DEBUG_LIBRARIES=1)."""
    if os.environ.get("STUDIO_DEBUG_LIBRARIES") == "1":
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in _NOISY]
    levels = [lg.level for lg in loggers]
    bars = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for module in bars:
        module.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for module in bars:
            module.enable_progress_bar()
