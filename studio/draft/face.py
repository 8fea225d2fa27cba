"""Identity-conditioned drafts: the FACT adapter or IP-Adapter-FaceID on the draft pipeline.

FACT's fusers stay attached to the UNet between requests (they only run when a request passes face
context, so other requests get exactly the base model); FaceID is loaded when a request asks for it and
unloaded otherwise, because its IP branch needs image embeddings on every call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.adapter import FaceAdapter, attach
from studio.adapter.ipadapter import (
    ensure_converted,
    faceid_adapter_weights,
    faceid_embeds,
    faceid_loaded,
    load_faceid,
    set_faceid_scale,
    unload_faceid,
)
from studio.adapter.tokens import identity_condition
from studio.adapter.weights import load_adapter
from studio.config import StudioConfig
from studio.models.cache import ModelCache
from studio.types import FaceAdapterKind, Identity

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FaceCondition:
    """Which adapter steers the draft toward which identity, and how strongly."""

    kind: FaceAdapterKind
    weights: Path  # the adapter file (FACT safetensors, or the public FaceID .bin / its safetensors)
    weights_sha256: str
    identity: Identity
    scale: float = 0.8


@dataclass(frozen=True, eq=False)
class PreparedFace:
    """What rendering needs after ``prepare_face``: the attached FACT adapter, adapters to keep active."""

    fact: FaceAdapter | None = None
    keep_active: dict[str, float] = field(default_factory=dict)  # peft adapters beside the request's LoRAs


def prepare_face(
    pipe: Any, face: FaceCondition | None, family: str, config: StudioConfig, cache: ModelCache
) -> PreparedFace:
    """Put ``pipe`` in the state ``face`` needs (attach FACT, or load FaceID, or neither)."""
    state: dict[str, Any] = cache.get(("face-state", id(pipe.unet)), dict)  # what is on this UNet now
    if face is None or face.kind == "fact":
        unload_faceid(pipe)  # a FaceID branch left from an earlier request would demand image embeds
        state.pop("faceid", None)
    if face is None:
        return PreparedFace()
    if face.kind == "fact":
        key = ("fact-adapter", face.weights_sha256, id(pipe.unet))
        adapter = cache.get(
            key,
            lambda: load_adapter(
                face.weights,
                base_family=family,
                encoder_sha256=face.identity.recognizer_sha256,
                unet=pipe.unet,
            ),
        )
        if state.get("fact") is not adapter:
            attach(adapter, pipe.unet)  # replaces any other FACT adapter's fusers
            state["fact"] = adapter
        return PreparedFace(fact=adapter)
    converted = cache.get(  # hashing a 100 MB source on every request is wasted work: once per content
        ("faceid-converted", face.weights_sha256),
        lambda: ensure_converted(face.weights, config.models.dir / "converted"),
    )
    if faceid_loaded(pipe) and state.get("faceid") == face.weights_sha256:
        set_faceid_scale(pipe, face.scale)
    else:
        load_faceid(pipe, converted, scale=face.scale)
        state["faceid"] = face.weights_sha256
    return PreparedFace(keep_active=faceid_adapter_weights(pipe))


def face_call_kwargs(
    pipe: Any, face: FaceCondition | None, prepared: PreparedFace, *, batch: int, cfg: bool
) -> dict[str, Any]:
    """The pipeline-call arguments that carry the identity for one batch of ``batch`` images."""
    if face is None:
        return {}
    if prepared.fact is not None:
        tokens, embedding = identity_condition(face.identity)  # (1, T, C), (1, 512): the fuser repeats rows
        context = prepared.fact.face_kwargs(tokens, embedding, scale=face.scale, cfg=cfg)
        return {"cross_attention_kwargs": context}
    embeds = faceid_embeds(
        face.identity.embedding, batch=batch, cfg=cfg, dtype=pipe.unet.dtype, device=pipe.unet.device
    )
    return {"ip_adapter_image_embeds": embeds}
