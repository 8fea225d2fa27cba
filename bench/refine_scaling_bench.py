"""How the refine stage scales: identities per draft, and faces per picture (tiny kit, one process).

    uv run python bench/refine_scaling_bench.py [--repeats 6] [--threads 1]

(a) K identities on one draft: a fresh tiny draft (64x64) refined to 1 identity, against a fresh draft
    refined to 8 identities one after another (``Studio.refine`` K times, as a campaign's items that share a
    draft do). Faces and their embeddings are computed once per picture and shared by every later refine
    of the same pixels; what each further identity costs is its swap, blend, QA embedding and recipe.
    Target (issue "Performance"): K=8 <= 2.0x K=1.
(b) N faces in one picture: ``faces.refine`` with select="all" on a 1024x512 picture holding 1 or 8 faces.
    The tiny detector is a fixture that always reports exactly one face, so this part puts a stand-in in
    its place that reports N faces on a grid. Whole refine (the target): the stand-in first runs the real
    detector on the picture (its true cost, the same for 1 face or 8) and then reports the grid. After
    detection (a stricter figure, also printed): the stand-in alone, whose cost is nil, so the ratio covers
    only what follows detection (the faces' embeddings in one batch, N swaps — inswapper's graph has a fixed
    batch of 1 —, N blends, the QA embeddings in one batch). Target: 8 faces <= 4x one face.
Both with upscaling off (refine.upscale = "off"), timed by ``_common.interleave`` (A B B A blocks, the
median paired ratio) with an A/A arm (the reference's own work).
RESULT keys: k8_over_k1, faces8_over_faces1 (whole refine), faces8_over_faces1_after_detection, aa_pct.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
from _common import bench_args, grid_faces, interleave, work_overrides
from skimage import data

import studio.faces.analysis as analysis
import studio.faces.stage as stage
from studio.config import DetectConfig, load_config
from studio.faces.select import Cast
from studio.imageio import write_image
from studio.models.tiny import make_tiny_kit
from studio.pipeline import Studio
from studio.request import GenerateRequest
from studio.types import Face, ImageBGR

NAMES = [f"p{i}" for i in range(8)]


def main() -> None:
    args = bench_args(__doc__)
    work = Path(tempfile.mkdtemp(prefix="refine-scaling-"))
    kit = make_tiny_kit(work / "kit")
    overrides = [*work_overrides(args, work, kit), "refine.upscale='off'"]
    studio = Studio(load_config("tiny", overrides=overrides))
    photo = work / "photo.png"
    write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))
    for name in NAMES:
        studio.enrol(name, [photo], consent="bench fixture")

    # (a) identities per draft: every timing gets a draft whose faces were never analysed
    drafts = iter(studio.draft(GenerateRequest("a lighthouse keeper", count=12 * args.repeats + 4)))
    studio.refine(next(drafts), NAMES[0])  # warm: models loaded

    def identities(k: int) -> Callable[[], float]:
        def run() -> float:
            draft = next(drafts)
            start = time.perf_counter()
            for name in NAMES[:k]:
                studio.refine(draft, name)
            return time.perf_counter() - start

        return run

    got = interleave({"k8": identities(8), "A/A": identities(1)}, identities(1), args.repeats)
    k8_ratio, k1, aa_k = got["k8"].ratio, got["k8"].reference_ms, got["A/A"].pct

    # (b) faces per picture, detection replaced by the stand-in (see the docstring)
    canvas = cv2.resize(data.astronaut()[:, :, ::-1], (1024, 512))
    setup = studio._refine_setup(Cast.parse(NAMES[0], select="all"))
    faces = {"count": 1, "detect": True}
    detect = analysis.detect_faces

    def stand_in(image: ImageBGR, detector: Any, settings: DetectConfig) -> tuple[Face, ...]:
        if faces["detect"]:
            detect(image, detector, settings)  # the real detector's cost on this picture; its one face unused
        return grid_faces(faces["count"])

    analysis.detect_faces = stand_in
    serial = iter(range(10**9))

    def pictures(count: int, detection: bool) -> Callable[[], float]:
        def run() -> float:
            faces["count"], faces["detect"] = count, detection
            picture = canvas.copy()
            picture[0, 0, :2] = divmod(next(serial) % 65536, 256)  # new pixels: no analysis is reused
            start = time.perf_counter()
            result = stage.refine(picture, setup.cast, setup.identities, setup.models, setup.settings,
                                  studio.cache)  # fmt: skip
            elapsed = time.perf_counter() - start
            assert result.status in ("ok", "failed_qa") and len(result.qa) == count, result.message
            return elapsed

        return run

    figures = {}
    for detection in (True, False):
        pictures(8, detection)()
        arms = {"f8": pictures(8, detection), "A/A": pictures(1, detection)}
        got = interleave(arms, pictures(1, detection), args.repeats)
        figures[detection] = (got["f8"].ratio, got["f8"].reference_ms, got["A/A"].pct)
    (f8_ratio, f1, aa_f), (f8_after, f1_after, aa_after) = figures[True], figures[False]
    aa = max(abs(aa_k), abs(aa_f), abs(aa_after))
    print(f"tiny kit, upscaling off, {args.threads} thread(s), {args.repeats} A B B A rounds per arm")
    print(f"(a) one draft, 1 identity {k1:.1f} ms; 8 identities: {k8_ratio:.2f}x (median paired ratio, "
          f"target <= 2.0); A/A {aa_k:+.1f} %")  # fmt: skip
    print(f"(b) one picture, 1 face {f1:.1f} ms; 8 faces: {f8_ratio:.2f}x (median paired ratio, "
          f"whole refine, target <= 4.0); A/A {aa_f:+.1f} %")  # fmt: skip
    print(f"    after detection (the stand-in's grid alone): 1 face {f1_after:.1f} ms; "
          f"8 faces: {f8_after:.2f}x; A/A {aa_after:+.1f} %")  # fmt: skip
    print(f"RESULT k8_over_k1={k8_ratio:.2f} faces8_over_faces1={f8_ratio:.2f} "
          f"faces8_over_faces1_after_detection={f8_after:.2f} aa_pct={aa:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
