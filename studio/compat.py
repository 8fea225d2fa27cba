"""Workarounds for third-party incompatibilities, each in exactly one place.

basicsr 1.4.2 (needed by realesrgan) imports ``torchvision.transforms.functional_tensor``, a private
module that torchvision 0.17 removed; its only use is ``rgb_to_grayscale``, which lives on in
``torchvision.transforms.functional``. We alias the old module name before basicsr is imported
instead of forking basicsr.
"""

from __future__ import annotations

import importlib
import sys
import types


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
