"""What every bench script shares: its command-line knobs, fixed threads, interleaved paired timing, and a
grid of stand-in faces for the refine benches (``grid_faces``).

``interleave`` is how the benches compare two things on a shared, noisy CPU: each arm is timed against one
reference in A B B A blocks (arm, reference, reference, arm), the blocks of the different arms rotated from
round to round, and the figure is the MEDIAN PAIRED RATIO: the median over all (arm, reference) pairs taken
next to each other, half with the arm first and half with the reference first. Drift and order effects hit
both sides of every pair alike; an A/A control (an arm doing exactly the reference's work) shows how far
from 1.0 the same method lands when there is no difference to find.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.models.runtime import apply_threads
from studio.types import Face

Timed = Callable[[], float]  # does the work once; returns the seconds that count


def bench_args(
    doc: str | None, *, size: int = 256, steps: int = 20, repeats: int = 5, batch: int | None = None
) -> argparse.Namespace:
    """--size, --steps, --repeats and --threads (and --batch where given), the script's docstring as help.

    Sets torch's and OpenCV's threads to --threads; pass ``runtime_overrides(args)`` to ``load_config`` so
    ONNX Runtime sessions (and a ``Studio``, which applies ``runtime.threads``) use the same number.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=size, help=f"image side in px (default {size})")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"rounds (default {repeats})")
    parser.add_argument("--threads", type=int, default=1, help="torch, OpenCV and ONNX Runtime threads")
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch, help=f"images per call (default {batch})")
    args = parser.parse_args()
    apply_threads(args.threads)  # torch and OpenCV, fixed, so both sides of each ratio run alike
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return args


def runtime_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides that give ONNX Runtime (and a Studio's torch/OpenCV) the bench's thread count."""
    return [f"runtime.threads={args.threads}"]


def work_overrides(args: argparse.Namespace, work: Path, kit: Path | None = None) -> list[str]:
    """A bench's own folders under ``work`` (outputs, models, identities, audit log, signing CA: never the
    user's), no watermark or C2PA signature (they are outside what the benches time), and its threads;
    ``kit``: a tiny model kit built for the bench."""
    return [
        *([f"models.tiny_kit={str(kit)!r}"] if kit is not None else []),
        f"models.dir={str(work / 'models')!r}",
        f"output_dir={str(work / 'out')!r}",
        f"refine.identities_dir={str(work / 'ids')!r}",
        f"audit.log={str(work / 'audit.jsonl')!r}",
        f"provenance.data_dir={str(work / 'data')!r}",
        "provenance.watermark=false",
        "provenance.c2pa=false",
        *runtime_overrides(args),
    ]


def grid_faces(count: int) -> tuple[Face, ...]:
    """``count`` stand-in faces on a 4-wide grid of 256-px cells (row by row, left to right), each shaped
    like the tiny detector's fixture face (a 102x128 box); 8 fit on a 1024x512 picture. Benches put it in
    place of detection (``studio.faces.analysis.detect_faces``), whose fixture always reports one face."""
    points = [(0.42, 0.40), (0.58, 0.40), (0.50, 0.50), (0.435, 0.60), (0.565, 0.60)]  # fractions of a cell
    faces = []
    for i in range(count):
        x, y = (i % 4) * 256.0, (i // 4) * 256.0
        landmarks = np.array([[x + 256 * px, y + 256 * py] for px, py in points], np.float32)  # (5, 2) x, y
        faces.append(Face(box=(x + 77, y + 56, x + 179, y + 184), landmarks=landmarks, score=0.99))
    return tuple(faces)


def wall(function: Callable[[], object]) -> Timed:
    """``function`` as a ``Timed``: its wall time with ``time.perf_counter``."""

    def timed() -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    return timed


@dataclass(frozen=True)
class Paired:
    """One arm's timings and the reference timings taken next to them, pair by pair (seconds)."""

    arm: tuple[float, ...]
    reference: tuple[float, ...]

    @property
    def ratios(self) -> list[float]:
        return [a / r for a, r in zip(self.arm, self.reference, strict=True)]

    @property
    def ratio(self) -> float:
        """The median paired ratio arm / reference: the figure to compare."""
        return statistics.median(self.ratios)

    @property
    def pct(self) -> float:
        """(ratio - 1) in %: how much longer the arm takes than the reference."""
        return (self.ratio - 1.0) * 100.0

    @property
    def diff_ms(self) -> float:
        """The median paired difference arm - reference, in ms."""
        return statistics.median(a - r for a, r in zip(self.arm, self.reference, strict=True)) * 1000.0

    @property
    def arm_ms(self) -> float:
        return statistics.median(self.arm) * 1000.0

    @property
    def reference_ms(self) -> float:
        return statistics.median(self.reference) * 1000.0

    @property
    def quartiles(self) -> tuple[float, float]:
        """First and third quartile of the paired ratios: the spread around the median."""
        q1, _, q3 = statistics.quantiles(self.ratios, n=4) if len(self.ratios) > 1 else [self.ratio] * 3
        return q1, q3

    def describe(self, name: str, reference: str) -> str:
        """One line: medians, the median paired ratio and the spread of the ratios."""
        q1, q3 = self.quartiles
        return (
            f"{name} {self.arm_ms:.1f} ms vs {reference} {self.reference_ms:.1f} ms (medians of "
            f"{len(self.arm)}): median paired ratio {self.ratio:.4f} ({self.pct:+.2f} %), "
            f"quartiles {q1:.3f}..{q3:.3f}"
        )


def interleave(arms: Mapping[str, Timed], reference: Timed, rounds: int) -> dict[str, Paired]:
    """Time every arm against ``reference`` in A B B A blocks, ``rounds`` blocks per arm.

    Round k runs one block per arm, the arms' order rotated by k; a block is arm, reference, reference,
    arm on even rounds and reference, arm, arm, reference on odd ones, and gives two pairs (first two
    calls, last two calls), so each arm is first in half its pairs. Warm everything up before calling.
    Include an A/A arm (the reference's own work) to see the noise floor of the ratio.
    """
    names = list(arms)
    got: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            arm, ref = got[name]
            gc.collect()  # outside the timed calls: no collection inherited from the previous block
            if k % 2 == 0:
                a1, r1, r2, a2 = arms[name](), reference(), reference(), arms[name]()
            else:
                r1, a1, a2, r2 = reference(), arms[name](), arms[name](), reference()
            arm += [a1, a2]
            ref += [r1, r2]
    return {name: Paired(tuple(arm), tuple(ref)) for name, (arm, ref) in got.items()}
