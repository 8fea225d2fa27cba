"""Refine stage: detect faces, map identities, swap, upscale, blend back, check. One public entry: ``refine``.

``draft/`` and ``faces/`` never import each other; ``studio.pipeline`` is where they meet. The entry lives in
``stage.py``, the model loaders in ``loading.py``; both are re-exported here lazily, so that the light parts
(the identity library, its file format, face selection) can be imported without any model library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from studio.faces.loading import load_face_model, load_token_encoder
    from studio.faces.stage import FaceModels, RefineResult, load_face_models, refine, refine_models

__all__ = [
    "FaceModels",
    "RefineResult",
    "load_face_model",
    "load_face_models",
    "load_token_encoder",
    "refine",
    "refine_models",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        home = "loading" if name in ("load_face_model", "load_token_encoder") else "stage"
        return getattr(importlib.import_module(f"studio.faces.{home}"), name)
    raise AttributeError(f"module 'studio.faces' has no attribute {name!r}")
