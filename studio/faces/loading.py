"""Loading the refine models once per process (one ModelCache, passed explicitly), on the configured
ONNX Runtime providers and threads; torch for the Real-ESRGAN upscaler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from studio.adapter.tokens import FaceTokenEncoder
from studio.config import StudioConfig
from studio.errors import ModelError
from studio.faces.upscale import Upscaler, load_upscaler
from studio.models.cache import ModelCache
from studio.models.resolve import ResolvedModel
from studio.models.runtime import choose_device, create_session, load_insightface_model, onnx_providers

T = TypeVar("T")


def load_face_model(model: ResolvedModel, config: StudioConfig, cache: ModelCache) -> Any:
    """One insightface model (detector, recognizer or swapper), loaded once per process."""
    return _on_onnx_runtime("insightface", load_insightface_model, model, config, cache)


def load_onnx_model(model: ResolvedModel, config: StudioConfig, cache: ModelCache) -> Any:
    """A plain ONNX Runtime session (occluder, parser, enhancer), created once per process."""
    return _on_onnx_runtime("onnx", create_session, model, config, cache)


def load_token_encoder(model: ResolvedModel, config: StudioConfig, cache: ModelCache) -> FaceTokenEncoder:
    """The recognizer graph with its face-token output exposed (for enrolment), built once per process."""
    return _on_onnx_runtime("face-tokens", FaceTokenEncoder, model, config, cache)


def _on_onnx_runtime(
    kind: str,
    make: Callable[[Path, list[str], int], T],
    model: ResolvedModel,
    config: StudioConfig,
    cache: ModelCache,
) -> T:
    """``make(path, providers, threads)`` on the configured providers and threads, once per process."""
    providers, threads = onnx_providers(config.runtime.onnx_providers), config.runtime.threads
    key = (kind, model.sha256, tuple(providers), threads)
    return cache.get(key, lambda: make(model.path, providers, threads))


def load_upscaler_model(model: ResolvedModel, config: StudioConfig, cache: ModelCache) -> Upscaler:
    """The catalogued Real-ESRGAN upscaler (its architecture comes from the catalogue entry)."""
    device = choose_device(config.runtime.device)
    if model.entry is None:
        raise ModelError(
            f"The upscaler {model.ref!r} is not catalogued; its architecture comes from the catalogue.",
            fix="catalogue it in configs/models.toml (see realesrgan_x2plus) and name that entry.",
        )
    entry = model.entry
    return cache.get(
        ("upscaler", model.sha256, str(device), config.refine.upscale_tile),
        lambda: load_upscaler(
            entry, model.path, tile=config.refine.upscale_tile, device=device, half=device.type == "cuda"
        ),
    )
