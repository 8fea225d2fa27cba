"""What every refine of one picture shares, computed once: its faces, their embeddings, and per face and crop
layout the alignment, the original crop, its blend mask (occlusion and parser regions included) and its
colour statistics.

Everything here depends on the target picture alone, never on the identity, so K identities (or slot maps)
applied to one draft pay for detection, embedding and masks once. Analyses are kept in a small LRU of
recent pictures keyed by a digest of their pixels (see :func:`analyse_picture`); the crops themselves are
cut from the picture each caller passes in, which has those very pixels.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from studio.config import DetectConfig, MaskConfig
from studio.faces.blend import ColourStats, colour_stats
from studio.faces.detect import ARCFACE_SIZE, EMBEDDING_SIZE, detect_faces, embed_crops
from studio.faces.masks import MaskModel, face_mask
from studio.geometry import AlignTemplate, estimate_alignment, rescale_affine, warp_to_crop
from studio.models.cache import ModelCache, Recent
from studio.types import Affine, Face, ImageBGR, Mask

ANALYSED_PICTURES = 4  # pictures whose analyses are kept: the identities of one draft come one after another
# The side each template's models read (inswapper 128, GFPGAN/CodeFormer 512); larger crops of a face are
# upscales of that one, so their affines are rescaled from it (the upscaler's half-pixel convention).
_TEMPLATE_SIDES: dict[AlignTemplate, int] = {"arcface": 128, "ffhq": 512}


@dataclass(eq=False)
class PictureAnalysis:
    """One picture's faces (left to right), their (N, 512) L2-normed embeddings, and lazily kept crops."""

    faces: tuple[Face, ...]
    embeddings: npt.NDArray[np.float32]
    _kept: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, image: ImageBGR, faces: tuple[Face, ...], recognizer: Any) -> PictureAnalysis:
        """The analysis of ``faces`` in ``image``, embedded (one batch) from the 112-px ArcFace crops it then
        keeps, with their alignments: the QA crops of every later refine are cut with those same affines."""
        analysis = cls(faces, np.empty((0, EMBEDDING_SIZE), dtype=np.float32))
        crops = [analysis.original(image, index, "arcface", ARCFACE_SIZE) for index in range(len(faces))]
        analysis.embeddings = embed_crops(crops, recognizer)  # (N, 512) L2-normed
        return analysis

    def alignment(self, index: int, template: AlignTemplate, size: int) -> Affine:
        """Face ``index``'s affine onto ``template`` in a ``size``-px crop (sizes above the template's own
        side, e.g. an upscaled 256-px swap crop, rescale the 128-px one: the same content, sharper)."""
        return self._keep(("affine", index, template, size), lambda: self._affine(index, template, size))

    def original(self, image: ImageBGR, index: int, template: AlignTemplate, size: int) -> ImageBGR:
        """Face ``index``'s aligned crop of the analysed picture (read-only)."""
        return self._keep(
            ("crop", index, template, size),
            lambda: _frozen(warp_to_crop(image, self.alignment(index, template, size), size)),
        )

    def mask(
        self,
        image: ImageBGR,
        index: int,
        template: AlignTemplate,
        size: int,
        settings: MaskConfig,
        models: tuple[MaskModel | None, MaskModel | None],
    ) -> Mask:
        """The blend mask of face ``index`` (box/ellipse ∩ occlusion ∩ regions), from its original crop."""
        occluder, parser = models
        return self._keep(
            ("mask", index, template, size, settings, models),  # the models themselves: kept alive by the key
            lambda: _frozen(
                face_mask(
                    self.original(image, index, template, size), settings, occluder=occluder, parser=parser
                )
            ),
        )

    def colour(
        self,
        image: ImageBGR,
        index: int,
        template: AlignTemplate,
        size: int,
        settings: MaskConfig,
        models: tuple[MaskModel | None, MaskModel | None],
    ) -> ColourStats | None:
        """The original crop's YCbCr mean and std inside its :meth:`mask` (the colour-match target)."""
        return self._keep(
            ("colour", index, template, size, settings, models),
            lambda: colour_stats(
                self.original(image, index, template, size),
                self.mask(image, index, template, size, settings, models),
            ),
        )

    def _affine(self, index: int, template: AlignTemplate, size: int) -> Affine:
        landmarks = self.faces[index].landmarks
        base = _TEMPLATE_SIDES[template]
        if size <= base:
            return estimate_alignment(landmarks, size, template)
        return rescale_affine(self.alignment(index, template, base), size / base)

    def _keep(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._kept:
                return self._kept[key]
        value = make()  # outside the lock: a mask may run a model; a racing twin computes the same value
        with self._lock:
            return self._kept.setdefault(key, value)


def analyse_picture(
    image: ImageBGR,
    detector: Any,
    recognizer: Any,
    recognizer_sha256: str,
    settings: DetectConfig,
    cache: ModelCache,
) -> PictureAnalysis:
    """The picture's analysis, computed once: every identity and slot map applied to one draft shares it."""
    # every refine of the picture hashes it (so a changed picture never reuses another's faces): SHA-256 runs
    # on the CPU's SHA extensions where present, about twice as fast as BLAKE2b on a 1024² picture
    digest = hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()  # no copy
    key = (digest, image.shape, id(detector), recognizer_sha256, settings)
    recent = cache.get(("face-analyses",), lambda: Recent(ANALYSED_PICTURES))
    found = recent.get(key)
    if found is None:
        faces = detect_faces(image, detector, settings)
        found = recent.put(key, PictureAnalysis.of(image, faces, recognizer))
    return found


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False  # shared by every later refine of the picture: nobody may change it
    return array
