"""Provenance: how every output is marked as AI-generated and accounted for.

The output sink applies, in this order and nowhere else: a visible label (optional) → the invisible
watermark (payload from the recipe id) → PNG chunks (A1111 parameters, the recipe) → the C2PA signature
(last: any later byte change invalidates it) → an audit entry. ``verify`` reads all of it back.
Modules: ``watermark`` (invisible-watermark / RivaGAN), ``c2pa`` (Content Credentials, the local CA);
the audit log is ``studio.audit``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from studio.audit import AuditEntry, AuditLog
from studio.config import StudioConfig
from studio.types import ImageBGR

if TYPE_CHECKING:
    from studio.provenance.c2pa import SigningIdentity
    from studio.provenance.watermark import Watermarker

logger = logging.getLogger(__name__)

MARKING_OFF_NOTE = "provenance: {marks} turned off by configuration (recorded in the audit log)"


@dataclass(frozen=True)
class Marking:
    """What was applied to one output's pixels."""

    watermark: str  # the method, "off" (provenance.watermark = false) or "too-small"
    label: bool
    c2pa: bool

    @property
    def off(self) -> tuple[str, ...]:
        """The marks configuration turned off."""
        return tuple(m for m, on in (("watermark", self.watermark != "off"), ("c2pa", self.c2pa)) if not on)


@dataclass
class Provenance:
    """One Studio's marks: the watermarker and signing identity are made on first use and kept."""

    config: StudioConfig
    audit: AuditLog = field(init=False)
    _watermarker: Watermarker | None = field(default=None, init=False)
    _signer: SigningIdentity | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.config.audit.log)

    def mark(self, image: ImageBGR, recipe_id: str) -> tuple[ImageBGR, Marking]:
        """The picture with its label (when configured) and watermark, and what was applied."""
        settings = self.config.provenance
        if settings.label:
            image = _labelled(image, settings.label_text, settings.label_corner)
        method = "off"
        if settings.watermark:
            from studio.provenance.watermark import WatermarkTooSmall, payload_for

            try:
                image, method = (
                    self.watermarker.embed(image, payload_for(recipe_id)),
                    settings.watermark_method,
                )
            except WatermarkTooSmall as err:
                logger.warning("%s", err)
                method = "too-small"
        return image, Marking(method, settings.label, settings.c2pa)

    def seal(
        self,
        png: bytes,
        *,
        title: str,
        recipe_id: str,
        models: Mapping[str, str],
        identities: Mapping[str, str],
        edited: bool,
        parent: bytes | None,
        audit_head: str,
    ) -> bytes:
        """``png`` with signed C2PA Content Credentials (unchanged when provenance.c2pa is off)."""
        if not self.config.provenance.c2pa:
            return png
        from studio.provenance.c2pa import ManifestFacts, sign_png

        facts = ManifestFacts(
            title=title,
            edited=edited,
            models=dict(models),
            recipe_id=recipe_id,
            audit_head=audit_head,
            identities=dict(identities),
            parent=parent,
        )
        return sign_png(png, facts, self.signer)

    def record(self, *, path: str, data: bytes, recipe_id: str, identities: Mapping[str, str],
               marking: Marking, stages: tuple[str, ...], **facts: Any) -> AuditEntry:  # fmt: skip
        """The output's audit entry: its file's sha256, recipe id, identities (hashes), purpose, marks."""
        return self.audit.append(
            "output",
            identities=identities,
            path=path,
            sha256=hashlib.sha256(data).hexdigest(),
            recipe_id=recipe_id,
            purpose=self.config.consent.purpose,
            stages=list(stages),
            watermark=marking.watermark,
            c2pa=marking.c2pa,
            label=marking.label,
            marks_off=list(marking.off),
            **facts,
        )

    @property
    def watermarker(self) -> Watermarker:
        """The configured watermarker (built once)."""
        if self._watermarker is None:
            from studio.provenance.watermark import Watermarker

            self._watermarker = Watermarker.from_config(self.config)
        return self._watermarker

    @property
    def signer(self) -> SigningIdentity:
        """The configured signing key and chain, or the local CA's (created on first use)."""
        if self._signer is None:
            from studio.provenance.c2pa import signing_identity

            settings = self.config.provenance
            self._signer = signing_identity(settings.signing_key, settings.signing_chain, settings.data_dir)
        return self._signer


def _labelled(image: ImageBGR, text: str, corner: str) -> ImageBGR:
    """``image`` with ``text`` in a corner: white on a dark box, sized to the picture."""
    height, width = image.shape[:2]
    scale = max(0.3, min(width, height) / 900)
    thickness = max(1, round(scale * 2))
    (text_w, text_h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(6 * scale))
    box_w, box_h = min(width, text_w + 2 * pad), min(height, text_h + base + 2 * pad)
    x = width - box_w if corner.endswith("right") else 0
    y = height - box_h if corner.startswith("bottom") else 0
    out = np.ascontiguousarray(image).copy()
    region = out[y : y + box_h, x : x + box_w]  # hxwx3 BGR view
    region[:] = (region.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken to 40 %
    origin = (x + pad, y + box_h - pad - base)
    cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out
