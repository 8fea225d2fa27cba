"""What the stage API hands back: drafts and refined pictures with their recipes, and run summaries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from studio.faces.quality import FaceQA
from studio.imageio import to_pil
from studio.recipe import Recipe
from studio.types import ImageBGR


@dataclass(frozen=True, eq=False)
class Draft:
    """A rendered (or opened) picture and its recipe; ``source`` is the file it was opened from."""

    image: ImageBGR  # HxWx3 uint8 BGR
    recipe: Recipe
    source: Path | None = None

    @property
    def pil(self) -> Image.Image:
        """The picture as an RGB PIL image."""
        return to_pil(self.image)


@dataclass(frozen=True, eq=False)
class Refined:
    """A refined picture, its recipe, and what the refine did (``changed`` False: nothing was swapped)."""

    image: ImageBGR  # HxWx3 uint8 BGR
    recipe: Recipe
    status: str  # ok, failed_qa, no_faces, too_few_faces, index_out_of_range
    message: str
    qa: tuple[FaceQA, ...] = ()
    source: Path | None = None

    @property
    def changed(self) -> bool:
        """True when faces were swapped (whether or not they passed QA)."""
        return self.status in ("ok", "failed_qa")

    @property
    def pil(self) -> Image.Image:
        """The picture as an RGB PIL image."""
        return to_pil(self.image)

    @property
    def status_line(self) -> str:
        """The refine message plus each swapped face's identity similarity (after, and before)."""
        qa = "; ".join(
            f"face {q.face_index} similarity {q.similarity_after:.3f} (was {q.similarity_before:.3f})"
            + ("" if q.passed else " FAILED QA")
            for q in self.qa
        )
        return f"{self.message}{'; ' + qa if qa else ''}"


@dataclass(frozen=True)
class GenerateResult:
    """What a run wrote, each image's refine status, and how long each stage took."""

    run_id: str
    outputs: tuple[Path, ...]
    config_file: Path
    timings: dict[str, float]
    notes: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()  # one line per refined image: what the refine stage did
    unchanged: tuple[str, ...] = ()  # refines that changed nothing (no file written for them)
    failed_qa: tuple[Path, ...] = ()  # outputs that failed the QA gate after their re-rolls (failed-qa/)
    blocked: tuple[str, ...] = ()  # pictures the content check blocked (nothing written; in the audit log)


@dataclass(frozen=True)
class Reproduction:
    """A reproduced image, whether its pixels equal the original's, and what differs if they do not."""

    result: GenerateResult
    identical: bool
    differences: tuple[str, ...] = ()
