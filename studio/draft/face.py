"""Identity-conditioned drafts: the FACT adapter or IP-Adapter-FaceID on the draft pipeline.

FACT's fusers stay attached to the UNet between requests (they only run when a request passes face
context, so other requests get exactly the base model). FaceID's IP branch would need image embeddings on
every call, so a request without it *parks* FaceID (plain attention processors, no image projection, its
LoRA inactive: exactly the base model) and the next FaceID request restores it without a reload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.adapter import FaceAdapter, attach
from studio.adapter.ipadapter import (
    ParkedFaceID,
    ensure_converted,
    faceid_adapter_weights,
    faceid_embeds,
    faceid_loaded,
    load_faceid,
    park_faceid,
    restore_faceid,
    set_faceid_scale,
)
from studio.adapter.tokens import identity_condition
from studio.adapter.weights import load_adapter
from studio.config import StudioConfig
from studio.draft.request import FaceCondition

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class FaceState:
    """What is on one pipeline's UNet now (owned by its DraftPipeline, changed under its lock)."""

    fact: FaceAdapter | None = None  # the FACT adapter whose fusers are attached
    fact_loaded: dict[str, FaceAdapter] = field(default_factory=dict)  # by weights sha256
    faceid: str | None = None  # weights sha256 of the attached (or parked) IP-Adapter-FaceID
    parked: ParkedFaceID | None = None  # FaceID taken out of the forward by a request without it
    faceid_converted: dict[str, Path] = field(default_factory=dict)  # source sha256 -> safetensors


def prepare_face(
    pipe: Any, face: FaceCondition | None, family: str, state: FaceState, config: StudioConfig
) -> dict[str, float]:
    """Put ``pipe`` in the state ``face`` needs; returns peft adapters to keep active beside the LoRAs."""
    if (face is None or face.kind == "fact") and faceid_loaded(pipe):
        state.parked = park_faceid(pipe)  # its IP branch would demand image embeds; its weights stay
    if face is None:
        return {}
    if face.kind == "fact":
        if face.weights_sha256 not in state.fact_loaded:
            state.fact_loaded[face.weights_sha256] = load_adapter(
                face.weights,
                base_family=family,
                encoder_sha256=face.identity.recognizer_sha256,
                unet=pipe.unet,
            )
        adapter = state.fact_loaded[face.weights_sha256]
        if state.fact is not adapter:
            attach(adapter, pipe.unet)  # replaces any other FACT adapter's fusers
            state.fact = adapter
        return {}
    if face.weights_sha256 not in state.faceid_converted:  # hashing a 100 MB source once per content
        state.faceid_converted[face.weights_sha256] = ensure_converted(
            face.weights, config.models.dir / "converted"
        )
    if state.faceid == face.weights_sha256 and state.parked is not None:
        restore_faceid(pipe, state.parked, scale=face.scale)  # no reload
        state.parked = None
    elif state.faceid == face.weights_sha256 and faceid_loaded(pipe):
        set_faceid_scale(pipe, face.scale)
    else:
        state.parked = None  # another file (or none yet): load_faceid replaces whatever was there
        load_faceid(pipe, state.faceid_converted[face.weights_sha256], scale=face.scale)
        state.faceid = face.weights_sha256
    return faceid_adapter_weights(pipe)


def face_call_kwargs(
    pipe: Any, face: FaceCondition | None, state: FaceState, *, batch: int, cfg: bool
) -> dict[str, Any]:
    """The pipeline-call arguments that carry the identity for one batch of ``batch`` images."""
    if face is None:
        return {}
    if face.kind == "fact" and state.fact is not None:
        tokens, embedding = identity_condition(face.identity)  # (1, T, C), (1, 512): the fuser repeats rows
        context = state.fact.face_kwargs(tokens, embedding, scale=face.scale, cfg=cfg)
        return {"cross_attention_kwargs": context}
    embeds = faceid_embeds(
        face.identity.embedding, batch=batch, cfg=cfg, dtype=pipe.unet.dtype, device=pipe.unet.device
    )
    return {"ip_adapter_image_embeds": embeds}
